"""`data.loader: jpeg` (cskd.jpeg_loader) on CPU: bytes read from the .beton, decoding, crops, orders,
the cached evaluation split and damaged files, on one small "smart" .beton (raw and JPEG samples)."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cskd import augment as A
from cskd.batch import LoaderSpec, Sampling, Shard
from cskd.dataset import open_dataset
from cskd.errors import DataError
from cskd.jpeg_loader import BetonImages, JpegEvalLoader, JpegTrainLoader, center_boxes, rrc_boxes
from cskd.orders import epoch_order
from conftest import REPO

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [220, 220, 60]], dtype=np.uint8)
BORDER = np.array([0, 0, 0], dtype=np.uint8)
# FFCV's centre crop of imagenet224 (224/256 of the shorter side) of a 256 x 352 image: rows 16..240,
# columns 64..288, every edge on the 16-pixel grid of JPEG's blocks; the 512 x 704 image is the same, twice
QUADRANT_SHAPES = [(256, 352), (512, 704)]


def quadrants(h: int, w: int) -> np.ndarray:
    """Black outside FFCV's centre crop; inside it four flat quadrants split at the crop's centre."""
    c = int(224 / 256 * min(h, w))
    top, left = (h - c) // 2, (w - c) // 2
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BORDER
    for k, (r, q) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        img[top + r * c // 2:top + (r + 1) * c // 2, left + q * c // 2:left + (q + 1) * c // 2] = COLOURS[k]
    return img


def smooth(rng, h: int, w: int) -> np.ndarray:
    """A photo-like image (smooth, so JPEG keeps it close): bicubic upsampling of coarse noise."""
    low = torch.from_numpy(rng.integers(0, 256, (3, h // 8 + 2, w // 8 + 2)).astype(np.float32))[None]
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    return up.clamp(0, 255)[0].permute(1, 2, 0).to(torch.uint8).numpy()


def write_split(path, images, labels) -> None:
    """FFCV's "smart" mode as datasets_prep writes 224-px data: JPEG (quality 90) above 64 x 64 x 3 bytes."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode="smart", smart_threshold=64 * 64 * 3, jpeg_quality=90),
              "label": IntField(), "index": IntField()}
    samples = [(img, int(y), i) for i, (img, y) in enumerate(zip(images, labels))]
    DatasetWriter(str(path), fields, num_workers=1, page_size=1 << 21).from_indexed_dataset(samples)


@pytest.fixture(scope="module")
def jpeg_data(tmp_path_factory):
    """(dataset dir, {split: source images}): 3 classes, sizes 30..160 px; 24 train, 8 + 2 test images."""
    root = tmp_path_factory.mktemp("jpeg") / "smart"
    root.mkdir()
    rng = np.random.default_rng(0)
    sizes = [(40, 50), (150, 96), (60, 33)] + [tuple(rng.integers(30, 160, 2)) for _ in range(21)]
    test = [quadrants(*s) for s in QUADRANT_SHAPES] + [smooth(rng, 70 + 9 * i, 130 - 7 * i) for i in range(8)]
    images = {"train": [smooth(rng, int(h), int(w)) for h, w in sizes], "test": test}
    for split, imgs in images.items():
        write_split(root / f"{split}.beton", imgs, [i % 3 for i in range(len(imgs))])
    meta = {"name": "smart", "num_classes": 3, "classes": ["a", "b", "c"], "files": {}, "mean": [0.5] * 3,
            "std": [0.25] * 3}
    (root / "meta.json").write_text(json.dumps(meta))
    return root, images


def spec_of(root, **kw) -> LoaderSpec:
    args = dict(batch_per_rank=4, eval_batch=4, pipeline="imagenet224", seed=3, num_workers=2) | kw
    return LoaderSpec(dataset=open_dataset(str(root)), **args)


