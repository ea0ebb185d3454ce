"""JPEG-stored splits decoded on the run's device (`data.loader: jpeg`): nvJPEG on a GPU, libjpeg on CPU.

Why: 224-px datasets (ImageNet, CUB, Dogs, MIT67) are stored as JPEG by `datasets_prep` (FFCV
"smart" mode: JPEG above 64x64, raw pixels below) and FFCV decodes and crops them in CPU threads.
On a GPU node that is the bottleneck, and CS-KD decodes twice the images (every anchor brings a
same-class partner). Here a batch's JPEG bytes are read straight from the memory-mapped .beton
(`cskd.beton` gives each sample's mode, size and data pointer, the allocation table the byte
counts), decoded in one `torchvision.io.decode_jpeg(list, device=...)` call (nvJPEG on CUDA; on CPU
that call is a serial loop, so samples are decoded in `num_workers` threads instead, the op releases
the GIL), then cropped and resized on the device; raw samples are used as stored.

Geometry, for pipelines with RandomResizedCrop and a centre crop (imagenet224): training draws
RandomResizedCrop boxes (scale (0.08, 1), ratio (3/4, 4/3), torchvision's `get_params`, as
`cskd.augment.rrc_boxes`) from a CPU generator seeded by (seed, epoch, rank), so an epoch replays
exactly on resume (FFCV's crop decoders draw from an unseeded RNG), on every device alike; evaluation
takes FFCV's centre crop (224/256 of the shorter side). Both are resized with antialiased bilinear
interpolation (torchvision `Resize`'s, PIL's filter), not FFCV's cv2 INTER_AREA: the same crops,
pixels that differ by a few levels, so not bit-identical to the FFCV loader. Fixed-size splits
with other pipelines are decoded whole and the pipeline runs as for the other loaders. Then the
batch goes through the same `cskd.batch.make_batch` (flip, colour ops, normalisation), in the same
order (`cskd.orders`): methods see the same `Batch`es.

The next training batch is decoded on a background thread while the current one trains (crop
draws happen there, in step order, hence their own generator). The test split is decoded once,
during the first evaluation, into one uint8 N x S x S x 3 tensor on the device (ImageNet val at
224 px: 7.5 GB) when it fits `device_loader.memory_budget`; else every evaluation decodes again.
"""
from __future__ import annotations

import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from cskd import orders
from cskd.augment import PIPELINES, RRC_RATIO, RRC_SCALE, Transform
from cskd.batch import Batch, LoaderSpec, Shard, epoch_generator, make_batch
from cskd.beton import read_beton
from cskd.dataset import eval_ids
from cskd.errors import ConfigError, DataError

JPEG_MODE, RAW_MODE = 0, 1  # ffcv.fields.rgb_image.IMAGE_MODES
CROP_STREAM = 1  # SeedSequence([seed, epoch, rank, CROP_STREAM]): the crop boxes' own stream
# torchvision 0.29 warns at every call that its decoders move to TorchCodec (a migration for later)
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)


