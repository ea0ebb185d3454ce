"""The one-pass .beton writer: FFCV's own layout byte for byte, the same bytes whatever the number of
workers, pages that grow for outsized images, exact pixel statistics, and workers that cannot hang it."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cskd.beton import read_beton
from datasets_prep.__main__ import main as prep
from datasets_prep.beton_writer import MIN_PAGE, MODE_RAW, BetonWriter
from datasets_prep.images import Resize
from datasets_prep.writer import Encoding, write_split
from tests.test_prep import read_split


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mixed_samples(n: int = 30) -> list:
    """Small images (stored raw under 'smart') and larger textured ones (JPEG), enough for two pages."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(n):
        h, w = ((24, 40) if i % 3 == 0 else (180 + i, 260 - i))
        base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = np.repeat(np.repeat(base, 4, 0), 4, 1)[:h, :w] ^ rng.integers(0, 8, (h, w, 3), dtype=np.uint8)
        samples.append((np.ascontiguousarray(img), i % 4))
    return samples


def test_same_bytes_as_ffcv_datasetwriter(tmp_path):
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    samples = mixed_samples()

    class Indexed:
        def __len__(self):
            return len(samples)

        def __getitem__(self, i):
            return samples[i][0], samples[i][1], i

    ffcv_path, ours = tmp_path / "ffcv.beton", tmp_path / "ours.beton"
    fields = {"image": RGBImageField(write_mode="smart", jpeg_quality=90, smart_threshold=64 * 64 * 3),
              "label": IntField(), "index": IntField()}
    DatasetWriter(str(ffcv_path), fields, page_size=MIN_PAGE, num_workers=1).from_indexed_dataset(Indexed())
    result = write_split(ours, samples, Encoding(Resize(), "smart", 90, stats=False), 1, False, "train")
    assert len(read_beton(ours).alloc_table) == 30 and result.bytes == ours.stat().st_size
    assert ours.stat().st_size > 2 * MIN_PAGE  # several pages
    assert sha(ours) == sha(ffcv_path)


def test_bytes_do_not_depend_on_workers_and_stats_are_exact(tmp_path):
    samples = mixed_samples(40)
    enc = Encoding(Resize(max_side=128), "auto", 85, stats=True)
    one = write_split(tmp_path / "one.beton", samples, enc, 1, False, "train")
    three = write_split(tmp_path / "three.beton", samples, enc, 3, False, "train")
    assert sha(tmp_path / "one.beton") == sha(tmp_path / "three.beton")
    from datasets_prep.images import load_rgb

    pixels = np.concatenate([load_rgb(img, max_side=128).reshape(-1, 3) for img, _ in samples]) / 255
    mean, std = three.mean_std()
    assert np.allclose(mean, pixels.mean(0), atol=1e-6) and np.allclose(std, pixels.std(0), atol=1e-6)
    assert three.max_side == 128 and one.mean_std() == (mean, std)


def test_a_page_grows_for_an_outsized_image_and_every_sample_stays_in_one_page(tmp_path):
    path = tmp_path / "grow.beton"
    blobs = [bytes([1]) * 1000, bytes([2]) * (3 << 20), bytes([3]) * 5000, bytes([4]) * (MIN_PAGE - 100)]
    writer = BetonWriter(path, len(blobs), MIN_PAGE)
    for i, blob in enumerate(blobs):
        writer.add(blob, MODE_RAW, 1024, len(blob) // 3072, i, i)
    writer.close()
    beton = read_beton(path)
    page = int(np.log2(8 << 20))
    assert beton.num_samples == 4 and (1 << page) == 8 << 20  # grown to hold twice the 3 MiB image
    from ffcv.reader import Reader

    assert Reader(str(path)).page_size == 8 << 20
    for (sample, ptr, size), blob in zip(beton.alloc_table, blobs):
        assert ptr >> page == (ptr + size - 1) >> page  # FFCV reads a sample from one page
        assert bytes(beton.data[ptr:ptr + size]) == blob
    assert list(beton.field("label")) == [0, 1, 2, 3]


def test_the_conversion_reads_back_through_ffcvs_loader(tmp_path):
    out = tmp_path / "m"
    assert prep(["mnist5k", "--out", str(out), "--workers", "2"]) == 0
    images, labels, index = read_split(out / "train.beton")
    meta = json.loads((out / "meta.json").read_text())
    assert images.shape == (4000, 32, 32, 3) and list(index) == list(range(4000))
    assert np.bincount(labels).tolist() == meta["counts"]["train"]["per_class"]
    pixels = images.reshape(-1, 3) / 255
    assert np.allclose(meta["mean"], pixels.mean(0), atol=1e-6) and np.allclose(meta["std"], pixels.std(0), atol=1e-6)


@pytest.mark.parametrize("workers", [1, 2])
def test_an_undecodable_image_stops_the_pass_or_is_skipped(tmp_path, workers):
    from datasets_prep.writer import DataError

    good = tmp_path / "good.png"
    from PIL import Image

    Image.new("RGB", (70, 70), (1, 2, 3)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg")
    samples = [(good, 0), (bad, 1), (good, 1)]
    enc = Encoding(Resize(), "auto", 90, stats=False)
    with pytest.raises(DataError, match=f"an image cannot be decoded: {bad}: cannot decode image"):
        write_split(tmp_path / "x.beton", samples, enc, workers, False, "train")
    result = write_split(tmp_path / "y.beton", samples, enc, workers, True, "train")
    assert [s for s, _ in result.kept] == [good, good] and [n for n, _ in result.bad] == [str(bad)]
    assert list(read_beton(tmp_path / "y.beton").field("index")) == [0, 1]


def test_progress_lines_in_a_log_and_a_bar_on_a_terminal():
    import io

    from datasets_prep.progress import Progress

    log = io.StringIO()
    progress = Progress("train", 50, stream=log)
    for done in range(1, 51):
        progress.update(done, skipped=done // 25)
    progress.close()
    lines = log.getvalue().splitlines()
    assert lines[0] == "train: 50 images ..." and len(lines) == 11  # a line per tenth
    assert lines[-1].startswith("train: 50/50 images (100%), ") and lines[-1].endswith("left, skipped 2")
    assert "images/s" in lines[5]

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    screen = Terminal()
    bar = Progress("test", 10, stream=screen)
    bar.update(10, 1)
    bar.close()
    assert bar.bar is None and "test: 10 images ..." not in screen.getvalue()  # rich drew (and cleared) a bar
