"""The device-resident loaders against the FFCV ones, and the batched pipeline ops against torchvision."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cskd import augment as A
from cskd.batch import LoaderSpec, Sampling, Shard
from cskd.dataset import open_dataset
from cskd.device_loader import DeviceEvalLoader, DeviceTrainLoader, read_split
from cskd.errors import ConfigError
from cskd.ffcv_loader import EvalLoader, TrainLoader
from cskd.orders import epoch_order
from conftest import run_cli, train_args

CPU = torch.device("cpu")
FIELDS = ("images", "labels", "index", "pair_images", "pair_labels", "pair_index")


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("world, rank, pipeline, views", [(1, 0, "none", 1), (2, 1, "cifar", 2)])
def test_device_batches_equal_ffcv_batches(mnist_dir, world, rank, pipeline, views):
    info = open_dataset(str(mnist_dir))
    spec = LoaderSpec(dataset=info, batch_per_rank=64 // world, seed=7, sampling=Sampling("class_pairs"),
                      num_views=views, pipeline=pipeline)
    ffcv = TrainLoader(spec, shard=Shard(rank, world))
    device = DeviceTrainLoader(spec, shard=Shard(rank, world))
    assert len(device) == len(ffcv)
    batches = list(device.epoch(3))
    for a, b in zip(batches, ffcv.epoch(3), strict=True):
        for name in FIELDS:  # same composition, partners and pixels (same raw batch, same generator)
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert all(torch.equal(u, v) for u, v in zip(a.views, b.views, strict=True))
    expected, sizes = epoch_order(info.labels["train"], 64, world, rank, seed=7, epoch=3, paired=True)
    got = np.concatenate([np.concatenate([b.index.numpy(), b.pair_index.numpy()]) for b in batches])
    assert np.array_equal(got, expected) and [len(b.labels) for b in batches] == sizes


def test_device_eval_equals_ffcv_eval(mnist_dir):
    spec = LoaderSpec(dataset=open_dataset(str(mnist_dir)), batch_per_rank=1, eval_batch=300, pipeline="crop")
    for rank in range(3):
        ffcv = EvalLoader(spec, shard=Shard(rank, 3))
        device = DeviceEvalLoader(spec, shard=Shard(rank, 3))
        for a, b in zip(device, ffcv, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_device_epoch_replays_when_recreated(mnist_dir):
    info = open_dataset(str(mnist_dir))
    make = lambda: DeviceTrainLoader(LoaderSpec(dataset=info, batch_per_rank=128, seed=3))  # noqa: E731
    first = list(make().epoch(2))
    other = make()
    list(other.epoch(0))  # a different history before epoch 2
    for a, b in zip(first, other.epoch(2), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images) and a.pair_index is None
    expected, _ = epoch_order(info.labels["train"], 128, 1, 0, seed=3, epoch=2, paired=False)
    assert np.array_equal(torch.cat([b.index for b in first]).numpy(), expected)


def test_device_loaders_take_a_split_already_on_the_device(mnist_dir):
    info = open_dataset(str(mnist_dir))
    spec = LoaderSpec(dataset=info, batch_per_rank=256, eval_batch=700, seed=5, sampling=Sampling("class_pairs"))
    held = [read_split(info, split, CPU) for split in ("train", "test")]
    for a, b in zip(DeviceTrainLoader(spec, data=held[0]).epoch(1), DeviceTrainLoader(spec).epoch(1), strict=True):
        assert all(torch.equal(getattr(a, name), getattr(b, name)) for name in FIELDS)
    for a, b in zip(DeviceEvalLoader(spec, data=held[1]), DeviceEvalLoader(spec), strict=True):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    black = next(DeviceTrainLoader(spec, data=(torch.zeros_like(held[0][0]), *held[0][1:])).epoch(1))
    assert black.images.std((0, 2, 3)).max() == 0  # the given pixels, not the dataset's


def write_jpeg_dataset(root, shapes):
    """A tiny prepared dataset of random JPEG images of the given (h, w) shapes, in both splits."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    rng = np.random.default_rng(0)
    samples = [(rng.integers(0, 256, (*shape, 3), dtype=np.uint8), i % 2, i) for i, shape in enumerate(shapes)]
    for split in ("train", "test"):
        fields = {"image": RGBImageField(write_mode="jpg"), "label": IntField(), "index": IntField()}
        writer = DatasetWriter(str(root / f"{split}.beton"), fields, num_workers=1, page_size=1 << 21)
        writer.from_indexed_dataset(samples)
    meta = {"num_classes": 2, "files": {}, "mean": [0.5] * 3, "std": [0.2] * 3}
    (root / "meta.json").write_text(json.dumps(meta))
    return open_dataset(str(root))


def test_device_loader_decodes_fixed_size_jpegs_as_ffcv(tmp_path):
    spec = LoaderSpec(dataset=write_jpeg_dataset(tmp_path, [(40, 48)] * 10), batch_per_rank=4)
    pairs = zip(DeviceTrainLoader(spec).epoch(1), TrainLoader(spec).epoch(1))
    for a, b in pairs:
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)


