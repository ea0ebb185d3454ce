"""Shared fixtures: the real mnist5k dataset prepared once per session, and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


@pytest.fixture(scope="session")
def mnist_dir(tmp_path_factory) -> Path:
    from datasets_prep.__main__ import main as prep

    out = tmp_path_factory.mktemp("data") / "mnist5k"
    assert prep(["mnist5k", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def ddp_cskd_run(mnist_dir, tmp_path_factory):
    """One real 2-process torchrun CS-KD run on CPU (2 epochs, deterministic), shared by the tests that
    inspect a distributed run: (run dir, its CompletedProcess)."""
    out = tmp_path_factory.mktemp("ddp") / "run"
    args = train_args(mnist_dir, out, "method=cskd", "epochs=2", "deterministic=true")  # starts with -m cskd.train
    res = subprocess.run([*TORCHRUN, "--nproc_per_node=2", *args], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, res


def slurm_missing() -> str | None:
    """Why the local Slurm cannot be used (a skip reason), or None when its controller answers."""
    try:
        res = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"no Slurm here ({e}); start one with slurm/start_local.sh (.ci/run does)"
    return None if " is UP" in res.stdout else "the Slurm controller does not answer; start slurm/start_local.sh"


def wait_for(predicate, timeout: float, what: str, poll: float = 1.0):
    """`predicate()`'s first truthy value, polled every `poll` s; AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_cli(args: list[str], timeout: float = 600, env: dict | None = None, cwd: Path = REPO):
    """Run `python <args>` in a fresh process (as users do); never waits past `timeout`."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env, cwd=cwd)


def train_args(mnist_dir: Path, out_dir: Path, *overrides: str) -> list[str]:
    """A fast CPU config on mnist5k: small_cnn, 1 epoch, one thread."""
    return ["-m", "cskd.train", "--config", str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
            f"data.path={mnist_dir}", f"out_dir={out_dir}", "epochs=1", "threads=1", *overrides]


def file_tree(*roots: Path) -> dict:
    """Every file under `roots` with its size and mtime: compare before and after to prove nothing was written."""
    tree = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")) if Path(root).exists() else ():
            if p.is_file():
                st = p.stat()
                tree[str(p)] = (st.st_size, st.st_mtime_ns)
    return tree


def assert_refused(res, fragment: str, before: dict | None = None, *roots: Path) -> None:
    """A user error handled as promised: exit status 2, exactly one stderr line `error: ...` that
    contains `fragment`, no traceback, and (given `before` = file_tree(*roots)) no file written."""
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert res.returncode == 2, f"exit {res.returncode}, stderr: {res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    if before is not None:
        assert file_tree(*roots) == before, "files were written or changed"
