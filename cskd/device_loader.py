"""Device-resident loaders (`data.loader: device`): a whole split held as one uint8 tensor.

A split with one fixed stored image size is read once into a single uint8 NHWC tensor on the
training device (RAM on CPU), with its labels and sample indices. Each epoch then computes the
same order as the FFCV path (`cskd.orders.epoch_order`: same seeds, same per-rank slices, same
partners), gathers every batch by indexing that tensor, and runs the same batched transform
(`cskd.batch.make_batch`) with the same seeded generator: for the same config the batches equal the
FFCV loader's, pixel for pixel, without FFCV's decode threads, JIT or host-to-device copies.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np
import torch

from cskd import orders
from cskd.augment import Transform
from cskd.batch import Batch, LoaderSpec, Shard, epoch_generator, make_batch
from cskd.beton import read_beton
from cskd.dataset import DatasetInfo, eval_ids, import_ffcv
from cskd.errors import ConfigError, DataError

RAW_MODE = 1  # ffcv.fields.rgb_image.IMAGE_MODES['raw']
MEMORY_SHARE = 0.5  # a split may take at most this share of free device memory: the model needs the rest


def free_bytes(device: torch.device) -> int:
    """Free memory on `device`: the GPU's, or the host's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(device: torch.device, ranks_on_device: int | None = None) -> float:
    """The bytes a loader may keep resident on `device`: `MEMORY_SHARE` of its free memory, divided among
    the ranks that share it (on the CPU every rank of the node holds its own copy; a GPU is one rank's).
    `ranks_on_device` defaults to this node's ranks on the CPU, 1 on a GPU."""
    if ranks_on_device is None:
        from cskd.distributed import local_world_size

        ranks_on_device = local_world_size() if device.type == "cpu" else 1
    return MEMORY_SHARE * free_bytes(device) / ranks_on_device


def _decode_all(path: str, num_samples: int) -> np.ndarray:
    """Every image of a fixed-size .beton with JPEG samples, decoded by FFCV itself (a SEQUENTIAL pass),
    so the pixels are exactly those the FFCV loader would produce."""
    import_ffcv()
    from ffcv.fields.decoders import SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(path, batch_size=1024, order=OrderOption.SEQUENTIAL, num_workers=1, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": None, "index": None})
    parts = [out[0].numpy().copy() for out in loader]  # copies: FFCV reuses its batch buffers
    images = np.concatenate(parts)
    assert len(images) == num_samples
    return images


def read_split(info: DatasetInfo, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images uint8 N x H x W x 3, labels, index) of a whole split, on `device`."""
    shape = info.image_shape[split]
    if shape is None:
        raise ConfigError(f"data.loader=device needs one fixed image size, but {info.beton(split)} stores images of "
                          f"varying sizes; re-convert the dataset with a fixed --size, or use data.loader=ffcv")
    n, (h, w) = len(info.labels[split]), shape
    need, budget = n * h * w * 3, memory_budget(device)
    if need > budget:
        raise DataError(f"data.loader=device: {info.beton(split)} needs {need / 2**30:.2f} GiB as uint8, above the "
                        f"{budget / 2**30:.2f} GiB budget on {device} ({MEMORY_SHARE:.0%} of its free memory, shared "
                        f"by the ranks on it); use data.loader=ffcv")
    beton = read_beton(info.beton(split))  # checked by open_dataset
    image_meta = beton.field("image")
    if (image_meta["mode"] == RAW_MODE).all():
        # FFCV's raw "decode" is a memcpy of the stored H x W x 3 bytes: read them directly, no FFCV import.
        data = beton.data
        images = np.empty((n, h, w, 3), dtype=np.uint8)
        size = h * w * 3
        for i, ptr in enumerate(image_meta["data_ptr"].astype(np.int64)):
            images[i] = data[ptr:ptr + size].reshape(h, w, 3)
    else:
        images = _decode_all(info.beton(split), n)
    index = np.asarray(beton.field("index"), dtype=np.int64)
    return (torch.from_numpy(images).to(device), torch.tensor(info.labels[split], device=device),
            torch.tensor(index, device=device))


class DeviceTrainLoader:
    """Drop-in for `cskd.ffcv_loader.TrainLoader`: the same batches, from a split held on the device."""

    def __init__(self, spec: LoaderSpec, *, shard: Shard = Shard(), data: tuple | None = None):
        """`data`: the split's (images, labels, index) already on `spec.device` (the synthetic split of
        `cskd.bench`); by default it is read from `spec.dataset`."""
        self.images, self.labels, self.index = data or read_split(spec.dataset, "train", spec.device)
        self.spec, self.shard = spec, shard
        self.order_args = spec.order_args(shard)
        self.steps = orders.steps_per_epoch(len(self.labels), spec.batch_per_rank * shard.world_size,
                                            shard.world_size)
        self.transform = Transform(spec.pipeline, spec.dataset.meta, spec.device, spec.channels_last,
                                   spec.color_jitter, spec.lighting)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch`, a pure function of (seed, epoch, rank): resuming replays it exactly."""
        spec = self.spec
        ids, sizes = orders.epoch_order(epoch=epoch, **self.order_args)
        ids = torch.from_numpy(ids).to(spec.device)  # one copy per epoch, then index arithmetic on the device
        gen = epoch_generator(spec.seed, epoch, self.shard.rank, spec.device)
        factor = 2 if spec.paired else 1
        start = 0
        for step, size in enumerate(sizes):
            sel = ids[start:start + factor * size]
            start += factor * size
            # index_select copies whole rows; advanced indexing goes element by element (7x slower on CPU)
            images, labels, index = (t.index_select(0, sel) for t in (self.images, self.labels, self.index))
            yield make_batch(images, labels, index, paired=spec.paired, transform=self.transform, generator=gen,
                             num_views=spec.num_views, epoch=epoch, step=step)


class DeviceEvalLoader:
    """Drop-in for `cskd.ffcv_loader.EvalLoader`: this rank's contiguous shard, held on the device."""

    def __init__(self, spec: LoaderSpec, *, shard: Shard = Shard(), split: str = "test", data: tuple | None = None):
        """`data`: as `DeviceTrainLoader`'s, the whole split's."""
        ids = torch.from_numpy(eval_ids(spec.dataset, split, shard)).to(spec.device)
        images, labels, index = data or read_split(spec.dataset, split, spec.device)
        self.images, self.labels, self.index = images[ids], labels[ids], index[ids]
        self.batch_size = spec.eval_batch
        self.transform = Transform(spec.pipeline, spec.dataset.meta, spec.device, spec.channels_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(self.labels), self.batch_size):
            sl = slice(start, start + self.batch_size)
            yield self.transform.test(self.images[sl]), self.labels[sl], self.index[sl]
