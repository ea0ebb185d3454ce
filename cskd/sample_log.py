"""What each training sample went through, epoch by epoch: the records behind the PS-KD paper's Fig. 2.

The trainer keeps, for every training sample and every epoch, whether the step that trained on it
classified it correctly, from the logits the step computed anyway (`StepOutput.logits`: train mode,
that epoch's augmentation, the anchors of a class-paired batch). With `log_per_sample: true` it also
keeps the probability of the sample's label ("target probability") and the largest probability.
Both are written into one tensor on the device per step (no host sync) and summed over ranks once
per epoch; every sample is trained on once per epoch (`cskd.orders`: no drop_last).

Files (rank 0 appends one row per epoch, fsynced, like metrics.jsonl; a resume cuts them back to
the checkpoint's epoch, `cut_to`):

    train_correct.bits  header, then per epoch ceil(N/8) bytes: bit i (little bit order, numpy's
                        `packbits(..., bitorder="little")`) says sample i was classified correctly
    train_probs.f16     header, then per epoch 2N float16: the target probability of samples 0..N-1,
                        then their maximum probability (only with log_per_sample)

The header is 32 bytes: an 8-byte magic, then little-endian uint64s: N, the epoch of the first row
(a run that turned `log_per_sample` on when resumed starts there), the bytes per row.
Sizes: CIFAR-100 (N = 50,000, 200 epochs) 1.25 MB of bits and 40 MB of probabilities; ImageNet
(N = 1,281,167, 90 epochs) 14.4 MB and 461 MB.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cskd import distributed as D
from cskd import rundir
from cskd.errors import RunDirError
from cskd.fileio import atomic_path

HEADER = np.dtype([("magic", "S8"), ("samples", "<u8"), ("first_epoch", "<u8"), ("row_bytes", "<u8")])
MAGIC = {rundir.TRAIN_CORRECT: b"CSKDBITS", rundir.TRAIN_PROBS: b"CSKDPF16"}


def row_bytes(name: str, samples: int) -> int:
    """The bytes of one epoch's row of file `name` for `samples` training samples."""
    return (samples + 7) // 8 if name == rundir.TRAIN_CORRECT else 2 * samples * 2


class SampleRecorder:
    """One epoch's per-sample record on the device: one row per training sample, written by the step
    that trains on it (`cskd.orders`: each sample once per epoch, on one rank, no drop_last), zero
    elsewhere, so a sum over ranks assembles the epoch. Columns: correct (0/1), and with
    `probabilities` the target and the maximum probability."""

    def __init__(self, num_samples: int, device: torch.device, probabilities: bool = False):
        self.probabilities = probabilities
        self.rows = torch.zeros(num_samples, 3 if probabilities else 1, dtype=torch.float32, device=device)

    @torch.no_grad()
    def observe(self, index: torch.Tensor, right: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Record one micro-batch: its training-set positions, whether each was classified correctly (the
        trainer computes it for the train error anyway), and its logits and labels. A few small kernels and
        no host sync: one indexed write of the bitmap, six kernels with the probabilities."""
        if not self.probabilities:
            self.rows[index, 0] = right.float()
            return
        probs = F.softmax(logits.detach().float(), dim=1)
        self.rows[index] = torch.stack([right.float(), probs.gather(1, labels[:, None]).squeeze(1), probs.amax(1)], 1)

    def end_epoch(self, is_main: bool) -> dict[str, bytes] | None:
        """Every rank calls this once per epoch (a collective). Rank 0 gets the rows to append by file
        name; the record starts over."""
        totals = D.all_reduce_sum(self.rows.clone())
        self.rows.zero_()
        if not is_main:
            return None
        totals = totals.cpu().numpy()
        rows = {rundir.TRAIN_CORRECT: np.packbits(totals[:, 0] > 0.5, bitorder="little").tobytes()}
        if self.probabilities:
            rows[rundir.TRAIN_PROBS] = np.concatenate([totals[:, 1], totals[:, 2]]).astype(np.float16).tobytes()
        return rows


def _header(path: Path) -> np.void | None:
    """The header of a per-sample file, None if the file does not exist; RunDirError if it is not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER.itemsize)
    except FileNotFoundError:
        return None
    header = np.frombuffer(raw, HEADER)[0] if len(raw) == HEADER.itemsize else None
    if header is None or header["magic"] != MAGIC[path.name] or header["row_bytes"] != row_bytes(
            path.name, int(header["samples"])):
        raise RunDirError(f"{path} is not a cskd per-sample file (bad header); delete it (the run keeps training "
                          f"without its earlier rows)")
    return header


