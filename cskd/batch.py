"""The contract of the data path: what a loader is asked for, and what it delivers to a method.

Loaders (`cskd.ffcv_loader`, `cskd.device_loader`, picked by `cskd.loaders`) read a `LoaderSpec`
and a `Shard` and yield `Batch`es; methods (`cskd.methods`) state the `Sampling` they need and
consume `Batch`es. Both sides depend on this module, neither on the other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from cskd import orders

if TYPE_CHECKING:
    from cskd.augment import Transform
    from cskd.dataset import DatasetInfo


@dataclass(frozen=True)
class Sampling:
    """How the training order is drawn. `class_pairs`: batch = B anchors then B same-class partners."""

    kind: str = "random"  # "random" or "class_pairs"
    exclude_self: bool = False  # class_pairs: never pair a sample with itself (classes of size > 1)


@dataclass
class Batch:
    """One training step's data on the device, augmented and normalised."""

    images: torch.Tensor  # anchors, (B, C, H, W)
    labels: torch.Tensor  # (B,) int64
    index: torch.Tensor  # (B,) int64, position of each sample in the training set
    pair_images: torch.Tensor | None = None  # class_pairs: partner i has the label of anchor i
    pair_labels: torch.Tensor | None = None
    pair_index: torch.Tensor | None = None
    views: list[torch.Tensor] = field(default_factory=list)  # num_views - 1 extra views of the anchors
    epoch: int = 0
    step: int = 0


@dataclass(frozen=True)
class Shard:
    """Which part of every global step (and of the test split) this process handles."""

    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True, kw_only=True, eq=False)  # eq=False: compared by identity, never by its arrays
class LoaderSpec:
    """Everything a loader needs to know, built once from the config (`cskd.loaders.loader_spec`)."""

    dataset: DatasetInfo  # what to read
    batch_per_rank: int  # anchors per rank and step (class-paired orders add as many partners)
    eval_batch: int = 500  # test samples per rank and step
    sampling: Sampling = Sampling()
    num_views: int = 1  # augmented views of each anchor (the first is Batch.images)
    seed: int = 0  # of the order and the augmentation
    pipeline: str = "cifar"  # cskd.augment.PIPELINES
    color_jitter: float = 0.0
    lighting: float = 0.0
    device: torch.device = torch.device("cpu")
    channels_last: bool = False
    loader: str = "ffcv"  # "ffcv" (decode threads), "device" (the split held as one tensor), "jpeg" (decoded there)
    num_workers: int = 1  # FFCV decode threads
    os_cache: bool = True  # FFCV: share the page cache between the ranks of a node
    why: str = ""  # why this loader (and thread count): said in the run's log

    @property
    def paired(self) -> bool:
        return self.sampling.kind == "class_pairs"

    def order_args(self, shard: Shard) -> dict:
        """Keyword arguments of `cskd.orders.epoch_order` (all but the epoch) for this shard."""
        labels = self.dataset.labels["train"]
        return dict(labels=labels, batch_size=self.batch_per_rank * shard.world_size, world_size=shard.world_size,
                    rank=shard.rank, seed=self.seed, paired=self.paired, exclude_self=self.sampling.exclude_self,
                    index=orders.ClassIndex.build(labels))


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The augmentation RNG of one (seed, epoch, rank): epochs replay whatever ran before."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
    return g


def make_batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, *, paired: bool,
               transform: Transform, generator: torch.Generator, num_views: int, epoch: int, step: int) -> Batch:
    """One step's Batch from its raw uint8 NHWC images (anchors, then partners if paired).

    Shared by both loaders, so the same raw batch and generator give the same pixels."""
    x = transform.train(images, generator)  # anchors and partners augmented independently
    if paired:
        n = len(labels) // 2
        batch = Batch(x[:n], labels[:n], index[:n], x[n:], labels[n:], index[n:], epoch=epoch, step=step)
        images = images[:n]
    else:
        batch = Batch(x, labels, index, epoch=epoch, step=step)
    batch.views = [transform.train(images, generator) for _ in range(num_views - 1)]
    return batch


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`batch` cut into `parts` micro-batches of consecutive anchors (sizes differ by at most one),
    each anchor kept with its partner and views.

    Every rank cuts every step into the same number of parts, so the collectives of the forwards
    (FSDP's parameter gathers, PS-KD's table gather) pair up across ranks. The exception is a last
    step with fewer anchors than ranks x parts: a shard of n < parts anchors makes n parts."""
    parts = max(1, min(parts, len(batch.labels)))
    if parts == 1:
        return [batch]

    def cut(t: torch.Tensor | None):
        return [None] * parts if t is None else torch.tensor_split(t, parts)

    pieces = zip(cut(batch.images), cut(batch.labels), cut(batch.index), cut(batch.pair_images),
                 cut(batch.pair_labels), cut(batch.pair_index), *(cut(v) for v in batch.views))
    return [Batch(x, y, i, px, py, pi, list(views), epoch=batch.epoch, step=batch.step)
            for x, y, i, px, py, pi, *views in pieces]
