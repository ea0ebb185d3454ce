"""The one factory of the data path: a `LoaderSpec` from the config, and a loader from the spec.

`data.loader` picks the implementation; both yield the same batches for the same spec and shard
(`ffcv`: FFCV decode threads, `cskd.ffcv_loader`; `device`: the split held on the device,
`cskd.device_loader`), so a run may switch loader when it resumes.
"""
from __future__ import annotations

from typing import Iterator, Protocol

import torch

from cskd.batch import Batch, LoaderSpec, Sampling, Shard
from cskd.dataset import DatasetInfo


class TrainBatches(Protocol):
    """What the trainer needs of a training loader: the steps per epoch and each epoch's batches."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


class EvalBatches(Protocol):
    """Test-transformed (images, labels, sample index) batches of one rank's block of a split."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...


def loader_spec(cfg, dataset: DatasetInfo, *, world_size: int, device: torch.device,
                sampling: Sampling = Sampling(), num_views: int = 1) -> LoaderSpec:
    """What the loaders of a run read and produce, from its config (`cskd.config.Config`)."""
    d = cfg.data
    return LoaderSpec(dataset=dataset, batch_per_rank=cfg.batch_size // world_size, eval_batch=d.eval_batch_size,
                      sampling=sampling, num_views=num_views, seed=cfg.seed, pipeline=d.pipeline,
                      color_jitter=d.color_jitter, lighting=d.lighting, device=device,
                      channels_last=cfg.channels_last and device.type == "cuda",  # CUDA only, as documented
                      loader=d.loader, num_workers=d.num_workers, os_cache=d.os_cache)


def train_loader(spec: LoaderSpec, shard: Shard) -> TrainBatches:
    """This rank's training batches, epoch by epoch."""
    if spec.loader == "device":
        from cskd.device_loader import DeviceTrainLoader

        return DeviceTrainLoader(spec, shard=shard)
    from cskd.ffcv_loader import TrainLoader

    return TrainLoader(spec, shard=shard)


def eval_loader(spec: LoaderSpec, shard: Shard, split: str = "test") -> EvalBatches:
    """(images, labels, index) batches of this rank's contiguous block of `split`."""
    if spec.loader == "device":
        from cskd.device_loader import DeviceEvalLoader

        return DeviceEvalLoader(spec, shard=shard, split=split)
    from cskd.ffcv_loader import EvalLoader

    return EvalLoader(spec, shard=shard, split=split)
