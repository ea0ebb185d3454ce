"""The launcher's only contact with Slurm's commands: reachability, request validation, job states.

Everything here shells out to `sinfo`/`scontrol`/`sbatch --test-only`/`squeue`/`sacct` with a
deadline, so a dead controller gives an error naming what to check instead of a hang. Job states
come from `squeue` for live jobs (it expands pending array tasks, which `sacct` folds into one
row) and from `sacct` (accounting) for finished ones.
"""
from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from cskd.config import unprintable
from cskd.errors import CskdError

# States in which a job still holds or will get resources: its run must not be submitted again.
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
          "SUSPENDED", "RESIZING", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD", "STOPPED"}
COMMAND_TIMEOUT_S = 60
SBATCH_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # what `--<name>` may be: one sbatch flag, nothing more


class SlurmError(CskdError):
    """Slurm is unreachable or refused a request."""


@dataclass
class Resources:
    """What every task of a grid's job array asks for (one array shares one request)."""
    partition: str | None = None
    nodes: int = 1
    gpus_per_node: int = 1
    tasks_per_node: int | None = None  # default: one task per GPU (at least one)
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    time_min: int = 24 * 60
    array_parallelism: int = 256
    sbatch: dict = field(default_factory=dict)  # extra sbatch flags: account, qos, constraint, ...
    runs_per_gpu: int = 1  # > 1: single-process runs packed into one array task, each its own process

    @property
    def ntasks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def runs_per_task(self) -> int:
        """Runs in one array task: runs_per_gpu on each of the task's GPUs (a CPU task: runs_per_gpu)."""
        return 1 if self.runs_per_gpu == 1 else self.runs_per_gpu * max(self.gpus_per_node, 1)

    def sbatch_flags(self) -> list[str]:
        """The request as sbatch command-line flags (what `--dry-run` shows and `--test-only` checks)."""
        flags = [f"--partition={self.partition}", f"--nodes={self.nodes}",
                 f"--ntasks-per-node={self.ntasks_per_node}", f"--time={self.time_min}"]
        if self.gpus_per_node:
            flags.append(f"--gpus-per-node={self.gpus_per_node}")
        if self.cpus_per_task:
            flags.append(f"--cpus-per-task={self.cpus_per_task}")
        if self.mem_gb:
            flags.append(f"--mem={int(self.mem_gb * 1024)}M")
        for key, value in self.sbatch.items():
            flag = "--" + key.replace("_", "-")
            flags.append(flag if value is True else f"{flag}={value}")
        return flags


def _run(args: list[str], what_to_check: str) -> subprocess.CompletedProcess:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"Slurm's '{args[0]}' is not on PATH; run on a machine with Slurm's client commands "
                         f"(a login node, or `module load slurm`), or leave out --partition to run locally")
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"`{' '.join(args)}` did not answer within {COMMAND_TIMEOUT_S} s; {what_to_check}") from None


def _first_error_line(res: subprocess.CompletedProcess) -> str:
    """The line that says what went wrong: the last 'error' line, else the first line."""
    lines = [l.strip() for l in (res.stderr + res.stdout).splitlines() if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    return errors[-1] if errors else (lines or [f"exit status {res.returncode}"])[0]


def check_reachable() -> None:
    """Raise SlurmError unless the controller answers `scontrol ping`."""
    hint = ("check that slurmctld is up (`scontrol ping`), that SLURM_CONF points at this cluster's "
            "slurm.conf, and that munged runs on this machine")
    res = _run(["scontrol", "ping"], hint)
    if res.returncode != 0 or " is UP" not in res.stdout:
        said = [l.strip() for l in res.stdout.splitlines() if l.startswith("Slurmctld")]
        raise SlurmError(f"the Slurm controller is not reachable ({(said or [_first_error_line(res)])[0]}); {hint}")


def validate(resources: Resources) -> None:
    """Ask Slurm whether it would accept the request (`sbatch --test-only`); nothing is submitted."""
    res = _run(["sbatch", "--test-only", *resources.sbatch_flags(), "--wrap", "true"],
               "check `scontrol ping`")
    if res.returncode != 0:
        raise SlurmError(f"Slurm refuses the resource request {' '.join(resources.sbatch_flags())}: "
                         f"{_first_error_line(res).removeprefix('sbatch: error: ')}; see `sinfo -s` for "
                         f"partitions and node sizes")


def _parse_state(text: str) -> str:
    return text.split()[0].rstrip("+") if text.split() else "UNKNOWN"  # 'CANCELLED by 0' -> 'CANCELLED'


def job_states(job_ids: list[str]) -> dict[str, str]:
    """Slurm state of each job id ('123' or array task '123_4'); ids Slurm does not know are left out.

    squeue (with --states=all) covers live jobs and those ended within MinJobAge; sacct the rest.
    An array task cancelled before it started is in neither (Slurm just drops it from the array's
    pending record), so a task missing from an array that Slurm does know is reported CANCELLED.
    """
    if not job_ids:
        return {}
    states = {}
    live = _run(["squeue", "--me", "-h", "-r", "--states=all", "-o", "%i|%T"], "check `scontrol ping`")
    if live.returncode != 0:
        raise SlurmError(f"squeue failed: {_first_error_line(live)}")
    states.update(_rows(live.stdout))
    parents = sorted({j.split("_")[0] for j in job_ids if j not in states})
    if parents:
        done = _run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(parents)],
                    "check that accounting (slurmdbd) runs")
        if done.returncode != 0:
            raise SlurmError(f"sacct failed ({_first_error_line(done)}); the launcher needs Slurm accounting "
                             f"to tell finished, failed and cancelled jobs apart")
        for job_id, state in _rows(done.stdout).items():
            states.setdefault(job_id, state)
    known_arrays = {j.split("_")[0] for j in states if "_" in j}
    return {j: states.get(j) or "CANCELLED" for j in job_ids
            if j in states or ("_" in j and j.split("_")[0] in known_arrays)}


