"""Training orders as pure functions of (labels, seed, epoch, world size, rank): random and class-paired.

One global permutation per (seed, epoch), computed identically on every rank; partners are drawn
for the whole permutation from the same seeded stream, so the anchors *and* partners of a global
step do not depend on the number of ranks. Rank r then takes its slice of every global step:

- full steps: `batch_size / world_size` anchors each, shards disjoint;
- the last, short step (the reference keeps it: ceil(N/B) steps, no drop_last) is split as evenly
  as possible; if it holds fewer anchors than ranks it is dropped (< world_size samples of that
  epoch, a different few each epoch), because every rank must take the same number of steps.

A class-paired step is laid out as [a_1..a_b, p_1..p_b] with label(p_i) == label(a_i), the
reference's `anchors + pairs` batch. A partner is drawn uniformly within the anchor's class,
with replacement, the anchor itself included unless `exclude_self` (reference `PairBatchSampler`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClassIndex:
    """Samples grouped by class, for vectorised partner draws."""

    by_class: np.ndarray  # sample ids sorted by label (stable)
    starts: np.ndarray  # start of each class in by_class
    counts: np.ndarray  # size of each class
    pos_in_class: np.ndarray  # position of each sample inside its class block

    @classmethod
    def build(cls, labels: np.ndarray) -> "ClassIndex":
        labels = np.asarray(labels, dtype=np.int64)
        by_class = np.argsort(labels, kind="stable")
        counts = np.bincount(labels)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pos = np.empty(len(labels), dtype=np.int64)
        pos[by_class] = np.arange(len(labels)) - starts[labels[by_class]]
        return cls(by_class, starts, counts, pos)


def draw_partners(anchors: np.ndarray, labels: np.ndarray, index: ClassIndex, uniforms: np.ndarray,
                  exclude_self: bool = False) -> np.ndarray:
    """Partner of each anchor: a uniform draw from its class given uniforms in [0, 1)."""
    y = labels[anchors]
    counts = index.counts[y]
    if exclude_self:
        candidates = np.maximum(counts - 1, 1)
        k = np.minimum((uniforms * candidates).astype(np.int64), candidates - 1)
        k += (k >= index.pos_in_class[anchors]) & (counts > 1)  # skip the anchor's own slot
    else:
        k = np.minimum((uniforms * counts).astype(np.int64), counts - 1)
    return index.by_class[index.starts[y] + k]


def rank_step_slices(num_samples: int, batch_size: int, world_size: int, rank: int) -> list[slice]:
    """Positions in the global permutation that `rank` trains on, one slice per step."""
    per_rank = batch_size // world_size
    full_steps, rest = divmod(num_samples, batch_size)
    slices = [slice(s * batch_size + rank * per_rank, s * batch_size + (rank + 1) * per_rank) for s in range(full_steps)]
    if rest >= world_size:
        bounds = np.linspace(0, rest, world_size + 1).round().astype(int) + full_steps * batch_size
        slices.append(slice(int(bounds[rank]), int(bounds[rank + 1])))
    return slices


def steps_per_epoch(num_samples: int, batch_size: int, world_size: int) -> int:
    return len(rank_step_slices(num_samples, batch_size, world_size, 0))


def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch]))


def epoch_order(labels: np.ndarray, batch_size: int, world_size: int, rank: int, seed: int, epoch: int,
                paired: bool, exclude_self: bool = False, index: ClassIndex | None = None
                ) -> tuple[np.ndarray, list[int]]:
    """This rank's sample ids for one epoch, step after step, and the number of anchors per step.

    `batch_size` is the global anchor count per step and must divide by `world_size`. For a paired
    order each step contributes 2 * anchors ids (anchors, then their partners).
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = epoch_rng(seed, epoch)
    perm = rng.permutation(len(labels))
    uniforms = rng.random(len(labels))  # drawn even when unpaired: the permutation stream stays the same
    slices = rank_step_slices(len(labels), batch_size, world_size, rank)
    if not slices:
        return np.empty(0, dtype=np.int64), []
    chunks = []
    for sl in slices:
        anchors = perm[sl]
        chunks.append(anchors)
        if paired:
            if index is None:
                index = ClassIndex.build(labels)
            chunks.append(draw_partners(anchors, labels, index, uniforms[sl], exclude_self))
    return np.concatenate(chunks).astype(np.int64), [sl.stop - sl.start for sl in slices]


def shard(num_samples: int, world_size: int, rank: int) -> np.ndarray:
    """Contiguous evaluation shard of `rank`: every sample exactly once over all ranks, no padding."""
    return np.array_split(np.arange(num_samples, dtype=np.int64), world_size)[rank]
