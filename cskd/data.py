"""Datasets prepared by `datasets_prep` (train/test .beton + meta.json), read through FFCV.

FFCV reads, decodes and batches in its own threads, in the order given by `cskd.orders` (random
or class-paired, sharded per rank); the pipeline's augmentation and normalisation then run batched
in torch (`cskd.augment`) with a generator seeded from (seed, epoch, rank), so an epoch's batches
are a pure function of the config and the epoch number: resuming at an epoch boundary replays it
exactly. Exception: variable-size stored images (max-side JPEGs) are cropped by FFCV's
RandomResizedCrop / CenterCrop decoders, whose draws are unseeded, so those crops are not replayed.
`cskd.device_data` reads fixed-size splits into one device tensor and yields the same batches.
"""
from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from cskd import orders
from cskd.augment import PIPELINES, Transform
from cskd.errors import ConfigError, DataError
from cskd.methods.base import Batch, Sampling

SPLITS = ("train", "test")
FIELDS = ("image", "label", "index")
KNOWN_DATASETS = ("mnist5k",)


def _prep_hint(path: Path) -> str:
    name = path.name if path.name in KNOWN_DATASETS else "NAME"
    return f"prepare it with: python -m datasets_prep {name} --out {path}"


@dataclass
class DatasetInfo:
    """A prepared dataset: its meta.json and the labels of each split, read from the .beton files."""

    path: Path
    meta: dict
    labels: dict[str, np.ndarray]
    image_shape: dict[str, tuple[int, int] | None]  # (height, width) of every stored image; None: sizes vary

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def beton(self, split: str) -> str:
        return str(self.path / f"{split}.beton")


