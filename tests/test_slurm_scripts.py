"""The local Slurm scripts against a running one-node Slurm (slurm/start_local.sh).

Skipped unless a Slurm answers (`sinfo` on PATH and `scontrol ping` UP). CI starts it with
`slurm/start_local.sh` and stops it with `slurm/stop_local.sh` on exit; these tests never stop it.
Every wait has a deadline.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

START = REPO / "slurm" / "start_local.sh"
TEMPLATE = REPO / "slurm" / "multinode.sbatch"
SLURM_LOCAL_DIR = Path(os.environ.get("SLURM_LOCAL_DIR", "/var/tmp/cskd-slurm"))
MARKER = "managed-by cskd slurm/start_local.sh"
# Job states after which a job will not run again (sacct prints e.g. "CANCELLED by 0").
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL",
                "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


def _cmd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)


def _no_slurm_reason() -> str | None:
    """Why no Slurm answers here, or None if one does."""
    if shutil.which("sinfo") is None or shutil.which("scontrol") is None:
        return "no Slurm here: sinfo/scontrol not on PATH (start one with slurm/start_local.sh)"
    try:
        ping = _cmd("scontrol", "ping", timeout=15)
    except subprocess.TimeoutExpired:
        return "no Slurm answering: `scontrol ping` timed out"
    if "is UP" not in ping.stdout:
        return f"no Slurm answering: `scontrol ping` says {(ping.stdout + ping.stderr).strip()!r}"
    return None


NO_SLURM = _no_slurm_reason()
pytestmark = pytest.mark.skipif(NO_SLURM is not None, reason=NO_SLURM or "")


def _pid_records() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((SLURM_LOCAL_DIR / "pids").glob("*.pid"))}


def _started_by_start_local() -> bool:
    conf = Path("/etc/slurm/slurm.conf")
    try:
        return MARKER in conf.read_text() and bool(_pid_records())
    except OSError:
        return False


@pytest.mark.skipif(os.geteuid() != 0, reason="start_local.sh runs as root")
def test_start_again_is_a_quick_noop():
    if not _started_by_start_local():
        pytest.skip(f"this Slurm was not started by slurm/start_local.sh (no marker in "
                    f"/etc/slurm/slurm.conf or no PID files in {SLURM_LOCAL_DIR}/pids)")
    before = _pid_records()
    # Same environment as the start (SLURM_* knobs included); a different SLURM_FAKE_GPUS or
    # SLURM_ACCOUNTING would change the config and restart daemons, which this test reports.
    res = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, f"start_local.sh failed:\n{res.stdout}\n{res.stderr}"
    assert "slurm up" in res.stdout, res.stdout
    assert "started" not in res.stdout and "stopping" not in res.stdout, res.stdout
    assert _pid_records() == before, "the second start replaced running daemons"


def _job_state(job_id: str) -> str:
    """The job's state: squeue while Slurm holds it, then sacct; 'GONE' if neither knows it."""
    sq = _cmd("squeue", "-h", "-j", job_id, "-o", "%T")
    if sq.returncode == 0 and sq.stdout.strip():
        return sq.stdout.split()[0]
    acct = _cmd("sacct", "-n", "-X", "-j", job_id, "-o", "State%30")
    if acct.returncode == 0 and acct.stdout.strip():
        return acct.stdout.split()[0]
    return "GONE"


def _wait_job(job_id: str, deadline_s: float) -> str:
    end = time.monotonic() + deadline_s
    while True:
        state = _job_state(job_id)
        if state in FINAL_STATES or state == "GONE":
            return state
        if time.monotonic() > end:
            _cmd("scancel", job_id)
            return f"still {state} after {deadline_s:.0f}s (cancelled)"
        time.sleep(2)


def test_multinode_template_runs_two_process_job(mnist_dir, tmp_path):
    out_dir = tmp_path / "run"
    log = tmp_path / "job-%j.out"
    gres = _cmd("sinfo", "-h", "-n", "localhost", "-o", "%G").stdout
    # The template asks for 2 GPUs per node; a local Slurm started with SLURM_FAKE_GPUS=0 has none.
    no_gpus = [] if "gpu" in gres else ["--gpus-per-node=0"]
    submit = _cmd(
        "sbatch", "--parsable", "-p", "cpu", "-N1", "-c2", *no_gpus, f"--output={log}",
        f"--export=ALL,NPROC_PER_NODE=2,PYTHON={sys.executable},PYTHONPATH={REPO}",
        str(TEMPLATE), "--config", str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
        f"data.path={mnist_dir}", f"out_dir={out_dir}", "epochs=1", "threads=1")
    assert submit.returncode == 0, f"sbatch failed: {submit.stderr}"
    job_id = submit.stdout.strip().split(";")[0]
    state = _wait_job(job_id, deadline_s=600)
    job_log = Path(str(log).replace("%j", job_id))
    output = job_log.read_text() if job_log.exists() else f"(no job output at {job_log})"
    summary = out_dir / "summary.json"
    assert state in ("COMPLETED", "GONE") and summary.exists(), \
        f"job {job_id} ended {state}; summary.json exists: {summary.exists()}\n--- {job_log}:\n{output}"
    assert json.loads(summary.read_text())["world_size"] == 2, output
