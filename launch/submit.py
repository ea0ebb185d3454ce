"""Hand runs to submitit: one Slurm job array, or the local executor; then wait for them.

Every submitted run gets a `job.json` record in its run dir (launch/runs.py), so a later launch
skips runs whose job is still pending or running, and `collect.py --status` can tell running,
failed and cancelled runs apart. With `runs_per_gpu` > 1 an array task trains several runs side by
side (`cskd.job.PackedJob`); their records name the same task and a log of each run's own. Local
runs take slots, each with its GPU (or none): a run that ends hands its slot to the next one.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from cskd.config import to_dict
from cskd.distributed import CONCURRENT_RUNS_VAR
from cskd.job import PackedJob, TrainJob, packed_log
from cskd.preempt import GRACE_S
from launch import runs
from launch.slurm import Resources

# Slurm signals this long before the time limit: the trainer holds the signal up to GRACE_S for the
# epoch's checkpoint (cskd.preempt), then submitit requeues.
SIGNAL_DELAY_S = 2 * GRACE_S
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


def slurm_parameters(resources: Resources, name: str) -> dict:
    """submitit's SlurmExecutor parameters for every task of the grid's job array."""
    params = dict(partition=resources.partition, nodes=resources.nodes, ntasks_per_node=resources.ntasks_per_node,
                  time=resources.time_min, array_parallelism=resources.array_parallelism, job_name=f"cskd-{name}",
                  signal_delay_s=SIGNAL_DELAY_S, additional_parameters={"requeue": True, **resources.sbatch})
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.cpus_per_task:
        params["cpus_per_task"] = resources.cpus_per_task
    if resources.mem_gb:
        params["mem"] = f"{int(resources.mem_gb * 1024)}M"
    return params


def packs(todo: list, per_task: int) -> list[list]:
    """`todo` in order, cut into the groups that share an array task."""
    return [todo[i:i + per_task] for i in range(0, len(todo), per_task)]


def submit_slurm(todo: list, resources: Resources, log_root: Path, name: str) -> list[str]:
    """Submit `todo` (grid Runs) as one job array, `resources.runs_per_task` runs per task; record each
    run's job in its run dir; return each run's job id (runs packed together share one)."""
    import submitit

    executor = submitit.SlurmExecutor(folder=log_root / "%j", max_num_timeout=MAX_REQUEUES_ON_TIMEOUT)
    executor.update_parameters(**slurm_parameters(resources, name))
    packed = resources.runs_per_task > 1
    groups = packs(todo, resources.runs_per_task)
    with _submission_env(), executor.batch():
        jobs = [executor.submit(PackedJob([(run.run_id, to_dict(run.config)) for run in group], resources.runs_per_gpu)
                                if packed else TrainJob(to_dict(group[0].config))) for group in groups]
    ids = []
    for group, job in zip(groups, jobs):
        for run in group:
            log = packed_log(job.paths.folder, run.run_id) if packed else job.paths.stderr
            runs.write_job_record(run.out_dir, "slurm", job.job_id, str(log))
            ids.append(job.job_id)
    return ids


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


def local_parameters(gpu: str | None) -> dict:
    """submitit's LocalExecutor parameters for a run on `gpu` (an index), or on no GPU (None).

    The local executor sets the job's CUDA_VISIBLE_DEVICES to its `visible_gpus` (empty: no GPU), so
    the run sees just its GPU, as cuda:0."""
    if gpu is None:
        return {"gpus_per_node": 0, "visible_gpus": ()}
    return {"gpus_per_node": 1, "visible_gpus": (int(gpu),)}


def run_local(todo: list, slots: list[str | None], log_root: Path) -> None:
    """Run jobs through submitit's local executor, one per slot at a time, each on its slot's GPU
    (None: none); a run that ends frees its slot for the next. Failures go in job.json."""
    import submitit

    executor = submitit.LocalExecutor(folder=log_root / "%j")
    executor.update_parameters(timeout_min=7 * 24 * 60)  # local default is 2 minutes
    waiting, running, free = list(todo), [], list(range(len(slots)))
    share = {CONCURRENT_RUNS_VAR: str(len(slots))}  # the runs split this machine's cores
    try:
        while waiting or running:
            while waiting and free:
                run, slot = waiting.pop(0), free.pop(0)
                executor.update_parameters(**local_parameters(slots[slot]))
                job = executor.submit(TrainJob(to_dict(run.config), env=share))
                runs.write_job_record(run.out_dir, "local", job.job_id, str(job.paths.stderr), pid=os.getpid(),
                                      job_pid=job._process.pid, gpu=slots[slot])  # submitit keeps the Popen private
                running.append((run, job, slot))
            time.sleep(0.5)
            for run, job, slot in [r for r in running if r[1].done()]:
                running.remove((run, job, slot))
                free = sorted(free + [slot])
                try:
                    job.result()
                    print(f"done    {run.out_dir}", flush=True)
                except Exception as e:  # a failed run is reported and does not stop the others
                    reason = runs.last_error_line(job.paths.stderr) or str(e).strip().splitlines()[-1]
                    runs.write_job_record(run.out_dir, "local", job.job_id, str(job.paths.stderr), state="FAILED",
                                          reason=reason, gpu=slots[slot])
                    print(f"FAILED  {run.out_dir}: {reason} (log: {job.paths.stderr})", flush=True)
    except KeyboardInterrupt:
        for _, job, _ in running:
            job.cancel(check=False)
        print("\ninterrupted: running jobs cancelled; re-run the same command to resume them", flush=True)
        raise SystemExit(130)