def test_stored_bytes_decode_as_pil_and_raw_samples_as_stored(jpeg_data):
    root, images = jpeg_data
    store = BetonImages(str(root / "train.beton"))
    assert set(store.mode) == {0, 1}  # a smart file: JPEG and raw samples mixed
    for i, source in enumerate(images["train"]):
        ours = store.decode(i).permute(1, 2, 0).numpy()
        if store.mode[i] == 1:  # raw: exactly the stored pixels
            assert np.array_equal(ours, source)
            continue
        pil = np.array(Image.open(io.BytesIO(store.stored(i).numpy().tobytes())).convert("RGB"))
        assert ours.shape == pil.shape == source.shape
        assert np.abs(ours.astype(int) - pil).max() <= 2  # JPEG decoders agree to a level or two
        assert np.abs(ours.astype(float) - source).mean() < 4  # and decode what was stored (quality 90)


def test_centre_crop_is_ffcvs_box_resized(jpeg_data):
    root, _ = jpeg_data
    assert center_boxes([256, 512], [352, 704], 224 / 256).tolist() == [[16, 64, 224, 224], [32, 128, 448, 448]]
    loader = JpegEvalLoader(spec_of(root, eval_batch=2))
    first, _, _ = next(iter(loader))
    assert first.shape == (2, 3, 224, 224)
    pixels = loader.cache[:2]  # the crops behind the normalised batch
    mean, std = torch.tensor(A.IMAGENET_MEAN)[:, None, None], torch.tensor(A.IMAGENET_STD)[:, None, None]
    assert torch.allclose(first, (pixels.permute(0, 3, 1, 2) / 255 - mean) / std, atol=1e-5)
    # 224 of 256 px: the crop itself, pixel for pixel, of the decoded image
    decoded = BetonImages(str(root / "test.beton")).decode(0).permute(1, 2, 0)
    assert torch.equal(pixels[0], decoded[16:240, 64:288])
    # 448 of 512 px, halved: the quadrants, and nothing of the black outside the crop (4 px off the edges,
    # where JPEG's chroma upsampling and the resampling filter blend neighbours)
    expected, pixels = torch.from_numpy(COLOURS).int(), pixels.int()
    for k in range(2):
        for q, (rows, cols) in enumerate([(slice(4, 108), slice(4, 108)), (slice(4, 108), slice(116, 220)),
                                          (slice(116, 220), slice(4, 108)), (slice(116, 220), slice(116, 220))]):
            assert (pixels[k, rows, cols] - expected[q]).abs().max() <= 4, (k, q)
        assert pixels[k].sum(-1).min() > 200  # every colour sums to 280 or more, the border to 0


def test_train_batches_are_a_pure_function_of_seed_epoch_rank(jpeg_data):
    root, _ = jpeg_data
    spec = spec_of(root)
    first = list(JpegTrainLoader(spec).epoch(2))
    other = JpegTrainLoader(spec)
    list(other.epoch(0))  # another history before epoch 2
    again = list(other.epoch(2))
    assert len(first) == len(other) == 6
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
        assert a.images.shape == (4, 3, 224, 224) and a.pair_images is None
    expected, _ = epoch_order(open_dataset(str(root)).labels["train"], 4, 1, 0, seed=3, epoch=2, paired=False)
    assert np.array_equal(torch.cat([b.index for b in first]).numpy(), expected)
    later = list(other.epoch(3))
    assert not torch.equal(first[0].images, later[0].images)
    # the same sample crops differently in another epoch and on another rank
    index = int(first[0].index[0])
    step, pos = next((s, int(torch.nonzero(b.index == index)[0])) for s, b in enumerate(later) if index in b.index)
    assert not torch.equal(first[0].images[0], later[step].images[pos])
    # rank 1 of 2 takes the samples that the single rank takes in its second step, cropped in its own stream
    rank1 = next(JpegTrainLoader(spec, shard=Shard(1, 2)).epoch(2))
    assert torch.equal(rank1.index, first[1].index) and not torch.equal(rank1.images, first[1].images)


def test_rrc_boxes_per_sample_equal_the_batched_augmentations():
    for h, w in [(96, 128), (4, 400), (400, 4), (224, 224)]:
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        assert torch.equal(rrc_boxes([h] * 500, [w] * 500, g1), A.rrc_boxes(500, h, w, g2)), (h, w)
    boxes = rrc_boxes([50, 300], [300, 50], torch.Generator().manual_seed(0))
    assert (boxes[:, 0] + boxes[:, 2] <= torch.tensor([50, 300])).all()
    assert (boxes[:, 1] + boxes[:, 3] <= torch.tensor([300, 50])).all()


