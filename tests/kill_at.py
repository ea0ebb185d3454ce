"""Run `cskd.train` and SIGKILL it at a chosen point of its n-th file write (a crash-safety test aid).

    python tests/kill_at.py POINT N [cskd.train arguments ...]

POINT is where the process kills itself, at the N-th occurrence in this process:
  checkpoint-mid     half of checkpoint.pt's bytes are in the temp file, nothing renamed
  checkpoint-tmp     the whole temp file is written, not yet renamed over checkpoint.pt
  metrics-mid        half of a metrics.jsonl line is appended
  best               checkpoint.pt and metrics.jsonl are written, best.pt is not (a new best epoch only)
  summary            every epoch is saved, summary.json is not written
The kill is a real SIGKILL of this process: no handler, no cleanup, the OS releases what it holds.
"""
from __future__ import annotations

import io
import os
import signal
import sys

import torch

from cskd import checkpoint, rundir, train

POINT, N = sys.argv[1], int(sys.argv[2])
_count = {"n": 0}


def _kill_on_nth() -> bool:
    _count["n"] += 1
    return _count["n"] == N


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _patch() -> None:
    real_save, real_append, real_best = torch.save, rundir.append_metrics, checkpoint.save_best

    def save(obj, f, *args, **kwargs):
        if POINT.startswith("checkpoint") and str(f).rsplit("/", 1)[-1].startswith(f".{rundir.CHECKPOINT}.") \
                and _kill_on_nth():
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            with open(f, "wb") as out:
                out.write(data[: len(data) // 2] if POINT == "checkpoint-mid" else data)
            _die()
        return real_save(obj, f, *args, **kwargs)

    def append_metrics(out_dir, record):
        if POINT == "metrics-mid" and _kill_on_nth():
            line = rundir.json.dumps(record) + "\n"
            with open(os.path.join(out_dir, rundir.METRICS), "a") as out:
                out.write(line[: len(line) // 2])
            _die()
        return real_append(out_dir, record)

    def save_best(*args, **kwargs):
        if POINT == "best" and _kill_on_nth():
            _die()
        return real_best(*args, **kwargs)

    def write_summary(*args, **kwargs):
        _die()

    torch.save, rundir.append_metrics, checkpoint.save_best = save, append_metrics, save_best
    if POINT == "summary":
        rundir.write_summary = write_summary


if __name__ == "__main__":
    _patch()
    sys.exit(train.cli(sys.argv[3:]))
