"""Hand runs to submitit: one Slurm job array, or the local executor; then wait for them.

Every submitted run gets a `job.json` record in its run dir (launch/runs.py), so a later launch
skips runs whose job is still pending or running, and `collect.py --status` can tell running,
failed and cancelled runs apart.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from cskd.config import to_dict
from cskd.job import TrainJob
from launch import runs
from launch.slurm import Resources

SIGNAL_DELAY_S = 120  # Slurm signals this long before the time limit: time to finish the step and requeue
MAX_REQUEUES_ON_TIMEOUT = 30  # preemptions do not count against this; hitting the time limit does
POLL_S = 5


@contextmanager
def _submission_env():
    """No SLURM_*/RANK/MASTER_* variables leak from the submitting shell into the jobs.

    submitit's clean_env also hides SLURM_CONF, which names the cluster to submit to: keep it.
    A leaked MASTER_PORT would make every job of the array rendezvous on the same port.
    """
    import submitit

    conf = os.environ.get("SLURM_CONF")
    with submitit.helpers.clean_env():
        if conf:
            os.environ["SLURM_CONF"] = conf
        yield


def submit_slurm(todo: list, resources: Resources, log_root: Path, name: str) -> list[str]:
    """Submit `todo` (grid Runs) as one job array; record each job in its run dir; return the job ids."""
    import submitit

    executor = submitit.SlurmExecutor(folder=log_root / "%j", max_num_timeout=MAX_REQUEUES_ON_TIMEOUT)
    params = dict(partition=resources.partition, nodes=resources.nodes, ntasks_per_node=resources.ntasks_per_node,
                  time=resources.time_min, array_parallelism=resources.array_parallelism, job_name=f"cskd-{name}",
                  signal_delay_s=SIGNAL_DELAY_S, additional_parameters={"requeue": True, **resources.sbatch})
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.cpus_per_task:
        params["cpus_per_task"] = resources.cpus_per_task
    if resources.mem_gb:
        params["mem"] = f"{int(resources.mem_gb * 1024)}M"
    executor.update_parameters(**params)
    with _submission_env(), executor.batch():
        jobs = [executor.submit(TrainJob(to_dict(run.config))) for run in todo]
    for run, job in zip(todo, jobs):
        runs.write_job_record(run.out_dir, "slurm", job.job_id, str(job.paths.stderr))
    return [job.job_id for job in jobs]


def wait(run_dirs: list[Path], grace_s: float = 120) -> dict[Path, runs.RunStatus]:
    """Poll until no run is pending or running; print the counts whenever they change.

    A job that just ended can be absent from both squeue and sacct for a moment: such runs count
    as still in flight for `grace_s`.
    """
    last, vanished = None, {}
    while True:
        status = runs.statuses(run_dirs)
        now = time.monotonic()
        for d, s in status.items():
            if s.state == "missing" and s.job_id:
                vanished.setdefault(d, now)
            else:
                vanished.pop(d, None)
        counts = Counter(s.state for s in status.values())
        if counts != last:
            print(time.strftime("%H:%M:%S"), " ".join(f"{k} {counts[k]}" for k in runs.STATES if counts[k]),
                  flush=True)
            last = counts
        in_flight = any(s.state in ("pending", "running") for s in status.values())
        if not in_flight and all(now - t > grace_s for t in vanished.values()):
            return status
        time.sleep(POLL_S)


def run_local(todo: list, parallel: int, log_root: Path) -> None:
    """Run jobs through submitit's local executor, at most `parallel` at a time; failures go in job.json."""
    import submitit

    executor = submitit.LocalExecutor(folder=log_root / "%j")
    executor.update_parameters(timeout_min=7 * 24 * 60)  # local default is 2 minutes
    waiting, running = list(todo), []
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                run = waiting.pop(0)
                job = executor.submit(TrainJob(to_dict(run.config)))
                runs.write_job_record(run.out_dir, "local", job.job_id, str(job.paths.stderr), pid=os.getpid(),
                                      job_pid=job._process.pid)  # submitit keeps the Popen private
                running.append((run, job))
            time.sleep(0.5)
            for run, job in [r for r in running if r[1].done()]:
                running.remove((run, job))
                try:
                    job.result()
                    print(f"done    {run.out_dir}", flush=True)
                except Exception as e:  # a failed run is reported and does not stop the others
                    reason = runs.last_error_line(job.paths.stderr) or str(e).strip().splitlines()[-1]
                    runs.write_job_record(run.out_dir, "local", job.job_id, str(job.paths.stderr), state="FAILED",
                                          reason=reason)
                    print(f"FAILED  {run.out_dir}: {reason} (log: {job.paths.stderr})", flush=True)
    except KeyboardInterrupt:
        for _, job in running:
            job.cancel(check=False)
        print("\ninterrupted: running jobs cancelled; re-run the same command to resume them", flush=True)
        raise SystemExit(130)