def _read_beton(path: Path, expected_bytes: int | None, hint: str
                ) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Labels and fixed image shape (None if sizes vary) of a .beton after checking it is complete."""
    _import_ffcv()
    from ffcv.reader import Reader

    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise DataError(f"{path} has {size} bytes but meta.json records {expected_bytes}: it is truncated or "
                        f"was modified; {hint} --force")
    try:
        reader = Reader(str(path))
        end = int((reader.alloc_table["ptr"] + reader.alloc_table["size"]).max(initial=0))
    except Exception as e:  # FFCV raises assorted errors (AssertionError, IndexError, ValueError) on bad files
        raise DataError(f"{path} is not a readable FFCV file ({type(e).__name__}: {e}); {hint} --force") from None
    if end > size or len(reader.alloc_table) < reader.num_samples:
        raise DataError(f"{path} is truncated (its samples need {end} bytes, the file has {size}); {hint} --force")
    missing = [f for f in FIELDS if f not in reader.field_names]
    if missing:
        raise DataError(f"{path} lacks the field(s) {', '.join(missing)} (has {', '.join(reader.field_names)}); {hint} --force")
    images = reader.metadata[f"f{reader.field_names.index('image')}"]
    fixed = len(images) and all(images[k].min() == images[k].max() for k in ("height", "width"))
    shape = (int(images["height"][0]), int(images["width"][0])) if fixed else None
    return np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64), shape


def open_dataset(path: str) -> DatasetInfo:
    """Check a prepared dataset directory and read its metadata; every failure names the fix."""
    root = Path(path)
    hint = _prep_hint(root)
    if not root.is_dir():
        raise DataError(f"data.path {root} does not exist; {hint}")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"data.path {root} has no meta.json (not a prepared dataset); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
        files, num_classes = meta["files"], int(meta["num_classes"])
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{meta_path} is unreadable or lacks {e}; {hint} --force") from None
    labels, shapes = {}, {}
    for split in SPLITS:
        beton = root / f"{split}.beton"
        if not beton.is_file():
            raise DataError(f"data.path {root} has no {split}.beton; {hint} --force")
        labels[split], shapes[split] = _read_beton(beton, files.get(f"{split}.beton", {}).get("bytes"), hint)
        if len(labels[split]) and not 0 <= labels[split].min() <= labels[split].max() < num_classes:
            raise DataError(f"{beton} has labels outside 0..{num_classes - 1} (meta.json num_classes); {hint} --force")
    return DatasetInfo(root, meta, labels, shapes)


# --- FFCV plumbing ----------------------------------------------------------------------------

def _import_ffcv() -> None:
    """Import FFCV without letting it change torch's intra-op thread count.

    FFCV's Compiler.set_num_threads also calls torch.set_num_threads: once with 1 at import, then
    with num_workers from its loader thread at every epoch. Keep only its numba part."""
    import numba

    threads = torch.get_num_threads()
    from ffcv.pipeline.compiler import Compiler

    def set_num_threads(cls, n):
        cls.num_threads = n if n >= 1 else os.cpu_count()
        numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

    Compiler.set_num_threads = classmethod(set_num_threads)
    torch.set_num_threads(threads)


def _order_factory(order_cls, **kwargs):
    """Loader kwargs for a custom order. FFCV 1.0.2 only accepts an order *instance* that it then
    calls with the loader (fixed upstream by PR #302, never released); main takes class + kwargs."""
    from ffcv.loader import Loader
    from ffcv.traversal_order.base import TraversalOrder

    if "order_kwargs" in inspect.signature(Loader.__init__).parameters:
        return {"order": order_cls, "order_kwargs": kwargs}

    class OrderSpec(TraversalOrder):
        def __init__(self):  # deliberately no super().__init__: there is no loader yet
            pass

        def __call__(self, loader):
            return order_cls(loader, **kwargs)

        def sample_order(self, epoch):
            raise NotImplementedError

    return {"order": OrderSpec()}


def _make_orders():
    from ffcv.traversal_order.base import TraversalOrder

    class EpochOrder(TraversalOrder):
        """This rank's random or class-paired order; FFCV passes its `next_epoch` counter."""

        def __init__(self, loader, labels, batch_size, world_size, rank, seed, paired, exclude_self):
            super().__init__(loader)
            self.args = dict(labels=labels, batch_size=batch_size, world_size=world_size, rank=rank, seed=seed,
                             paired=paired, exclude_self=exclude_self, index=orders.ClassIndex.build(labels))

        def sample_order(self, epoch):
            return orders.epoch_order(epoch=epoch, **self.args)[0]

    class FixedOrder(TraversalOrder):
        def __init__(self, loader, ids):
            super().__init__(loader)
            self.ids = ids

        def sample_order(self, epoch):
            return self.ids

    return EpochOrder, FixedOrder


def _image_decoder(info: DatasetInfo, split: str, pipeline: str, train: bool):
    """(decoder, cropped_by_decoder): FFCV's plain decoder for fixed-size images; for variable sizes
    its RandomResizedCrop / CenterCrop(224/256) decoders, the only way to batch such images."""
    from ffcv.fields.decoders import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                      SimpleRGBImageDecoder)

    if info.image_shape[split] is not None:
        return SimpleRGBImageDecoder(), False
    spec = PIPELINES[pipeline]
    if not (spec.rrc and spec.center_crop):
        raise ConfigError(f"{info.beton(split)} stores images of varying sizes, which data.pipeline={pipeline} "
                          f"cannot batch; use data.pipeline=imagenet224, or re-convert with a fixed --size")
    if train:
        return RandomResizedCropRGBImageDecoder((spec.rrc, spec.rrc)), True
    return CenterCropRGBImageDecoder((spec.center_crop, spec.center_crop), ratio=spec.center_crop / spec.resize), True


def _loader(path: str, batch_size: int, order: dict, num_workers: int, os_cache: bool, device: torch.device,
            decoder):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import ToDevice, ToTensor

    to_device = [ToDevice(device, non_blocking=True)] if device.type == "cuda" else []
    pipelines = {
        "image": [decoder, ToTensor(), *to_device],
        "label": [IntDecoder(), ToTensor(), *to_device],
        "index": [IntDecoder(), ToTensor(), *to_device],
    }
    return Loader(path, batch_size=batch_size, num_workers=num_workers, os_cache=os_cache, drop_last=False,
                  pipelines=pipelines, **order)


