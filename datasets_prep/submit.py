"""`python -m datasets_prep NAME ... --slurm --partition P [--wait]`: the conversion as a Slurm job.

So that nobody converts ImageNet on a login node. Whatever can fail without reading the source
fails here first, in one line and with no job: the options, the --out path, the request (the same
checks as launch/grid.py: `launch.slurm.make_resources`, `scontrol ping`, `sbatch --test-only`).
The job is submitted with submitit like a grid's runs (launch.submit) and runs the normal conversion
in-process: the same command line minus the Slurm options, in the submitting directory, with
`--workers` = `--cpus-per-task` when given.

Requeue-safe: the job is a submitit Checkpointable whose (inherited) `checkpoint()` resubmits it, so
on preemption or at the time limit (USR2) the conversion is requeued and starts over. The converter
writes into a locked staging folder inside --out and meta.json last (datasets_prep.staging, writer),
so an interrupted attempt never leaves a dataset visible; the next attempt removes its leftovers.

--wait prints the job's stderr log as it grows, then the summary (exit 0) or `error: ...` naming
the job's state and log (exit 2). It polls Slurm's state of the job (launch.slurm.job_states),
so a job that Slurm dropped or that ended without a result ends the wait too.

Logs: OUT_PARENT/prep-logs/<jobid>/ (stderr: <jobid>_0_log.err, stdout with the summary: .out).
Not inside --out, which the converter refuses to write into once it holds foreign files; and not
named `.prep-*`, since the converter deletes folders so named in a directory it converts into.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import submitit

from cskd.errors import CskdError, DataError
from launch import slurm

LOG_DIR = "prep-logs"
LOG_POLL_S = 1.0  # how often the log is read; Slurm's state is asked less and less often (up to STATE_POLL_MAX_S)
STATE_POLL_MAX_S = 30.0
CONFIRM_S = 5.0  # an ended state must still hold this much later: a requeue passes through such states
GONE_S = 60.0  # a job that just ended can be missing from both squeue and sacct for a moment
RESULT_WAIT_S = 30.0  # a COMPLETED job's result file can show up late on a shared filesystem


def add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("Slurm (convert in a batch job instead of on this machine)")
    g.add_argument("--slurm", action="store_true", help="submit the conversion as a Slurm job (needs --partition)")
    g.add_argument("--partition", help="the job's partition (see `sinfo -s`)")
    g.add_argument("--cpus-per-task", type=int, help="the job's CPUs, also its --workers")
    g.add_argument("--mem-gb", type=float, help="the job's memory in GiB (default: the partition's)")
    g.add_argument("--time", help="time limit: minutes or D-HH:MM:SS (default 24 h)")
    g.add_argument("--sbatch", action="append", metavar="NAME=VALUE",
                   help="extra sbatch flag, e.g. --sbatch account=abc --sbatch qos=high (repeatable)")
    g.add_argument("--wait", action="store_true",
                   help="follow the job's log until it ends, then print its summary (else: print the job id)")


def requested(args) -> bool:
    """Whether to submit (--slurm). A Slurm option without --slurm is refused rather than ignored: the
    conversion would silently run on this machine."""
    given = [f for f in ("partition", "cpus_per_task", "mem_gb", "time", "sbatch", "wait")
             if getattr(args, f) is not None and getattr(args, f) is not False]
    if given and not args.slurm:
        raise slurm.SlurmError(f"--{given[0].replace('_', '-')} only applies to a Slurm job: add --slurm")
    return args.slurm


def submit(args, argv: list[str]) -> int:
    """Check, submit, and with --wait follow the job to its end; errors raise a one-line CskdError."""
    resources = _resources(args)
    _check_locally(args)
    slurm.check_reachable()
    slurm.validate(resources)
    out = Path(args.out).absolute()
    log_root = out.parent / LOG_DIR
    try:  # made here: submitit would fail on an unwritable parent with a traceback
        log_root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the job's log folder {log_root} ({e.strerror or e}); choose an --out "
                        f"whose parent directory is writable") from None
    job = _submit(resources, ConvertJob(job_argv(argv, args.cpus_per_task), os.getcwd()), log_root, args.name)
    log = Path(job.paths.stderr)
    print(f"submitted job {job.job_id} ({args.name} into {out}) to partition {resources.partition}\nlog: {log}",
          flush=True)
    if not args.wait:
        print(f"follow it: tail -F {log}    its state: sacct -j {job.job_id}    the summary: {job.paths.stdout} "
              f"once it ends")
        return 0
    try:
        print(_follow(job, log))
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job.job_id} goes on (scancel {job.job_id} stops it)", file=sys.stderr)
        return 130
    return 0


def _resources(args) -> slurm.Resources:
    if not args.partition:
        raise slurm.SlurmError("--slurm needs --partition P (the partitions: `sinfo -s`)")
    flags = {}
    for text in args.sbatch or ():
        name, sep, value = text.partition("=")
        if not name or name.startswith("-"):
            raise slurm.SlurmError(f"--sbatch {text!r}: write sbatch flags as name=value without dashes, "
                                   f"e.g. account=abc")
        flags[name] = value if sep else True
    section = {"partition": args.partition, "nodes": 1, "gpus_per_node": 0, "tasks_per_node": 1,
               "cpus_per_task": args.cpus_per_task, "mem_gb": args.mem_gb, "time_min": args.time, "sbatch": flags}
    return slurm.make_resources(section, "--slurm")


def _check_locally(args) -> None:
    """The conversion's own checks that need no source, so that a typo costs no job."""
    from datasets_prep import outdir, staging  # import torch (cskd.lock): not for every command line
    from datasets_prep.__main__ import check_options

    check_options(args)
    out = Path(args.out)
    outdir.check_path(out)
    outdir.check_writable(out)
    busy = staging.busy_error(out)
    if busy:
        raise busy