def test_variable_sizes_go_through_ffcv_crop_decoders(tmp_path):
    info = write_jpeg_dataset(tmp_path, [(40 + 8 * i, 60 - 4 * i) for i in range(6)])
    assert info.image_shape == {"train": None, "test": None}
    imagenet = LoaderSpec(dataset=info, batch_per_rank=4, eval_batch=4, pipeline="imagenet224")
    with pytest.raises(ConfigError, match=r"varying sizes; re-convert the dataset with a fixed --size"):
        DeviceTrainLoader(imagenet)
    with pytest.raises(ConfigError, match=r"cannot batch; use data.pipeline=imagenet224, or re-convert"):
        TrainLoader(LoaderSpec(dataset=info, batch_per_rank=4, pipeline="cifar"))
    train = TrainLoader(imagenet)
    assert [b.images.shape for b in train.epoch(0)] == [(4, 3, 224, 224), (2, 3, 224, 224)]
    test = EvalLoader(imagenet)
    assert [x.shape for x, _, _ in test] == [(4, 3, 224, 224), (2, 3, 224, 224)]


# --- batched ops ------------------------------------------------------------------------------

def test_rrc_boxes_follow_torchvision_get_params():
    boxes = A.rrc_boxes(20000, 96, 128, gen())
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 96).all() and (left + w <= 128).all()
    area, ratio = (h * w).double() / (96 * 128), w.double() / h
    # bounds up to the rounding of w and h to whole pixels
    assert area.min() > 0.07 and area.max() <= 1.0 and ratio.min() > 0.7 and ratio.max() < 1.4
    # the same distribution as torchvision's own draws (tries that do not fit skew it to small areas)
    from torchvision.transforms import RandomResizedCrop

    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, 96, 128), [0.08, 1.0], [3 / 4, 4 / 3])
                        for _ in range(5000)]).double()
    ref_area, ref_ratio = ref[:, 2] * ref[:, 3] / (96 * 128), ref[:, 3] / ref[:, 2]
    for ours, theirs in ((area, ref_area), (ratio, ref_ratio), (top.double(), ref[:, 0]), (left.double(), ref[:, 1])):
        assert abs(ours.mean() - theirs.mean()) < 0.05 * theirs.mean()
        assert abs(ours.std() - theirs.std()) < 0.05 * theirs.std()
    assert len(set(map(tuple, boxes.tolist()))) > 19000  # per-sample boxes
    assert torch.equal(boxes, A.rrc_boxes(20000, 96, 128, gen()))  # seeded
    assert not torch.equal(boxes, A.rrc_boxes(20000, 96, 128, gen(1)))
    # an image too thin for any try: torchvision's fallback, a centred crop clamped to ratio 4/3
    assert A.rrc_boxes(3, 4, 400, gen()).tolist() == [[0, 197, 4, 5]] * 3


def test_resized_crop_is_bilinear_resize_of_the_crop():
    x = torch.rand(2, 3, 50, 70) * 255
    full = torch.tensor([[0, 0, 50, 70], [0, 0, 50, 70]])
    expected = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=False)
    assert torch.allclose(A.resized_crop(x, full, 32), expected, atol=1e-3)
    box = torch.tensor([[5, 9, 30, 40], [11, 2, 20, 20]])
    out = A.resized_crop(x, box, 48)
    for i, (t, l, h, w) in enumerate(box.tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(48, 48), mode="bilinear", align_corners=False)
        # equal inside; on the edge the crop's own border is clamped, grid_sample reads the neighbours
        assert torch.allclose(out[i, :, 2:-2, 2:-2], ref[0, :, 2:-2, 2:-2], atol=1e-3)
    mirrored = A.resized_crop(x, box, 48, torch.tensor([True, False]))  # the flip folded into the grid
    assert torch.allclose(mirrored[0], out[0].flip(-1), atol=1e-3) and torch.equal(mirrored[1], out[1])


def test_resize_center_crop_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(2, 3, 300, 400) * 255
    ref = TF.center_crop(TF.resize(x, 256, antialias=True), 224)
    out = A.resize_center_crop(x, 256, 224)
    assert out.shape == (2, 3, 224, 224) and torch.allclose(out, ref, atol=1e-2)
    small = torch.rand(1, 3, 64, 64) * 255
    assert torch.allclose(A.resize_center_crop(small, 32, 0), TF.resize(small, 32, antialias=True), atol=1e-2)


def test_flip_probability_is_half():
    images = torch.arange(2).view(1, 1, 2, 1).expand(4000, 1, 2, 3).to(torch.uint8)  # left 0, right 1
    flipped = A.random_hflip(images, gen())[:, 0, 0, 0] == 1
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # 4 sigma at n=4000


