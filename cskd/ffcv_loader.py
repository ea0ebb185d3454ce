"""Training and evaluation batches read through FFCV (`data.loader: ffcv`, the default).

FFCV reads, decodes and batches in its own threads, in the order given by `cskd.orders` (random
or class-paired, sharded per rank); the pipeline's augmentation and normalisation then run batched
in torch (`cskd.augment`) with a generator seeded from (seed, epoch, rank), so an epoch's batches
are a pure function of the config and the epoch number: resuming at an epoch boundary replays it
exactly. Exception: variable-size stored images (max-side JPEGs) are cropped by FFCV's
RandomResizedCrop / CenterCrop decoders, whose draws are unseeded, so those crops are not replayed.
`cskd.device_loader` reads fixed-size splits into one device tensor and yields the same batches.
"""
from __future__ import annotations

import inspect
from typing import Iterator

import torch

from cskd import orders
from cskd.augment import PIPELINES, Transform
from cskd.batch import Batch, LoaderSpec, Shard, epoch_generator, make_batch
from cskd.dataset import DatasetInfo, eval_ids, import_ffcv
from cskd.errors import ConfigError


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
    import_ffcv()  # the first FFCV import of a run (both loaders start here): keep torch's thread count
    from ffcv.traversal_order.base import TraversalOrder

    class EpochOrder(TraversalOrder):
        """This rank's random or class-paired order; FFCV passes its `next_epoch` counter."""

        def __init__(self, loader, **order_args):
            super().__init__(loader)
            self.args = order_args

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


def _loader(spec: LoaderSpec, split: str, batch_size: int, order: dict, decoder):
    from ffcv.fields.decoders import IntDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import ToDevice, ToTensor

    to_device = [ToDevice(spec.device, non_blocking=True)] if spec.device.type == "cuda" else []
    pipelines = {
        "image": [decoder, ToTensor(), *to_device],
        "label": [IntDecoder(), ToTensor(), *to_device],
        "index": [IntDecoder(), ToTensor(), *to_device],
    }
    return Loader(spec.dataset.beton(split), batch_size=batch_size, num_workers=spec.num_workers,
                  os_cache=spec.os_cache, drop_last=False, pipelines=pipelines, **order)


def _close(it) -> None:
    """FFCV leaves its epoch thread running when a loop is left early (#345, #393): stop and join it."""
    it.close()
    it.join(timeout=10)


class TrainLoader:
    """Augmented, normalised training batches for one rank, epoch by epoch, read through FFCV."""

    def __init__(self, spec: LoaderSpec, *, shard: Shard = Shard()):
        EpochOrder, _ = _make_orders()
        order = _order_factory(EpochOrder, **spec.order_args(shard))
        decoder, cropped = _image_decoder(spec.dataset, "train", spec.pipeline, train=True)
        factor = 2 if spec.paired else 1
        self.loader = _loader(spec, "train", factor * spec.batch_per_rank, order, decoder)
        self.spec, self.shard = spec, shard
        self.transform = Transform(spec.pipeline, spec.dataset.meta, spec.device, spec.channels_last,
                                   spec.color_jitter, spec.lighting, cropped)

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch`, whatever epochs were (or were not) iterated before."""
        self.loader.next_epoch = epoch
        gen = epoch_generator(self.spec.seed, epoch, self.shard.rank, self.spec.device)
        it = iter(self.loader)
        try:
            for step, (images, labels, index) in enumerate(it):
                labels, index = labels.view(-1).clone(), index.view(-1).clone()  # FFCV reuses its buffers
                yield make_batch(images, labels, index, paired=self.spec.paired, transform=self.transform,
                                 generator=gen, num_views=self.spec.num_views, epoch=epoch, step=step)
        finally:
            _close(it)


class EvalLoader:
    """Test-transformed batches of this rank's contiguous shard of a split (no padding, no duplicates)."""

    def __init__(self, spec: LoaderSpec, *, shard: Shard = Shard(), split: str = "test"):
        _, FixedOrder = _make_orders()
        ids = eval_ids(spec.dataset, split, shard)
        decoder, cropped = _image_decoder(spec.dataset, split, spec.pipeline, train=False)
        # FFCV allocates its buffers for a whole batch: never more than this rank's block
        batch = min(spec.eval_batch, max(len(ids), 1))
        self.loader = _loader(spec, split, batch, _order_factory(FixedOrder, ids=ids), decoder)
        self.transform = Transform(spec.pipeline, spec.dataset.meta, spec.device, spec.channels_last,
                                   decoded_crop=cropped)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        it = iter(self.loader)
        try:
            for images, labels, index in it:
                yield self.transform.test(images), labels.view(-1).clone(), index.view(-1).clone()
        finally:
            _close(it)