class BetonImages:
    """The image field of one .beton, memory-mapped: each sample's stored bytes, and its decode."""

    def __init__(self, path: str):
        beton = read_beton(path)  # checked by open_dataset
        image = beton.field("image")
        self.path = path
        self.mode = image["mode"].astype(np.int64)
        self.height, self.width = image["height"].astype(np.int64), image["width"].astype(np.int64)
        self.ptr = image["data_ptr"].astype(np.int64)
        self.index = np.asarray(beton.field("index"), dtype=np.int64)
        table = beton.alloc_table[np.argsort(beton.alloc_table["ptr"])]  # one entry per field value
        ptrs, sizes = table["ptr"].astype(np.int64), table["size"].astype(np.int64)
        at = np.minimum(np.searchsorted(ptrs, self.ptr), len(ptrs) - 1)  # open_dataset checked: an entry each
        self.size = sizes[at]
        bad = ((ptrs[at] != self.ptr) | ~np.isin(self.mode, (JPEG_MODE, RAW_MODE))
               | ((self.mode == RAW_MODE) & (self.size != self.height * self.width * 3)))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{path}: sample {i} has no valid image entry (mode {self.mode[i]}, "
                            f"{self.height[i]}x{self.width[i]}, {self.size[i]} bytes); the file is damaged: "
                            f"convert the dataset again (python -m datasets_prep ... --force)")
        # copy-on-write: writable views, so torch.from_numpy takes them without a copy (none is written)
        self.data = np.memmap(path, dtype=np.uint8, mode="c")

    def stored(self, i: int) -> torch.Tensor:
        """Sample `i`'s bytes as FFCV wrote them (JPEG, or raw H x W x 3), a CPU view of the file."""
        return torch.from_numpy(self.data[self.ptr[i]:self.ptr[i] + self.size[i]])

    def error(self, i: int, reason) -> DataError:
        first = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason).__name__
        return DataError(f"{self.path}: sample {i} (index {self.index[i]}) is not a decodable JPEG ({first}); the "
                         f"file is damaged: convert the dataset again (python -m datasets_prep ... --force)")

    def decode(self, i: int, device: torch.device = torch.device("cpu")) -> torch.Tensor:
        """Sample `i` as uint8 RGB C x H x W on `device` (libjpeg on CPU, nvJPEG on CUDA)."""
        return self.decode_many([i], device)[0]

    def decode_many(self, ids, device: torch.device) -> list[torch.Tensor]:
        """Samples `ids` as uint8 RGB C x H x W tensors on `device`; the JPEGs in one nvJPEG batch on CUDA."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out = [None] * len(ids)
        jpegs = []
        for k, i in enumerate(ids):
            if self.mode[i] == RAW_MODE:
                out[k] = self.stored(i).view(int(self.height[i]), int(self.width[i]), 3).permute(2, 0, 1).to(device)
            else:
                jpegs.append(k)
        if jpegs:
            data = [self.stored(ids[k]) for k in jpegs]
            try:
                images = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
            except (RuntimeError, ValueError) as e:
                if len(jpegs) == 1 and device.type == "cpu":
                    raise self.error(ids[jpegs[0]], e) from None
                for k in jpegs:  # which sample? each one again on the CPU (raises for the first bad one)
                    self.decode(ids[k])
                raise DataError(f"{self.path}: decoding samples {[int(ids[k]) for k in jpegs][:8]}... on {device} "
                                f"failed ({str(e).strip()[:200]}), although each decodes on the CPU") from None
            for k, image in zip(jpegs, images):
                if tuple(image.shape[1:]) != (self.height[ids[k]], self.width[ids[k]]):
                    raise self.error(ids[k], f"decodes to {tuple(image.shape[1:])}, the header says "
                                             f"{(int(self.height[ids[k]]), int(self.width[ids[k]]))}")
                out[k] = image
        return out


def crop_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The crop boxes' CPU generator for (seed, epoch, rank): the same crops on every device, and a stream
    apart from `epoch_generator`'s, which the main thread draws from while the next batch is decoded."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, epoch, rank, CROP_STREAM])
                                             .generate_state(1)[0]))


def rrc_boxes(heights, widths, generator: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, h, w) for images of per-sample sizes: `cskd.augment.rrc_boxes` (the
    same draws, in the same order, so the same boxes for equal sizes) with one height and width per sample."""
    height, width = torch.as_tensor(heights, dtype=torch.int64), torch.as_tensor(widths, dtype=torch.int64)
    n = len(height)
    area = torch.rand(n, 10, generator=generator, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0]
    lo, hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = torch.exp(torch.rand(n, 10, generator=generator, dtype=torch.float64) * (hi - lo) + lo)
    target = area * height[:, None].double() * width[:, None].double()
    ws = torch.round(torch.sqrt(target * aspect)).long()
    hs = torch.round(torch.sqrt(target / aspect)).long()
    ok = (ws > 0) & (ws <= width[:, None]) & (hs > 0) & (hs <= height[:, None])
    first = ok.int().argmax(1, keepdim=True)
    found = ok.any(1)
    w, h = ws.gather(1, first)[:, 0], hs.gather(1, first)[:, 0]
    in_ratio = width.double() / height.double()  # fallback: the centre crop clamped to the ratio range
    thin, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(height.double() * max(ratio)).long(), width)
    fh = torch.where(thin, torch.round(width.double() / min(ratio)).long(), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).long(), (height - fh) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).long(), (width - fw) // 2)
    return torch.stack([top, left, h, w], 1)


