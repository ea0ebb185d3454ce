"""A checkpoint when the scheduler is about to stop a run (preemption, time limit).

Under Slurm, submitit catches the job's signal (USR2, `signal_delay_s` before the time limit, or at
preemption with `preempt_send_user_signal`) and requeues the job at once: the run resumes from its
last checkpoint, which with `checkpoint_every` > 1 may be several epochs old. `SignalGate` holds that
signal back until the end of the current epoch: every rank learns that some rank was signalled (one
tiny all-reduce per epoch), the trainer writes a checkpoint of that epoch, and only then is the
launcher's own handler called on every rank (submitit's rank 0 requeues; the others return).

The hold is bounded: if the epoch has not ended `grace_s` after the signal, the launcher's handler is
called anyway (the run then resumes from its last regular checkpoint, as without the gate), so a
requeue is never lost to a long epoch. The gate only acts where a launcher installed a Python handler
for the signal; a plain `torchrun` or terminal run keeps the signal's default action.
"""
from __future__ import annotations

import os
import signal
import threading

import torch

from cskd import distributed as D

# The longest hold. The grid launcher asks Slurm for its signal 2 * GRACE_S before the time limit
# (launch/submit.py), leaving the requeue time to happen; a cluster's preemption GraceTime should
# exceed it too, or a preempted run loses the epoch in progress (it still resumes from its last checkpoint).
GRACE_S = 60


class SignalGate:
    """Context manager that defers the launcher's handler of `signum` to `hand_over()` (or the grace
    deadline). Use `requested_anywhere()` at an epoch boundary to decide, on all ranks alike."""

    def __init__(self, signum: int = signal.SIGUSR2, grace_s: float = GRACE_S):
        self.signum, self.grace_s = signum, grace_s
        self.signalled = False  # this rank has had the signal
        self._launcher_handler = None  # the handler we defer to; None: the gate is inactive
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()
        self._handed_over = False

    def __enter__(self) -> SignalGate:
        current = signal.getsignal(self.signum)
        if callable(current) and threading.current_thread() is threading.main_thread():
            self._launcher_handler = current
            signal.signal(self.signum, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            if self._launcher_handler is not None:
                # A signal held past the last epoch is dropped: the run has finished (or failed), so
                # there is nothing left to checkpoint or to requeue.
                signal.signal(self.signum, self._launcher_handler)
                self._handed_over = True

    @property
    def active(self) -> bool:
        return self._launcher_handler is not None

    def _on_signal(self, signum, frame) -> None:
        # No printing here: a handler that interrupts a print of the main thread would re-enter it.
        if self._handed_over:  # hand_over() re-sent the signal: now it is the launcher's
            self._launcher_handler(signum, frame)
        elif not self.signalled:
            self.signalled = True
            self._timer = threading.Timer(self.grace_s, self.hand_over)
            self._timer.daemon = True
            self._timer.start()

    def requested_anywhere(self, device: torch.device) -> bool:
        """Whether any rank has been signalled. Collective: every rank calls it at the same point."""
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=device)
        return bool(D.all_reduce_sum(flag).item() > 0)

    def hand_over(self) -> None:
        """Deliver the signal to the launcher's handler, once, from the deadline timer's thread or from
        the trainer after its checkpoint. CPython runs handlers in the main thread as soon as it can:
        submitit's rank 0 requeues the job there and exits; its other ranks return."""
        with self._lock:
            if self._handed_over or self._launcher_handler is None:
                return
            self._handed_over = True
            if self._timer is not None:
                self._timer.cancel()
        os.kill(os.getpid(), self.signum)
