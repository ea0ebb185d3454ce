"""The scheduler's warning signal is held until the epoch's checkpoint (cskd.preempt.SignalGate)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pytest
import torch

from cskd import checkpoint as ckpt
from cskd import rundir
from cskd.preempt import SignalGate
from conftest import REPO, TORCHRUN, train_args


@pytest.fixture
def launcher():
    """A stand-in for submitit's USR2 handler: records the calls and the thread they ran in."""
    calls = []

    def handler(signum, frame):
        calls.append((signum, threading.current_thread() is threading.main_thread()))

    previous = signal.signal(signal.SIGUSR2, handler)
    yield handler, calls
    signal.signal(signal.SIGUSR2, previous)


def test_signal_is_held_until_hand_over_then_delivered_once(launcher):
    handler, calls = launcher
    with SignalGate(grace_s=30) as gate:
        assert gate.active and not gate.requested_anywhere(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)  # a second warning changes nothing
        assert calls == [] and gate.requested_anywhere(torch.device("cpu"))
        gate.hand_over()
        gate.hand_over()
        assert calls == [(signal.SIGUSR2, True)]
    assert signal.getsignal(signal.SIGUSR2) is handler


def test_an_epoch_that_does_not_end_in_time_hands_over_at_the_deadline(launcher):
    _, calls = launcher
    with SignalGate(grace_s=0.2):
        os.kill(os.getpid(), signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
        assert calls == [(signal.SIGUSR2, True)]  # run by the main thread, as submitit's handler must be


def test_a_signal_after_the_last_epoch_is_dropped(launcher):
    handler, calls = launcher
    with SignalGate(grace_s=0.2):
        os.kill(os.getpid(), signal.SIGUSR2)
    time.sleep(0.4)
    assert calls == [] and signal.getsignal(signal.SIGUSR2) is handler


def test_without_a_launcher_handler_the_gate_leaves_the_signal_alone():
    assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    with SignalGate() as gate:
        assert not gate.active and signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL


# Each rank of a torchrun job under a launcher that handles USR2 like submitit: rank 0 exits in the
# handler (after requeueing), the other ranks return from it. The handler notes whether the
# checkpoint was on disk when it was called.
WRAPPER = """
import os, signal, sys
marks, checkpoint = sys.argv[1], sys.argv[2]
rank = os.environ["RANK"]
open(os.path.join(marks, "pid" + rank), "w").write(str(os.getpid()))
def launcher(signum, frame):
    open(os.path.join(marks, "handed" + rank), "w").write(str(os.path.exists(checkpoint)))
    if rank == "0":
        sys.exit(-1)
signal.signal(signal.SIGUSR2, launcher)
from cskd.train import cli
sys.exit(cli(sys.argv[3:]))
"""


def test_signalled_rank_makes_every_rank_checkpoint_the_epoch_then_hand_over(mnist_dir, ddp_cskd_run, tmp_path):
    """checkpoint_every=100 would save nothing before the last epoch: the signal (to rank 1 only) makes
    both ranks checkpoint epoch 1 and call their launcher's handler; the resumed run ends exactly where
    the uninterrupted 2-process run did."""
    reference, _ = ddp_cskd_run
    out, marks = tmp_path / "run", tmp_path / "marks"
    marks.mkdir()
    script = tmp_path / "launcher.py"
    script.write_text(WRAPPER)
    args = train_args(mnist_dir, out, "method=cskd", "epochs=2", "deterministic=true", "checkpoint_every=100")[2:]
    proc = subprocess.Popen([*TORCHRUN, "--nproc_per_node=2", str(script), str(marks), str(out / rundir.CHECKPOINT),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"})
    try:
        for line in proc.stdout:  # setup is done (on every rank: it has collectives) when this line is out
            if "steps/epoch" in line:
                os.kill(int((marks / "pid1").read_text()), signal.SIGUSR2)
                break
        rest = proc.communicate(timeout=300)[0]
    finally:
        proc.kill()
    assert "checkpointed after the scheduler's signal" in rest, rest[-3000:]
    assert (marks / "handed0").read_text() == "True" and (marks / "handed1").read_text() == "True"
    saved = ckpt.load(out / rundir.CHECKPOINT)
    assert saved["epoch"] == 0 and not (out / rundir.SUMMARY).exists()

    resumed = subprocess.run([*TORCHRUN, "--nproc_per_node=2", *train_args(mnist_dir, out, *args[-4:])],
                             capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0 and "resuming" in resumed.stdout + resumed.stderr, resumed.stderr[-3000:]
    got, want = (json.loads((d / rundir.SUMMARY).read_text()) for d in (out, reference))
    assert got["final"] == want["final"] and got["best"] == want["best"]