def test_class_pairs_and_views(jpeg_data):
    root, _ = jpeg_data
    spec = spec_of(root, sampling=Sampling("class_pairs"), num_views=2, color_jitter=0.4)
    batches = list(JpegTrainLoader(spec).epoch(1))
    labels = open_dataset(str(root)).labels["train"]
    expected, sizes = epoch_order(labels, 4, 1, 0, seed=3, epoch=1, paired=True)
    got = np.concatenate([np.concatenate([b.index.numpy(), b.pair_index.numpy()]) for b in batches])
    assert np.array_equal(got, expected) and [len(b.labels) for b in batches] == sizes
    for b in batches:
        assert torch.equal(b.labels, b.pair_labels) and torch.equal(b.labels, torch.from_numpy(labels[b.index]))
        assert b.images.shape == b.pair_images.shape == b.views[0].shape == (len(b.labels), 3, 224, 224)


def test_cached_evaluation_equals_decoding_per_batch(jpeg_data, monkeypatch):
    root, _ = jpeg_data
    spec = spec_of(root, eval_batch=3)
    cached = JpegEvalLoader(spec, shard=Shard(1, 2))
    first = list(cached)
    assert cached.cache is not None and cached.filled == 5 and "cached on cpu (5 x 224 x 224 x 3" in cached.why
    second = list(cached)  # served from the cache
    import cskd.device_loader

    monkeypatch.setattr(cskd.device_loader, "MEMORY_SHARE", 0.0)
    plain = JpegEvalLoader(spec, shard=Shard(1, 2))
    third = list(plain)
    assert plain.cache is None and "not cached" in plain.why and "decoding it at every evaluation" in plain.why
    for a, b, c in zip(first, second, third, strict=True):
        assert all(torch.equal(u, v) and torch.equal(u, w) for u, v, w in zip(a, b, c))
    assert torch.cat([idx for _, _, idx in first]).tolist() == [5, 6, 7, 8, 9]


def test_partial_first_pass_then_cache(jpeg_data):
    root, _ = jpeg_data
    loader = JpegEvalLoader(spec_of(root, eval_batch=4))
    it = iter(loader)
    head = next(it)
    it.close()  # an evaluation stopped early: the rest is decoded (and cached) next time
    assert loader.filled == 4
    full = list(loader)
    assert loader.filled == 10 and torch.equal(full[0][0], head[0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full, loader))


def test_damaged_jpeg_is_one_line_naming_file_and_sample(jpeg_data, tmp_path):
    root, _ = jpeg_data
    copy = tmp_path / "damaged"
    shutil.copytree(root, copy)
    store = BetonImages(str(copy / "train.beton"))
    bad = int(np.flatnonzero(store.mode == 0)[3])
    with open(copy / "train.beton", "r+b") as f:
        f.seek(int(store.ptr[bad]))
        f.write(b"\x00" * 16)  # no JPEG start-of-image marker
    spec = spec_of(copy, batch_per_rank=24)  # one step: every sample
    with pytest.raises(DataError) as err:
        list(JpegTrainLoader(spec).epoch(0))
    message = str(err.value)
    assert "\n" not in message and f"{copy / 'train.beton'}: sample {bad} (index {bad})" in message
    assert "not a decodable JPEG" in message and "datasets_prep" in message


def test_cskd_epoch_with_jpeg_loader(jpeg_data, tmp_path, capsys):
    """A whole CS-KD run through cskd.train (in this process: a fresh one spends seconds importing FFCV)."""
    from cskd.config import load_config
    from cskd.train import main

    root, _ = jpeg_data
    cfg = load_config(str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                      [f"data.path={root}", f"out_dir={tmp_path / 'run'}", "epochs=1", "threads=1", "method=cskd",
                       "data.loader=jpeg", "data.pipeline=imagenet224", "batch.global=8", "data.eval_batch_size=4"])
    summary = main(cfg)
    out = capsys.readouterr().out
    assert "jpeg loader (data.loader=jpeg; " in out and "jpeg loader: test split cached on cpu" in out
    assert summary and (tmp_path / "run" / "summary.json").is_file()
