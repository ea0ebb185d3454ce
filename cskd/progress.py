"""Progress reporting: a rich bar (img/s, ETA) on an interactive terminal, plain log lines otherwise.

Only the main rank reports. Nothing here reads from or queries the terminal beyond `isatty()`,
so batch jobs under Slurm get flushed plain lines.
"""
from __future__ import annotations

import sys
import time


def log(message: str) -> None:
    print(message, flush=True)


def _fmt_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class EpochProgress:
    """Reports the steps of one epoch. `update` is cheap; `note` carries values that cost a sync."""

    def __init__(self, enabled: bool, epoch: int, epochs: int, steps: int, log_every: int):
        self.enabled, self.epoch, self.epochs, self.steps, self.log_every = enabled, epoch, epochs, steps, log_every
        self.start = time.perf_counter()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[rate]:>7.0f} img/s"), TextColumn("{task.fields[note]}"),
                                TimeRemainingColumn(), transient=True)
            self.task = self.bar.add_task("train", total=steps, epoch=f"{epoch + 1}/{epochs}", rate=0.0, note="")
            self.bar.start()

    def update(self, step: int, images: int, note: str | None = None) -> None:
        """Step `step` (0-based) is done, `images` anchors so far this epoch."""
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.start
        rate = images / max(elapsed, 1e-9)
        if self.bar is not None:
            fields = {"rate": rate} | ({"note": note} if note is not None else {})
            self.bar.update(self.task, completed=step + 1, **fields)
        elif note is not None:
            eta = elapsed / (step + 1) * (self.steps - step - 1)
            log(f"epoch {self.epoch + 1}/{self.epochs} step {step + 1}/{self.steps} | {rate:.0f} img/s | {note} | "
                f"eta {_fmt_eta(eta)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