def _rows(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        job_id, _, state = line.partition("|")
        rows[job_id.strip()] = _parse_state(state)
    return rows


def cancel(job_ids: list[str]) -> None:
    if job_ids:
        _run(["scancel", *job_ids], "check `scontrol ping`")


def parse_time_min(value) -> int:
    """Minutes from an int or a Slurm time string (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)."""
    if isinstance(value, int) and not isinstance(value, bool):
        total = value
    else:
        match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(value).strip())
        total = 0
        if match:
            days, *fields = match.groups()
            parts = [int(f) for f in fields if f is not None]
            if days is not None:  # D-HH[:MM[:SS]]
                hours, minutes, seconds = (parts + [0, 0])[:3]
            elif len(parts) == 3:  # HH:MM:SS
                hours, minutes, seconds = parts
            else:  # MM[:SS]
                hours, minutes, seconds = 0, parts[0], (parts + [0])[1]
            total = int(days or 0) * 1440 + hours * 60 + minutes + (seconds + 59) // 60
    if total <= 0:
        raise SlurmError(f"time limit {value!r} is not a positive number of minutes or a Slurm time "
                         f"(MM, HH:MM:SS, D-HH:MM:SS)")
    return total


def make_resources(section: dict, source: str) -> Resources:
    """Resources from a grid's `resources:` mapping (CLI values already merged in), validated."""
    valid = {f for f in Resources.__dataclass_fields__}
    unknown = set(section) - valid
    if unknown:
        raise SlurmError(f"{source}: unknown resources key(s) {', '.join(sorted(map(str, unknown)))}; valid: "
                         f"{', '.join(sorted(valid))} (other sbatch flags go under resources.sbatch)")
    values = {k: v for k, v in section.items() if v is not None}
    for key in ("nodes", "array_parallelism", "runs_per_gpu"):
        _check_int(values, key, source, minimum=1)
    for key in ("gpus_per_node",):
        _check_int(values, key, source, minimum=0)
    for key in ("tasks_per_node", "cpus_per_task"):
        _check_int(values, key, source, minimum=1)
    if "mem_gb" in values and (not isinstance(values["mem_gb"], (int, float)) or isinstance(values["mem_gb"], bool)
                               or not 0 < values["mem_gb"] < math.inf):  # NaN fails this too
        raise SlurmError(f"{source}: resources.mem_gb must be a positive number, got {values['mem_gb']!r}")
    if "time_min" in values:
        values["time_min"] = parse_time_min(values["time_min"])
    if not isinstance(values.get("sbatch", {}), dict):
        raise SlurmError(f"{source}: resources.sbatch must map sbatch flag names to values, e.g. {{account: abc}}")
    if "partition" in values:
        _check_text("partition", values["partition"], source)
    for name, value in values.get("sbatch", {}).items():
        _check_sbatch(name, value, source)
    return Resources(**values)


def _check_text(key: str, value, source: str) -> None:
    """A value written into the job's sbatch script: one line of printable text (a newline would start a
    directive of its own)."""
    if not isinstance(value, str) or not value.strip():
        raise SlurmError(f"{source}: resources.{key} must be a non-empty name, got {value!r}")
    bad = unprintable(value)
    if bad is not None:
        raise SlurmError(f"{source}: resources.{key} {value!r} holds the control character {bad!r}; remove it")


def _check_sbatch(name, value, source: str) -> None:
    """An extra sbatch flag: a plain flag name (no dashes in front) and a scalar value on one line."""
    if not isinstance(name, str) or not SBATCH_NAME.fullmatch(name):
        raise SlurmError(f"{source}: sbatch flag name {name!r} is not a plain flag name (letters, digits, '-', "
                         f"'_'); write it without dashes, e.g. account=abc")
    if isinstance(value, (bool, int, float)):
        return
    if not isinstance(value, str):
        raise SlurmError(f"{source}: sbatch flag {name} must have a single value, got {value!r}")
    bad = unprintable(value)
    if bad is not None:
        raise SlurmError(f"{source}: sbatch flag {name}={value!r} holds the control character {bad!r}; remove it "
                         f"(a newline would add sbatch directives of its own)")


def _check_int(values: dict, key: str, source: str, minimum: int) -> None:
    if key in values and (not isinstance(values[key], int) or isinstance(values[key], bool) or values[key] < minimum):
        raise SlurmError(f"{source}: resources.{key} must be an integer >= {minimum}, got {values[key]!r}")
