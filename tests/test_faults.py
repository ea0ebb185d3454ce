"""One writer per run dir, no resume on other data, and exact resume after a SIGKILL anywhere."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml

from cskd import rundir
from cskd.errors import RunDirError
from cskd.lock import DirLock, LockedError
from conftest import REPO, assert_refused, run_cli, train_args
from launch import runs

KILL_AT = str(REPO / "tests" / "kill_at.py")


def _wait_for(condition, what: str, proc: subprocess.Popen | None = None, timeout: float = 180):
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc is None or proc.poll() is None, f"the process ended before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_dir_lock_excludes_names_its_holder_and_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    first = DirLock(run, rundir.LOCK, "run dir").acquire()
    assert run.is_dir() and rundir.lock_holder(run)["pid"] == os.getpid()
    start = time.monotonic()
    with pytest.raises(LockedError, match=rf"{run} is in use by another process \(host \S+, pid {os.getpid()}"):
        DirLock(run, rundir.LOCK, "run dir").acquire(wait_s=0.3)  # a second open file: flock excludes it too
    assert time.monotonic() - start < 2
    first.release()
    assert rundir.lock_holder(run) is None and not run.exists()  # made only for the lock: removed again

    (run).mkdir()
    (run / rundir.LOCK).write_text('{"pid": 1}')  # left by a process that died: not held, so free
    with DirLock(run, rundir.LOCK, "run dir"):
        assert rundir.lock_holder(run)["pid"] == os.getpid()
    assert list(run.iterdir()) == []

    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        DirLock(tmp_path / "file", rundir.LOCK, "run dir").acquire()


def test_a_locked_run_is_running_whatever_its_job_record_says(tmp_path, monkeypatch):
    """A run whose Slurm job is gone (or whose local launcher died) but whose dir a live process holds
    is reported running, so no launcher submits a second writer."""
    dirs = [tmp_path / "slurm_run", tmp_path / "local_run"]
    runs.write_job_record(dirs[0], "slurm", "77_1", None)
    runs.write_job_record(dirs[1], "local", "9", None, pid=2 ** 22 + 1, job_pid=2 ** 22 + 2)  # dead pids
    monkeypatch.setattr(runs.slurm, "job_states", lambda ids: {i: "FAILED" for i in ids})
    assert [s.state for s in runs.statuses(dirs).values()] == ["failed", "failed"]
    with DirLock(dirs[0], rundir.LOCK, "run dir"), DirLock(dirs[1], rundir.LOCK, "run dir"):
        status = runs.statuses(dirs)
        assert [s.state for s in status.values()] == ["running", "running"]
        assert "locked by host" in status[dirs[0]].detail and f"pid {os.getpid()}" in status[dirs[0]].detail


def test_second_trainer_fails_at_once_naming_the_first(mnist_dir, tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, *train_args(mnist_dir, out, "epochs=50")], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: rundir.lock_holder(out) is not None, "the first trainer's lock", first)
        start = time.monotonic()
        second = run_cli(train_args(mnist_dir, out, "epochs=50"), timeout=60)
        elapsed = time.monotonic() - start
        assert_refused(second, "is in use by another process (host ")
        # At once: refused while the first still trains its 50 epochs (minutes), not after waiting for
        # the lock. The bound is loose: a fresh process imports torch beside a trainer on 2 cores.
        assert first.poll() is None and elapsed < 30, elapsed
        assert f"pid {first.pid}," in second.stderr, second.stderr
    finally:
        first.kill()
        first.wait(timeout=30)
    # The OS dropped the SIGKILLed trainer's lock: the run dir is free at once.
    assert rundir.lock_holder(out) is None
    DirLock(out, rundir.LOCK, "run dir").acquire(wait_s=0).release()


def test_relaunch_after_killing_the_launcher_starts_no_duplicate(mnist_dir, tmp_path):
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "base": str(REPO / "configs" / "mnist5k_small_cnn.yaml"), "seeds": [0],
                                    "overrides": {"data.path": str(mnist_dir), "epochs": 5}}))
    command = [str(REPO / "launch" / "grid.py"), "--grid", str(grid), "--out", str(tmp_path / "out"), "--parallel", "1"]
    launcher = subprocess.Popen([sys.executable, *command], cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "out" / "mnist5k" / "small_cnn" / "ce" / "seed0"
    _wait_for(lambda: rundir.lock_holder(run_dir) is not None, "the run's lock", launcher)
    orphan = rundir.lock_holder(run_dir)["pid"]
    launcher.kill()  # the launcher dies; its training job lives on
    launcher.wait(timeout=30)
    try:
        relaunch = run_cli(command, timeout=120)
        assert "skip" in relaunch.stdout and "running" in relaunch.stdout, relaunch.stdout
        assert relaunch.returncode == 1 and "locked by host" in relaunch.stderr  # reported as not done
        assert rundir.lock_holder(run_dir)["pid"] == orphan
        _wait_for(lambda: (run_dir / rundir.SUMMARY).exists(), "the orphaned run to finish")
    finally:
        if rundir.lock_holder(run_dir):
            os.kill(orphan, signal.SIGKILL)
    epochs = [json.loads(line)["epoch"] for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    assert epochs == [0, 1, 2, 3, 4]  # one writer: no interleaved or repeated epochs
    again = run_cli(command, timeout=120)
    assert again.returncode == 0 and "skip" in again.stdout and "(done" in again.stdout


def test_resume_on_reconverted_data_is_refused(mnist_dir, tmp_path):
    data = tmp_path / "mnist5k"
    shutil.copytree(mnist_dir, data)
    out = tmp_path / "run"
    killed = run_cli([KILL_AT, "summary", "1", *train_args(data, out)[2:]])  # [2:]: not `-m cskd.train`
    assert killed.returncode == -signal.SIGKILL and (out / rundir.CHECKPOINT).exists()
    prep = run_cli(["-m", "datasets_prep", "mnist5k", "--out", str(data), "--seed", "1", "--force"])
    assert prep.returncode == 0, prep.stderr
    resumed = run_cli(train_args(data, out))
    assert_refused(resumed, "was trained on other data: test.beton had sha256")
    assert "pass --force to start this run over" in resumed.stderr and not (out / rundir.SUMMARY).exists()


# Where the chain of runs below is killed, in order: (kill_at.py point, its occurrence in that process)
# or "time", a random moment 0.5-5 s after the process takes the run dir's lock (start-up or
# training). Each run resumes the previous one's remains; "best" comes first because a fresh run's
# first epoch is always a new best, and no point can be skipped by a run that already finished.
KILLS = [("best", 1), "time", ("checkpoint-mid", 1), "time", ("checkpoint-tmp", 1), ("metrics-mid", 1), "time",
         ("checkpoint-mid", 1), ("metrics-mid", 1), ("summary", 1)]


def test_sigkill_at_ten_points_resumes_to_the_uninterrupted_result(mnist_dir, tmp_path):
    args = ["method=cskd", "epochs=6", "deterministic=true", "log_per_sample=true"]
    straight = run_cli(train_args(mnist_dir, tmp_path / "straight", *args))
    assert straight.returncode == 0, straight.stderr
    out, rng = tmp_path / "killed", random.Random(0)
    for point in KILLS:
        if point == "time":
            proc = subprocess.Popen([sys.executable, *train_args(mnist_dir, out, *args)], cwd=REPO,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            _wait_for(lambda: rundir.lock_holder(out) is not None, "the run's lock", proc)
            time.sleep(rng.uniform(0.5, 5.0))
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
            continue
        res = run_cli([KILL_AT, point[0], str(point[1]), *train_args(mnist_dir, out, *args)[2:]])
        assert res.returncode == -signal.SIGKILL, (point, res.returncode, res.stderr[-2000:])
    assert not (out / rundir.SUMMARY).exists()
    final = run_cli(train_args(mnist_dir, out, *args))
    assert final.returncode == 0, final.stderr
    a, b = (json.loads((d / rundir.SUMMARY).read_text()) for d in (tmp_path / "straight", out))
    assert a["final"] == b["final"] and a["best"] == b["best"]
    history = [json.loads(line)["test"] for line in (out / rundir.METRICS).read_text().splitlines()]
    assert history == [json.loads(line)["test"] for line in (tmp_path / "straight" / rundir.METRICS).read_text()
                       .splitlines()]
    for name in (rundir.TRAIN_CORRECT, rundir.TRAIN_PROBS):  # rows of killed epochs were cut, then written again
        assert (out / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name
    # No temp file of an interrupted write and no lock file is left behind.
    assert sorted(p.name for p in out.iterdir()) == sorted(rundir.ARTIFACTS)