def center_boxes(heights, widths, ratio: float) -> torch.Tensor:
    """FFCV's CenterCropRGBImageDecoder boxes: a square of `ratio` x the shorter side, centred."""
    height, width = np.asarray(heights, dtype=np.int64), np.asarray(widths, dtype=np.int64)
    c = (ratio * np.minimum(height, width)).astype(np.int64)  # int(ratio * s), as FFCV
    return torch.from_numpy(np.stack([(height - c) // 2, (width - c) // 2, c, c], 1))


def fit(image: torch.Tensor, box, out: torch.Tensor) -> None:
    """Crop `box` (top, left, h, w) of uint8 C x H x W `image`, resize it to `out` (uint8 h x w x 3, written in
    place) with antialiased bilinear interpolation: torch's uint8 kernel on CPU, float32 elsewhere."""
    top, left, h, w = (int(v) for v in box)
    x = image[:, top:top + h, left:left + w][None]
    size = tuple(out.shape[:2])
    if (h, w) != size:
        if x.device.type == "cpu":
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        else:
            x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)
    out.copy_(x[0].permute(1, 2, 0))


class _Decoder:
    """Samples of a .beton into a uint8 N x h x w x 3 batch on the device, each cropped to its box."""

    def __init__(self, store: BetonImages, device: torch.device, threads: int):
        self.store, self.device = store, device
        self.pool = ThreadPoolExecutor(threads, "jpeg-decode") if device.type == "cpu" and threads > 1 else None

    def __call__(self, ids: np.ndarray, boxes: torch.Tensor, size: tuple[int, int],
                 out: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.empty((len(ids), *size, 3), dtype=torch.uint8, device=self.device) if out is None else out
        boxes = boxes.tolist()
        if self.device.type != "cpu":
            with torch.cuda.device(self.device):  # also from the prefetch thread
                for k, image in enumerate(self.store.decode_many(ids, self.device)):
                    fit(image, boxes[k], out[k])
            return out

        def one(k):
            fit(self.store.decode(ids[k]), boxes[k], out[k])

        if self.pool:
            list(self.pool.map(one, range(len(ids))))
        else:
            for k in range(len(ids)):
                one(k)
        return out


def _geometry(spec: LoaderSpec, split: str) -> tuple[bool, int, int, float]:
    """(crops, train size, eval size, centre ratio): crops here for RandomResizedCrop + centre-crop
    pipelines (any stored size); else the split must have one size, decoded whole (sizes 0)."""
    p = PIPELINES[spec.pipeline]
    if p.rrc and p.center_crop:
        return True, p.rrc, p.center_crop, p.center_crop / p.resize
    if spec.dataset.image_shape[split] is None:
        raise ConfigError(f"{spec.dataset.beton(split)} stores images of varying sizes, which data.pipeline="
                          f"{spec.pipeline} cannot batch; use data.pipeline=imagenet224, or re-convert with a "
                          f"fixed --size")
    return False, 0, 0, 1.0


class JpegTrainLoader:
    """Drop-in for `cskd.ffcv_loader.TrainLoader`: the same orders and `Batch`es, decoded on `spec.device`."""

    def __init__(self, spec: LoaderSpec, *, shard: Shard = Shard()):
        self.spec, self.shard = spec, shard
        self.store = BetonImages(spec.dataset.beton("train"))
        self.crops, size, _, _ = _geometry(spec, "train")
        self.size = (size, size) if self.crops else spec.dataset.image_shape["train"]
        self.labels = torch.tensor(spec.dataset.labels["train"], device=spec.device)
        self.index = torch.tensor(self.store.index, device=spec.device)
        self.order_args = spec.order_args(shard)
        self.steps = orders.steps_per_epoch(len(self.labels), spec.batch_per_rank * shard.world_size,
                                            shard.world_size)
        self.decode = _Decoder(self.store, spec.device, spec.num_workers)
        self.transform = Transform(spec.pipeline, spec.dataset.meta, spec.device, spec.channels_last,
                                   spec.color_jitter, spec.lighting, decoded_crop=self.crops)

    def __len__(self) -> int:
        return self.steps

    def _images(self, ids: np.ndarray, crops: torch.Generator) -> torch.Tensor:
        h, w = self.store.height[ids], self.store.width[ids]
        boxes = (rrc_boxes(h, w, crops) if self.crops else
                 torch.from_numpy(np.stack([0 * h, 0 * w, h, w], 1)))
        return self.decode(ids, boxes, self.size)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of `epoch`, a pure function of (seed, epoch, rank): resuming replays it exactly."""
        spec = self.spec
        ids, sizes = orders.epoch_order(epoch=epoch, **self.order_args)
        bounds = np.cumsum([0] + [(2 if spec.paired else 1) * s for s in sizes])
        steps = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        gen = epoch_generator(spec.seed, epoch, self.shard.rank, spec.device)
        crops = crop_generator(spec.seed, epoch, self.shard.rank)
        with ThreadPoolExecutor(1, "jpeg-prefetch") as ahead:  # one task at a time: crops drawn in step order
            pending = ahead.submit(self._images, steps[0], crops) if steps else None
            for step, sel in enumerate(steps):
                images = pending.result()
                if step + 1 < len(steps):
                    pending = ahead.submit(self._images, steps[step + 1], crops)
                sel = torch.from_numpy(sel).to(spec.device)
                yield make_batch(images, self.labels.index_select(0, sel), self.index.index_select(0, sel),
                                 paired=spec.paired, transform=self.transform, generator=gen,
                                 num_views=spec.num_views, epoch=epoch, step=step)


class JpegEvalLoader:
    """Drop-in for `cskd.ffcv_loader.EvalLoader`: this rank's contiguous shard, decoded on the device once
    (cached during the first pass when it fits the memory budget), then served from there."""

    def __init__(self, spec: LoaderSpec, *, shard: Shard = Shard(), split: str = "test"):
        self.spec, self.shard = spec, shard
        self.ids = eval_ids(spec.dataset, split, shard)
        self.store = BetonImages(spec.dataset.beton(split))
        self.crops, _, size, self.ratio = _geometry(spec, split)
        self.size = (size, size) if self.crops else spec.dataset.image_shape[split]
        self.labels = torch.tensor(spec.dataset.labels[split][self.ids], device=spec.device)
        self.index = torch.tensor(self.store.index[self.ids], device=spec.device)
        self.decode = _Decoder(self.store, spec.device, spec.num_workers)
        self.transform = Transform(spec.pipeline, spec.dataset.meta, spec.device, spec.channels_last,
                                   decoded_crop=self.crops)
        self.cache: torch.Tensor | None = None
        self.filled = 0  # samples of the cache decoded so far (a first pass may stop early)
        self.why = ""  # the cache decision, made at the first pass, when the model holds its memory

    def _plan_cache(self) -> None:
        from cskd.device_loader import memory_budget

        device = self.spec.device
        need = len(self.ids) * self.size[0] * self.size[1] * 3
        budget = memory_budget(device)
        shape = f"{len(self.ids)} x {self.size[0]} x {self.size[1]} x 3 uint8"
        if need <= budget:
            self.cache = torch.empty((len(self.ids), *self.size, 3), dtype=torch.uint8, device=device)
            self.why = f"test split cached on {device} ({shape}, {need / 2**30:.2f} GiB)"
        else:
            self.why = (f"test split not cached: {shape} needs {need / 2**30:.2f} GiB, above the "
                        f"{budget / 2**30:.2f} GiB budget on {device}; decoding it at every evaluation")
        if self.shard.rank == 0:
            from cskd.progress import log

            log(f"jpeg loader: {self.why}")

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if not self.why:
            self._plan_cache()
        batch = self.spec.eval_batch
        for start in range(0, len(self.ids), batch):
            stop = min(start + batch, len(self.ids))
            if self.cache is not None and stop <= self.filled:
                images = self.cache[start:stop]
            else:
                ids = self.ids[start:stop]
                h, w = self.store.height[ids], self.store.width[ids]
                boxes = (center_boxes(h, w, self.ratio) if self.crops else
                         torch.from_numpy(np.stack([0 * h, 0 * w, h, w], 1)))
                out = None if self.cache is None else self.cache[start:stop]
                images = self.decode(ids, boxes, self.size, out)
                if self.cache is not None and start == self.filled:
                    self.filled = stop
            yield self.transform.test(images), self.labels[start:stop], self.index[start:stop]
