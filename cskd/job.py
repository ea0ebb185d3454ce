"""What a launcher submits: picklable, checkpointable callables that train configs.

A job carries resolved configs as plain dicts and rebuilds (and re-validates) them in the job, so it
never depends on the submitting process's objects. All of a run's state lives in its run dir, so
every way a job can be restarted resumes from the last epoch checkpoint:
- preemption or time limit: submitit catches Slurm's signal, calls `checkpoint()` (which resubmits
  this same callable) and requeues the job;
- an external `scontrol requeue` or a node failure (SIGKILL, no `checkpoint()` call): Slurm reruns
  the original pickle, which is this same callable too.

`TrainJob` trains one config in the job's own process(es). `PackedJob` trains several single-process
configs side by side in one task (`launch/grid.py --runs-per-gpu K`), each in a process of its own
(`python -m cskd.job CONFIG_JSON`) that sees one of the task's GPUs; a rerun of the task reruns all
of them, and each resumes from its own run dir (a finished one just reports its summary).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import submitit

from cskd.config import from_dict
from cskd.distributed import CONCURRENT_RUNS_VAR, visible_gpus
from cskd.errors import ConfigError, CskdError


class TrainJob(submitit.helpers.Checkpointable):
    """One run in the job's own process (each task of a multi-process run calls it)."""

    def __init__(self, config: dict, env: dict | None = None):
        self.config = config
        self.env = env or {}  # variables for the trainer, e.g. how many runs share this machine's cores

    def __call__(self) -> dict | None:
        from cskd.train import main

        os.environ.update(getattr(self, "env", {}))  # pickles of an older launcher have no env
        if os.environ.get("SLURM_JOB_ID") and submitit.JobEnvironment().num_tasks > 1:
            # One Slurm task per process: export RANK/WORLD_SIZE/LOCAL_RANK and MASTER_ADDR (the first
            # node) / MASTER_PORT (derived from the job id) for torch.distributed's env:// init.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        return main(from_dict(self.config))

    def __repr__(self) -> str:
        return f"TrainJob({self.config.get('out_dir')})"


def assign_gpus(gpus: Sequence[str], runs_per_gpu: int, runs: int) -> list[str | None]:
    """The GPU of each of `runs` runs that run at the same time, at most `runs_per_gpu` per GPU.

    Run i gets GPU i mod len(gpus): the runs spread over every GPU before any GPU gets a second one.
    Without GPUs every run gets None (it keeps the devices it inherits). Pure, for tests and plans.
    """
    if runs_per_gpu < 1:
        raise ConfigError(f"--runs-per-gpu must be >= 1, got {runs_per_gpu}")
    if not gpus:
        return [None] * runs
    if runs > len(gpus) * runs_per_gpu:
        raise ConfigError(f"{runs} runs at once do not fit {len(gpus)} GPU(s) x {runs_per_gpu} run(s) per GPU; "
                          f"raise --runs-per-gpu or start fewer runs at a time")
    return [gpus[i % len(gpus)] for i in range(runs)]


def packed_log(folder: str | os.PathLike, name: str) -> Path:
    """Where the run `name` of a packed task writes its output (the launcher records it in job.json)."""
    return Path(folder) / f"{name}.log"


@dataclass
class PackedRun:
    """How one run of a packed task ended."""
    name: str
    out_dir: str
    gpu: str | None
    log: str
    returncode: int
    error: str = ""  # the last error line of its log, when it failed


def child_env(base: dict, gpu: str | None, concurrent: int) -> dict:
    """The environment of one packed run: the task's, with its one GPU and its share of the cores."""
    env = {**base, CONCURRENT_RUNS_VAR: str(concurrent), "PYTHONUNBUFFERED": "1"}  # a killed run's log is whole
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def run_packed(runs: list[tuple[str, dict]], log_dir: str | os.PathLike, gpus: Sequence[str],
               runs_per_gpu: int) -> list[PackedRun]:
    """Train every (name, config) of `runs` at once, each in a process of its own with one GPU of `gpus`
    (`assign_gpus`), output appended to `packed_log(log_dir, name)`; wait for all of them and report
    each. A failing run does not stop the others. If this process is stopped (a requeue), so are they."""
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    started = []
    try:
        for (name, config), gpu in zip(runs, assign_gpus(gpus, runs_per_gpu, len(runs))):
            log = packed_log(log_dir, name)
            with open(log, "a") as out:  # a requeued task appends to the same log
                proc = subprocess.Popen([sys.executable, "-m", "cskd.job", json.dumps(config)], stdout=out,
                                        stderr=subprocess.STDOUT, env=child_env(dict(os.environ), gpu, len(runs)))
            print(f"started {config.get('out_dir')} on GPU {gpu if gpu is not None else '-'} (pid {proc.pid}, "
                  f"log {log})", flush=True)
            started.append((name, config, gpu, log, proc))
        results = []
        for name, config, gpu, log, proc in started:
            rc = proc.wait()
            error = "" if rc == 0 else (_last_error(log) or f"exit status {rc}")
            results.append(PackedRun(name, str(config.get("out_dir")), gpu, str(log), rc, error))
            print(f"{'done   ' if rc == 0 else 'FAILED '} {config.get('out_dir')}" + (f": {error}" if error else ""),
                  flush=True)
        return results
    finally:
        for *_, proc in started:  # only left running when this process is leaving early
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _last_error(log: Path) -> str:
    """The last exception line of a run's log (`NonFiniteLossError: ...`), '' if none."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.split(":")[0].endswith(("Error", "Exception"))]
    return (errors or [""])[-1].removeprefix("cskd.errors.")


class PackedRunsFailed(CskdError):
    """Some runs of a packed task failed (each one's reason is in its own log)."""


class PackedJob(submitit.helpers.Checkpointable):
    """Several single-process runs side by side in one task, sharing its GPU(s) and cores."""

    def __init__(self, runs: list[tuple[str, dict]], runs_per_gpu: int):
        self.runs = runs  # (name, config): the name names the run's log in the task's log folder
        self.runs_per_gpu = runs_per_gpu

    def __call__(self) -> list[dict]:
        folder = submitit.JobEnvironment().paths.folder
        results = run_packed(self.runs, folder, visible_gpus(), self.runs_per_gpu)
        failed = [r for r in results if r.returncode != 0]
        if failed:
            raise PackedRunsFailed(f"{len(failed)} of {len(results)} packed runs failed: "
                                   + "; ".join(f"{r.out_dir}: {r.error} (log: {r.log})" for r in failed))
        return [asdict(r) for r in results]

    def __repr__(self) -> str:
        return f"PackedJob({', '.join(str(c.get('out_dir')) for _, c in self.runs)})"


def main(argv: list[str] | None = None) -> int:
    """`python -m cskd.job CONFIG_JSON`: train one config, as `run_packed` starts each run of a task."""
    # The task's submitit process owns the scheduler's signals for all of its runs: on USR2 (time
    # limit, preemption) it requeues the task, and like a single run it ignores SIGTERM. A run killed
    # by either would be reported as failed rather than requeued with the others.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from cskd.train import main as train

    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise ConfigError("usage: python -m cskd.job CONFIG_JSON (a resolved config as one JSON object)")
        train(from_dict(json.loads(args[0])))
    except CskdError as e:  # one line, named as a single run's traceback ends, for the launcher's status
        print(f"{type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