def append_rows(run_dir: str | Path, epoch: int, samples: int, rows: dict[str, bytes]) -> None:
    """Append `epoch`'s row to each file; a missing file is created (atomically) with `epoch` as its first."""
    for name, row in rows.items():
        path = Path(run_dir) / name
        if _header(path) is None:
            header = np.array([(MAGIC[name], samples, epoch, len(row))], HEADER).tobytes()
            with atomic_path(path) as tmp:
                tmp.write_bytes(header + row)
            continue
        with open(path, "ab") as f:
            f.write(row)
            f.flush()
            os.fsync(f.fileno())


def cut_to(run_dir: str | Path, next_epoch: int, samples: int) -> list[str]:
    """Make each file end with the row of epoch `next_epoch - 1` (a resume continues at `next_epoch`).
    A file that cannot continue there (rows missing, another sample count, a bad header) is removed,
    so the next row starts it anew; returns the names of those removed."""
    removed = []
    for name in MAGIC:
        path = Path(run_dir) / name
        try:
            header = _header(path)
        except RunDirError:
            header = np.array([(b"", 0, 0, 0)], HEADER)[0]
        if header is None:
            continue
        keep = next_epoch - int(header["first_epoch"])
        size = HEADER.itemsize + keep * int(header["row_bytes"])
        if int(header["samples"]) != samples or keep < 1 or path.stat().st_size < size:
            path.unlink()
            removed.append(name)
        else:
            os.truncate(path, size)
    return removed


@dataclass(frozen=True)
class SampleRows:
    """One per-sample file: `rows[e]` is epoch `first_epoch + e`, one column per training sample."""

    first_epoch: int
    rows: np.ndarray  # (epochs, N)

    @property
    def epochs(self) -> np.ndarray:
        return self.first_epoch + np.arange(len(self.rows))


def _read(path: Path) -> tuple[int, int, np.ndarray] | None:
    header = _header(path)
    if header is None:
        return None
    data = np.fromfile(path, np.uint8, offset=HEADER.itemsize)
    n, width = int(header["samples"]), int(header["row_bytes"])
    whole = len(data) // width  # a row cut short by a crash is not an epoch
    return int(header["first_epoch"]), n, data[:whole * width].reshape(whole, width)


def read_correct(run_dir: str | Path) -> SampleRows | None:
    """Per epoch and training sample: classified correctly (bool); None if the run keeps no such file."""
    found = _read(Path(run_dir) / rundir.TRAIN_CORRECT)
    if found is None:
        return None
    first, n, raw = found
    return SampleRows(first, np.unpackbits(raw, axis=1, count=n, bitorder="little").astype(bool))


def read_probabilities(run_dir: str | Path) -> tuple[SampleRows, SampleRows] | None:
    """(target probability, maximum probability) per epoch and training sample, float32; None if the run
    did not log them (`log_per_sample`)."""
    found = _read(Path(run_dir) / rundir.TRAIN_PROBS)
    if found is None:
        return None
    first, n, raw = found
    probs = raw.view(np.float16).astype(np.float32)
    return SampleRows(first, probs[:, :n]), SampleRows(first, probs[:, n:])


def hard_to_learn(correct: np.ndarray) -> np.ndarray:
    """The training samples classified correctly in fewer than half of the epochs (PS-KD Fig. 2: "correctly
    classified less than 50 times during 300 epochs"), in training-set order; `correct` is (epochs, N)."""
    return np.flatnonzero(2 * correct.sum(axis=0) < len(correct))