def job_argv(argv: list[str], cpus_per_task: int | None) -> list[str]:
    """The command line without its Slurm options (a conversion's own options are kept as typed)."""
    slurm_only = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_slurm_arguments(slurm_only)
    rest = slurm_only.parse_known_args(argv)[1]
    return rest + (["--workers", str(cpus_per_task)] if cpus_per_task else [])  # the last --workers wins


def _submit(resources: slurm.Resources, job: ConvertJob, log_root: Path, name: str) -> submitit.Job:
    from launch.submit import MAX_REQUEUES_ON_TIMEOUT, _submission_env, slurm_parameters  # imports torch

    executor = submitit.SlurmExecutor(folder=log_root / "%j", max_num_timeout=MAX_REQUEUES_ON_TIMEOUT)
    executor.update_parameters(**slurm_parameters(resources, f"prep-{name}"))
    with _submission_env():
        return executor.submit(job)


class ConvertJob(submitit.helpers.Checkpointable):
    """The conversion, in the job's process. A CskdError ends the job FAILED (exit status 2) with the
    usual `error: <one line>` as its log's last line, which the client reports: no traceback."""

    def __init__(self, argv: list[str], cwd: str):
        self.argv, self.cwd = argv, cwd

    def __call__(self) -> str:
        from datasets_prep.__main__ import _convert, _parser

        os.chdir(self.cwd)  # relative --src/--out mean what they meant where the user typed them
        print(f"python -m datasets_prep {shlex.join(self.argv)}", file=sys.stderr, flush=True)
        try:
            summary = _convert(_parser(self.argv).parse_args(self.argv))
        except CskdError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None  # not an Exception: submitit writes no traceback
        print(summary, flush=True)  # in the .out log, for whoever did not --wait
        return summary


def _follow(job: submitit.Job, log: Path) -> str:
    """Print the job's stderr log as it grows until the job ends; return its summary or raise why not."""
    shown = _Log(log)
    interval, next_poll, gone, confirming, state = 1.0, 0.0, None, False, None
    while not job.paths.result_pickle.exists():  # written once the callable returned or raised
        shown.print_new()
        now = time.monotonic()
        if now >= next_poll:
            state = slurm.job_states([job.job_id]).get(job.job_id)
            interval, next_poll = min(interval * 1.5, STATE_POLL_MAX_S), now + interval
            gone = (gone or now) if state is None else None
            if gone and now - gone > GONE_S:
                raise slurm.SlurmError(f"Slurm does not know job {job.job_id} (anymore); log: {log}")
            if state is None or state in slurm.ACTIVE:
                confirming = False
            elif not confirming and shown.error is None:  # ask again CONFIRM_S later
                confirming, next_poll = True, now + CONFIRM_S
            else:  # confirmed, or the conversion's error ended it (no requeue follows)
                break
        time.sleep(LOG_POLL_S)
    deadline = time.monotonic() + RESULT_WAIT_S
    while state == "COMPLETED" and not job.paths.result_pickle.exists() and time.monotonic() < deadline:
        time.sleep(LOG_POLL_S)
    shown.print_new(final=True)
    if job.paths.result_pickle.exists():
        try:
            return job.result()
        except Exception as e:  # submitit's FailedJobError: not a CskdError (a bug, or requeued too often)
            raise slurm.SlurmError(f"job {job.job_id} failed: {_raised(str(e))}; log: {log}") from None
    raise DataError(f"{shown.error} (job {job.job_id} {state}; log: {log})" if shown.error else
                    f"job {job.job_id} ended {state} without a summary; log: {log}")


class _Log:
    """The job's stderr log, printed line by line as it grows (submitit appends across requeues)."""

    def __init__(self, path: Path):
        self.path, self.offset, self.partial, self.error = path, 0, b"", None

    def print_new(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:  # the job has not started
            chunk = b""
        self.offset += len(chunk)
        *lines, self.partial = (self.partial + chunk).split(b"\n")
        for line in lines + ([self.partial] if final and self.partial else []):
            text = line.decode(errors="replace")
            print(text, file=sys.stderr, flush=True)
            if text.startswith("error: "):  # the job's CskdError (ConvertJob)
                self.error = text.removeprefix("error: ")


def _raised(failure: str) -> str:
    """The exception line of submitit's FailedJobError text (the trace sits between two dashed lines)."""
    lines = failure.splitlines()
    dashes = [i for i, l in enumerate(lines) if l and set(l) == {"-"}]
    trace = [l.strip() for l in lines[dashes[0] + 1:dashes[1]] if l.strip()] if len(dashes) > 1 else []
    return trace[-1] if trace else lines[0]
