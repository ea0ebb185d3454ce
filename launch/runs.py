"""Where each run of a grid stands: done, pending, running, failed, cancelled or missing.

The launcher leaves two kinds of record, both written atomically:
- `<root>/grid.json`, the manifest: the grid's name, the paper tables it reproduces (its `paper:`
  declaration, `{"paper", "table"}` or a list of them, or null) and every run it expands to (run id, run dir relative
  to the root, dataset, model, method label, seed), so a run that never started is reported as
  missing rather than silently absent from the table;
- `<run dir>/job.json`: who runs it (`slurm` with the job id, or `local` with the launcher's and the
  job's pids) and where its log is. A finished run is one with a readable `summary.json`, whatever the record
  says; a run whose dir a live trainer has locked (`cskd.rundir.run_dir_lock`) is running, whatever
  the record says, so no launcher ever starts a second writer of it.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from cskd import rundir
from cskd.errors import RunDirError
from cskd.fileio import write_json
from cskd.lock import describe
from launch import slurm

MANIFEST = "grid.json"
LOCKED = "locked by"  # how a run held by a live trainer is described
STATES = ("done", "running", "pending", "failed", "cancelled", "missing", "unknown")


@dataclass
class RunStatus:
    state: str  # one of STATES
    detail: str = ""  # Slurm's state or the failure's last log line
    log: str | None = None
    job_id: str | None = None


def write_manifest(root: Path, name: str, entries: list[dict], paper: dict | None = None) -> None:
    """The grid's manifest; `paper` is always present (null for a grid that declares none)."""
    write_json(root / MANIFEST, {"name": name, "paper": paper, "runs": entries})


def write_job_record(run_dir: Path, scheduler: str, job_id: str, log: str | None, **extra) -> None:
    write_json(run_dir / rundir.JOB, {"scheduler": scheduler, "job_id": job_id, "log": log,
                                      "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **extra})


def read_job_record(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / rundir.JOB).read_text())
    except (OSError, ValueError):
        return None


_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception)\b")


def last_error_line(log: str | os.PathLike | None) -> str:
    """The exception a job's stderr ends with (srun's own complaints come after it), '' if none."""
    try:
        lines = [l.strip() for l in Path(log).read_text(errors="replace").splitlines() if l.strip()]
    except (OSError, TypeError):
        return ""
    errors = ([l for l in lines if _EXCEPTION.match(l)]
              or [l for l in lines if not l.startswith(("srun:", "slurmstepd"))])
    return errors[-1].removeprefix("cskd.errors.") if errors else ""


def _pid_alive(pid: int) -> bool:
    try:  # the state field, not kill -0: a zombie is dead
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _from_slurm(record: dict, state: str | None) -> RunStatus:
    job_id, log = record["job_id"], record.get("log")
    if state is None:
        return RunStatus("missing", f"job {job_id} is unknown to Slurm", log, job_id)
    if state in slurm.ACTIVE:
        kind = "pending" if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED") else "running"
        return RunStatus(kind, state, log, job_id)
    if state == "CANCELLED":
        return RunStatus("cancelled", state, log, job_id)
    why = last_error_line(log)
    if state == "COMPLETED":
        return RunStatus("failed", f"job ended without a summary.json ({why or 'no error in its log'})", log, job_id)
    return RunStatus("failed", f"{state}" + (f": {why}" if why else ""), log, job_id)


def _finished(run_dir: Path) -> RunStatus:
    """done, or failed if its summary.json cannot be read (`cskd.rundir.read_summary` says why)."""
    try:
        rundir.read_summary(run_dir)
        return RunStatus("done")
    except RunDirError as e:
        return RunStatus("failed", str(e))


def statuses(run_dirs: list[Path]) -> dict[Path, RunStatus]:
    """The status of each run dir; asks Slurm (one squeue + one sacct) only about unfinished Slurm runs."""
    records = {d: read_job_record(d) for d in run_dirs if not (d / rundir.SUMMARY).exists()}
    slurm_ids = [r["job_id"] for r in records.values() if r and r.get("scheduler") == "slurm"]
    try:
        states, unreachable = slurm.job_states(slurm_ids), None
    except slurm.SlurmError as e:
        states, unreachable = {}, str(e)
    result = {}
    for d in run_dirs:
        record = records.get(d)
        holder = rundir.lock_holder(d) if d in records else None
        if (d / rundir.SUMMARY).exists():
            result[d] = _finished(d)
        elif holder is not None:  # a live trainer holds it, whatever launched it: never start a second one
            result[d] = RunStatus("running", f"{LOCKED} {describe(holder)}", (record or {}).get("log"),
                                  holder.get("job_id") or (record or {}).get("job_id"))
        elif record is None and (d / rundir.CONFIG).exists():  # started by hand or by an older launcher
            result[d] = RunStatus("unknown", "started (config.yaml) but no summary.json and no job.json")
        elif record is None:
            result[d] = RunStatus("missing")
        elif record.get("scheduler") == "slurm":
            result[d] = (RunStatus("unknown", unreachable, record.get("log"), record["job_id"]) if unreachable
                         else _from_slurm(record, states.get(record["job_id"])))
        elif record.get("state") == "FAILED":
            result[d] = RunStatus("failed", record.get("reason", ""), record.get("log"))
        elif any(_pid_alive(int(record.get(key) or -1)) for key in ("pid", "job_pid")):
            # the job itself may outlive a killed launcher, and holds no lock yet while it starts
            result[d] = RunStatus("running", f"local, launcher pid {record['pid']}, job pid "
                                  f"{record.get('job_pid', '?')}", record.get("log"))
        else:
            result[d] = RunStatus("failed", f"the local launcher (pid {record.get('pid')}) stopped before the "
                                  f"run finished", record.get("log"))
    return result
