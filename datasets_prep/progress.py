"""Progress of a conversion: a rich bar on a terminal; in a batch job, plain lines a log can keep.

Each line or bar says images done of the total, images/s, the time left and how many images were
skipped (--skip-bad), so a user following a Slurm job's log (`--slurm --wait` prints it) sees the
same as one watching a terminal.
"""
from __future__ import annotations

import sys
import time

LINE_EVERY_S = 30  # in a log: a line at least this often ...
LINE_EVERY_SHARE = 0.1  # ... and at every tenth of the split


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """`update(done, skipped)` as images are written; `close()` at the end (or on failure)."""

    def __init__(self, label: str, total: int, stream=None):
        self.label, self.total, self.stream = label, total, stream or sys.stderr
        self.start = self.last_time = time.monotonic()
        self.done = self.skipped = self.last_done = 0
        self.bar = None
        if self.stream.isatty():
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn,
                                       TimeRemainingColumn)

            self.bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]} images/s"), TimeRemainingColumn(),
                           TextColumn("skipped {task.fields[skipped]}"),
                           console=Console(file=self.stream), transient=True)
            self.task = self.bar.add_task(label, total=total, rate="-", skipped=0)
            self.bar.start()
        else:
            self._line(f"{label}: {total} images ...")

    def _line(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def rate(self) -> float:
        """Images per second since the start."""
        return self.done / max(time.monotonic() - self.start, 1e-9)

    def update(self, done: int, skipped: int) -> None:
        self.done, self.skipped = done, skipped
        now = time.monotonic()
        if self.bar is not None:
            if now - self.last_time > 0.2 or done == self.total:
                self.bar.update(self.task, completed=done, rate=f"{self.rate():.0f}", skipped=skipped)
                self.last_time = now
            return
        if done - self.last_done >= LINE_EVERY_SHARE * self.total or now - self.last_time >= LINE_EVERY_S:
            left = (self.total - done) / max(self.rate(), 1e-9)
            self._line(f"{self.label}: {done}/{self.total} images ({100 * done / max(self.total, 1):.0f}%), "
                       f"{self.rate():.0f} images/s, {_duration(left)} left, skipped {skipped}")
            self.last_done, self.last_time = done, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
