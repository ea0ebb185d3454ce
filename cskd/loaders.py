"""The one factory of the data path: a `LoaderSpec` from the config, and a loader from the spec.

`data.loader` picks the implementation; `ffcv` and `device` yield the same batches for the same spec
and shard (`ffcv`: FFCV decode threads, `cskd.ffcv_loader`; `device`: the split held on the device,
`cskd.device_loader`), so a run may switch between them when it resumes. `jpeg` (`cskd.jpeg_loader`)
decodes JPEG-stored splits on the run's device (nvJPEG on a GPU): the same orders and batch structure,
seeded crops, but its own resampling (pixels a few levels off FFCV's); it is opt-in until its speed
on a GPU has been measured. `auto` (the default) takes the device loader when both splits have one
fixed image size and fit the memory budget, else FFCV.
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


def device_fit_problem(dataset: DatasetInfo, device: torch.device, ranks_on_device: int = 1) -> str | None:
    """Why the device loader cannot hold `dataset`'s train and test splits on `device`, or None.

    Budget: `cskd.device_loader.memory_budget`."""
    from cskd.device_loader import memory_budget

    need = 0
    for split in ("train", "test"):
        shape = dataset.image_shape[split]
        if shape is None:
            return f"{dataset.beton(split)} stores images of varying sizes"
        need += len(dataset.labels[split]) * shape[0] * shape[1] * 3
    budget = memory_budget(device, ranks_on_device)
    if need > budget:
        return f"its splits need {need / 2**30:.2f} GiB as uint8, above the {budget / 2**30:.2f} GiB budget on {device}"
    return None


def choose_loader(requested: str, dataset: DatasetInfo, device: torch.device, ranks_on_device: int) -> tuple[str, str]:
    """(loader, why): `requested` unless it is `auto`, which takes the device loader where it fits."""
    if requested != "auto":
        return requested, "data.loader=" + requested
    problem = device_fit_problem(dataset, device, ranks_on_device)
    if problem is None:
        return "device", "data.loader=auto: the splits fit in memory"
    return "ffcv", f"data.loader=auto: FFCV, since {problem}"


def loader_spec(cfg, dataset: DatasetInfo, *, world_size: int, device: torch.device,
                sampling: Sampling = Sampling(), num_views: int = 1, local_world_size: int = 1) -> LoaderSpec:
    """What the loaders of a run read and produce, from its config (`cskd.config.Config`)."""
    from cskd.distributed import cpus_per_rank

    d = cfg.data
    ranks_on_device = local_world_size if device.type == "cpu" else 1
    loader, why = choose_loader(d.loader, dataset, device, ranks_on_device)
    num_workers = d.num_workers or cpus_per_rank()
    threads = {"ffcv": "FFCV threads", "jpeg": "decode threads" if device.type == "cpu" else ""}.get(loader)
    return LoaderSpec(dataset=dataset, batch_per_rank=cfg.batch.global_ // world_size, eval_batch=d.eval_batch_size,
                      sampling=sampling, num_views=num_views, seed=cfg.seed, pipeline=d.pipeline,
                      color_jitter=d.color_jitter, lighting=d.lighting, device=device,
                      channels_last=cfg.channels_last and device.type == "cuda",  # CUDA only, as documented
                      loader=loader, num_workers=num_workers, os_cache=d.os_cache,
                      why=f"{why}; {num_workers} {threads}" if threads else why)


def train_loader(spec: LoaderSpec, shard: Shard) -> TrainBatches:
    """This rank's training batches, epoch by epoch."""
    if spec.loader == "device":
        from cskd.device_loader import DeviceTrainLoader

        return DeviceTrainLoader(spec, shard=shard)
    if spec.loader == "jpeg":
        from cskd.jpeg_loader import JpegTrainLoader

        return JpegTrainLoader(spec, shard=shard)
    from cskd.ffcv_loader import TrainLoader

    return TrainLoader(spec, shard=shard)


def eval_loader(spec: LoaderSpec, shard: Shard, split: str = "test") -> EvalBatches:
    """(images, labels, index) batches of this rank's contiguous block of `split`."""
    if spec.loader == "device":
        from cskd.device_loader import DeviceEvalLoader

        return DeviceEvalLoader(spec, shard=shard, split=split)
    if spec.loader == "jpeg":
        from cskd.jpeg_loader import JpegEvalLoader

        return JpegEvalLoader(spec, shard=shard, split=split)
    from cskd.ffcv_loader import EvalLoader

    return EvalLoader(spec, shard=shard, split=split)