def _close(it) -> None:
    """FFCV leaves its epoch thread running when a loop is left early (#345, #393): stop and join it."""
    it.close()
    it.join(timeout=10)


def epoch_generator(seed: int, epoch: int, rank: int, device: torch.device) -> torch.Generator:
    """The augmentation RNG of one (seed, epoch, rank): epochs replay whatever ran before."""
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0]))
    return g


def make_batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, paired: bool, transform: Transform,
               generator: torch.Generator, num_views: int, epoch: int, step: int) -> Batch:
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


class TrainLoader:
    """Augmented, normalised training batches for one rank, epoch by epoch, read through FFCV."""

    def __init__(self, info: DatasetInfo, per_rank_batch: int, world_size: int, rank: int, seed: int,
                 sampling: Sampling, num_views: int, pipeline: str, num_workers: int, os_cache: bool,
                 device: torch.device, channels_last: bool, color_jitter: float = 0.0, lighting: float = 0.0):
        EpochOrder, _ = _make_orders()
        self.paired = sampling.kind == "class_pairs"
        order = _order_factory(EpochOrder, labels=info.labels["train"], batch_size=per_rank_batch * world_size,
                               world_size=world_size, rank=rank, seed=seed, paired=self.paired,
                               exclude_self=sampling.exclude_self)
        factor = 2 if self.paired else 1
        decoder, cropped = _image_decoder(info, "train", pipeline, train=True)
        self.loader = _loader(info.beton("train"), factor * per_rank_batch, order, num_workers, os_cache, device,
                              decoder)
        self.seed, self.rank, self.device, self.num_views = seed, rank, device, num_views
        self.transform = Transform(pipeline, info.meta, device, channels_last, color_jitter, lighting, cropped)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch`, whatever epochs were (or were not) iterated before."""
        self.loader.next_epoch = epoch
        gen = epoch_generator(self.seed, epoch, self.rank, self.device)
        it = iter(self.loader)
        try:
            for step, (images, labels, index) in enumerate(it):
                labels, index = labels.view(-1).clone(), index.view(-1).clone()  # FFCV reuses its buffers
                yield make_batch(images, labels, index, self.paired, self.transform, gen, self.num_views, epoch, step)
        finally:
            _close(it)


class EvalLoader:
    """Test-transformed batches of this rank's contiguous shard of a split (no padding, no duplicates)."""

    def __init__(self, info: DatasetInfo, split: str, batch_size: int, world_size: int, rank: int,
                 num_workers: int, os_cache: bool, device: torch.device, channels_last: bool, pipeline: str):
        _, FixedOrder = _make_orders()
        ids = shard_ids(info, split, world_size, rank)
        decoder, cropped = _image_decoder(info, split, pipeline, train=False)
        self.loader = _loader(info.beton(split), batch_size, _order_factory(FixedOrder, ids=ids), num_workers,
                              os_cache, device, decoder)
        self.transform = Transform(pipeline, info.meta, device, channels_last, decoded_crop=cropped)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        try:
            for images, labels, index in it:
                yield self.transform.test(images), labels.view(-1).clone(), index.view(-1).clone()
        finally:
            _close(it)


def shard_ids(info: DatasetInfo, split: str, world_size: int, rank: int) -> np.ndarray:
    """This rank's evaluation ids (cskd.orders.shard), after checking every rank gets at least one."""
    if len(info.labels[split]) < world_size:
        raise DataError(f"{info.beton(split)} has {len(info.labels[split])} samples, fewer than the "
                        f"{world_size} ranks; use fewer processes")
    return orders.shard(len(info.labels[split]), world_size, rank)