@pytest.mark.parametrize("pipeline, size", [("cifar", 32), ("tinyimagenet32", 32), ("tinyimagenet64", 64),
                                            ("imagenet224", 224)])
def test_pipelines_shapes_and_determinism(pipeline, size):
    stored = {"cifar": 32, "tinyimagenet32": 64, "tinyimagenet64": 64, "imagenet224": 256}[pipeline]
    images = torch.randint(0, 256, (4, stored, stored, 3), dtype=torch.uint8)
    t = A.Transform(pipeline, {}, CPU, channels_last=True, color_jitter=0.4, lighting=0.1)
    x = t.train(images, gen())
    assert x.shape == (4, 3, size, size) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(x, t.train(images, gen()))
    assert t.test(images).shape == (4, 3, size, size)


def test_normalisation_constants():
    assert A.PIPELINES["cifar"].mean == (0.4914, 0.4822, 0.4465)
    assert A.PIPELINES["cifar"].std == (0.2023, 0.1994, 0.2010)
    for name in ("tinyimagenet32", "tinyimagenet64", "imagenet224"):
        assert A.PIPELINES[name].mean == (0.485, 0.456, 0.406) and A.PIPELINES[name].std == (0.229, 0.224, 0.225)
    t = A.Transform("imagenet224", {}, CPU, channels_last=False)
    mean = torch.tensor(A.IMAGENET_MEAN) * 255
    out = t.normalize(mean.view(1, 3, 1, 1).expand(1, 3, 2, 2))
    assert out.abs().max() < 1e-5
    crop = A.Transform("crop", {"mean": [0.1] * 3, "std": [0.3] * 3}, CPU, channels_last=False)
    assert torch.allclose(crop.normalize(torch.full((1, 3, 1, 1), 255.0)), torch.full((1, 3, 1, 1), 3.0))


def test_color_jitter_and_lighting():
    x = torch.rand(64, 3, 8, 8) * 255
    assert torch.allclose(A.color_jitter(x, 0.0, gen()), x)  # factor 1: identity
    j = A.color_jitter(x, 0.4, gen())
    assert j.min() >= 0 and j.max() <= 255 and not torch.allclose(j, x)
    lit = A.lighting(x, 0.1, gen()) - x
    assert torch.allclose(lit, lit[:, :, :1, :1].expand_as(lit), atol=1e-3)  # one RGB offset per sample
    eigval = torch.tensor(A.IMAGENET_EIGVAL)
    # each offset is 255 * eigvec @ (alpha * eigval) with alpha ~ N(0, 0.1): per-channel std known
    std = 255 * 0.1 * (torch.tensor(A.IMAGENET_EIGVEC) ** 2 @ eigval ** 2).sqrt()
    big = A.lighting(torch.zeros(20000, 3, 1, 1), 0.1, gen())[:, :, 0, 0]
    assert torch.allclose(big.std(0), std, rtol=0.05)
    assert math.isclose(big.mean().item(), 0.0, abs_tol=0.2)


def test_cli_train_with_device_loader(mnist_dir, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(train_args(mnist_dir, out, "data.loader=device", "method=cskd"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary


def _info(shape, n_train: int = 1000):
    from pathlib import Path

    from cskd.dataset import DatasetInfo

    labels = {"train": np.zeros(n_train, dtype=np.int64), "test": np.zeros(100, dtype=np.int64)}
    return DatasetInfo(Path("/data/x"), {"num_classes": 10}, labels, {"train": shape, "test": shape})


def test_memory_budget_is_half_the_free_memory_shared_by_the_ranks_on_it(monkeypatch):
    """One budget for the device loader's check, its reading of a split and the JPEG loader's test cache."""
    from cskd import device_loader

    monkeypatch.setattr(device_loader, "free_bytes", lambda device: 8 * 2**30)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert device_loader.memory_budget(cpu, 4) == 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # this node's torchrun ranks each hold a copy in its RAM
    assert device_loader.memory_budget(cpu) == 2 * 2**30 and device_loader.memory_budget(gpu) == 4 * 2**30


def test_loader_auto_takes_the_device_where_the_splits_fit_else_ffcv_saying_why():
    from cskd.loaders import choose_loader

    cpu = torch.device("cpu")
    assert choose_loader("auto", _info((32, 32)), cpu, 1) == ("device", "data.loader=auto: the splits fit in memory")
    loader, why = choose_loader("auto", _info(None), cpu, 1)
    assert loader == "ffcv" and "stores images of varying sizes" in why
    loader, why = choose_loader("auto", _info((4096, 4096), n_train=10**6), cpu, 1)  # 50 TB as uint8
    assert loader == "ffcv" and "above the" in why and "GiB budget on cpu" in why
    assert choose_loader("ffcv", _info((32, 32)), cpu, 1)[0] == "ffcv"  # asked for: kept
    assert choose_loader("device", _info(None), cpu, 1)[0] == "device"  # (read_split then refuses it)
