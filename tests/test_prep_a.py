"""Readers for CIFAR-10/100, TinyImageNet and CUB-200-2011 on tiny replicas of the real layouts,
converted through the CLI and read back from the .beton files; plus the bad-input paths."""
import json
import os
import pickle

import numpy as np
from PIL import Image

from datasets_prep.__main__ import main as prep
from datasets_prep.images import Resize, load_rgb

OPTS = ["--workers", "1", "--allow-count-mismatch"]


def labels_and_index(path):
    """(labels, index) of a .beton from FFCV's reader metadata, without decoding (or JIT-compiling) anything."""
    from ffcv.reader import Reader

    r = Reader(str(path))
    field = {name: f"f{i}" for i, name in enumerate(r.field_names)}
    return r.metadata[field["label"]].astype(int).tolist(), r.metadata[field["index"]].astype(int).tolist()


def jpeg(path, seed, size=(40, 30), mode="RGB", fmt="JPEG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    img.convert(mode).save(path, format=fmt)
    return path


def convert(name, src, out, *extra):
    return prep([name, "--src", str(src), "--out", str(out), *OPTS, *extra])


# --- CIFAR ---------------------------------------------------------------------------------------

def cifar_batch(labels, seed, **extra):
    data = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    return {"data": data, "batch_label": "x", "filenames": [f"f{i}.png" for i in range(len(labels))], **extra}


def dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=2))


def test_cifar10_labels_order_and_pixels(tmp_path, capsys):
    root = tmp_path / "cifar-10-batches-py"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    dump(root / "batches.meta", {"label_names": names, "num_vis": 3072})
    for i in range(1, 6):
        dump(root / f"data_batch_{i}", {**cifar_batch([i - 1, 10 - i], i), "labels": [i - 1, 10 - i]})
    dump(root / "test_batch", {**cifar_batch([0, 7, 3], 9), "labels": [0, 7, 3]})
    out = tmp_path / "out"
    assert convert("cifar10", tmp_path, out) == 0  # --src is the parent of cifar-10-batches-py
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == names and meta["write_mode"] == "raw" and meta["max_side"] == 32
    assert meta["count_check"]["problems"] == ["cifar10 train: 10 images, the official split has 50000",
                                               "cifar10 test: 3 images, the official split has 10000"]
    assert labels_and_index(out / "train.beton") == ([0, 9, 1, 8, 2, 7, 3, 6, 4, 5], list(range(10)))
    assert labels_and_index(out / "test.beton") == ([0, 7, 3], [0, 1, 2])
    # raw mode is bit-exact: the first test image is plane R, G, B of row 0 of the pickle
    from tests.test_prep import read_split

    images, labels, index = read_split(out / "test.beton")
    data = cifar_batch([0, 7, 3], 9)["data"]
    assert np.array_equal(images[0], data[0].reshape(3, 32, 32).transpose(1, 2, 0))
    px = np.concatenate([cifar_batch([0, 0], i)["data"] for i in range(1, 6)]).reshape(-1, 3, 1024) / 255
    assert np.allclose(meta["mean"], px.mean((0, 2)), atol=1e-6)
    assert "train: 10 images" in capsys.readouterr().out


def test_cifar100_fine_labels_and_coarse_map(tmp_path, capsys):
    root = tmp_path / "cifar-100-python"
    fine = [f"c{i:02d}" for i in range(100)]
    dump(root / "meta", {"fine_label_names": fine, "coarse_label_names": [f"s{i}" for i in range(20)]})
    train = list(range(100)) + [99]
    dump(root / "train", {**cifar_batch(train, 1), "fine_labels": train, "coarse_labels": [y // 5 for y in train]})
    dump(root / "test", {**cifar_batch([5, 42], 2), "fine_labels": [5, 42], "coarse_labels": [1, 8]})
    out = tmp_path / "out"
    assert prep(["cifar100", "--src", str(root), "--out", str(out), "--workers", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cifar100 train: 101 images, the official split has 50000") and not out.exists()
    assert convert("cifar100", root, out) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == fine and meta["num_classes"] == 100
    assert meta["coarse_classes"][3] == "s3" and meta["coarse_of_class"] == [y // 5 for y in range(100)]
    assert meta["counts"]["train"]["per_class"] == [1] * 99 + [2]
    assert labels_and_index(out / "test.beton") == ([5, 42], [0, 1])



class Touch:
    """A pickle that runs code when loaded: it would create the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_cifar_pickles_are_read_without_running_code(tmp_path, capsys):
    from datasets_prep import cifar

    # real CIFAR files were written by numpy 1 under Python 2: numpy.core.multiarray, not numpy._core
    batch = {**cifar_batch([3, 1], 0), "labels": [3, 1]}
    old = pickle.dumps(batch, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    (tmp_path / "numpy1").write_bytes(old)
    loaded = cifar._load(tmp_path / "numpy1", "a batch")
    assert loaded["labels"] == [3, 1] and np.array_equal(loaded["data"], batch["data"])

    root = tmp_path / "cifar-10-batches-py"
    dump(root / "batches.meta", {"label_names": [str(c) for c in range(10)]})
    marker = tmp_path / "code-ran"
    dump(root / "data_batch_1", {**cifar_batch([0], 1), "labels": Touch(marker)})
    assert convert("cifar10", root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "data_batch_1: not a CIFAR pickle (UnpicklingError: it names posix.system, which CIFAR pickles never" in err
    assert not marker.exists() and not (tmp_path / "out").exists()

# --- TinyImageNet ----------------------------------------------------------------------------------

WNIDS = ["n04067472", "n02124075", "n01443537"]  # as in the real file: not sorted


def tiny_replica(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir(parents=True)
    (root / "wnids.txt").write_bytes("\r\n".join(WNIDS).encode() + b"\r\n")  # CRLF
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn02124075\tEgyptian cat\n"
                                    "n04067472\treel\nn00001740\tentity\n")
    for k, wnid in enumerate(WNIDS):
        for j in range(k + 1):  # 1, 2, 3 images
            jpeg(root / "train" / wnid / "images" / f"{wnid}_{j}.JPEG", 10 * k + j, (64, 64))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    jpeg(root / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_0.JPEG", 0, (64, 64), mode="L")  # grayscale
    jpeg(root / "train" / WNIDS[1] / "images" / f"{WNIDS[1]}_1.JPEG", 1, (64, 64), mode="CMYK")
    jpeg(root / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_2.JPEG", 2, (64, 64), fmt="PNG")  # PNG named .JPEG
    val = [("val_0.JPEG", WNIDS[2]), ("val_1.JPEG", WNIDS[0]), ("val_2.JPEG", WNIDS[1])]
    for i, (name, _) in enumerate(val):
        jpeg(root / "val" / "images" / name, 100 + i, (64, 64))
    (root / "val" / "val_annotations.txt").write_text("".join(f"{n}\t{w}\t0\t0\t10\t10\n" for n, w in val))
    return root


def test_tinyimagenet_sorted_wnids_and_decoded_images(tmp_path):
    root = tiny_replica(tmp_path)
    out = tmp_path / "out"
    assert convert("tinyimagenet", tmp_path, out, "--size", "32") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == ["n01443537", "n02124075", "n04067472"]  # sorted, not wnids.txt order
    assert meta["class_names"] == ["goldfish, Carassius auratus", "Egyptian cat", "reel"]
    assert meta["image_size"] == [32, 32] and meta["conversion"]["resize"] == "short-side-center-crop"
    # train in sorted-wnid order, files sorted: n01443537 (3 images), n02124075 (2), n04067472 (1)
    assert labels_and_index(out / "train.beton") == ([0, 0, 0, 1, 1, 2], list(range(6)))
    assert labels_and_index(out / "test.beton") == ([0, 2, 1], [0, 1, 2])
    from tests.test_prep import read_split

    images, labels, _ = read_split(out / "train.beton")
    expect = [load_rgb(p, resize=Resize(None, "short-side-center-crop", 32)) for p in
              [root / "train" / w / "images" / f"{w}_{j}.JPEG" for w, n in
               (("n01443537", 3), ("n02124075", 2), ("n04067472", 1)) for j in range(n)]]
    assert images.shape == (6, 32, 32, 3) and np.array_equal(images, np.stack(expect))
    gray = images[5]  # n04067472_0, saved as L
    assert (gray[..., 0] == gray[..., 1]).all()


def test_load_rgb_modes_and_resize(tmp_path):
    cmyk = jpeg(tmp_path / "c.JPEG", 0, (50, 20), mode="CMYK")
    assert load_rgb(cmyk).shape == (20, 50, 3)
    assert load_rgb(cmyk, max_side=25).shape == (10, 25, 3)
    png = jpeg(tmp_path / "p.JPEG", 0, (8, 6), fmt="PNG")
    assert load_rgb(png).dtype == np.uint8 and load_rgb(png).shape == (6, 8, 3)
    i16 = tmp_path / "i16.png"
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(i16)
    assert load_rgb(i16).min() == 255  # 16-bit white stays white
    Image.new("RGBA", (5, 9)).save(tmp_path / "a.png")
    assert load_rgb(tmp_path / "a.png", resize=Resize(None, "short-side-center-crop", 4)).shape == (4, 4, 3)


# --- CUB-200-2011 ----------------------------------------------------------------------------------

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# image id, class id, is_training_image
CUB_IMAGES = [(1, 1, 1), (2, 1, 0), (3, 2, 0), (4, 2, 1), (5, 2, 1), (6, 3, 1), (7, 3, 0)]


def cub_replica(tmp_path):
    root = tmp_path / "CUB_200_2011"
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for i, c, t in CUB_IMAGES:
        rel = f"{CUB_CLASSES[c - 1]}/{CUB_CLASSES[c - 1][4:]}_00{i:02d}_{796000 + i}.jpg"
        jpeg(root / "images" / rel, i, (60 + i, 45))  # 61..67 wide
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} {c}")
        lines["train_test_split.txt"].append(f"{i} {t}")
    jpeg(next((root / "images" / CUB_CLASSES[1]).iterdir()), 0, (30, 60), mode="L")
    for name, rows in lines.items():
        (root / name).write_text("\n".join(rows) + "\n")
    (root / "classes.txt").write_bytes(b"".join(f"{i} {c}\r\n".encode() for i, c in enumerate(CUB_CLASSES, 1)))
    return root


def test_cub200_labels_split_and_summary(tmp_path, capsys):
    root = cub_replica(tmp_path)
    out = tmp_path / "out"
    assert convert("cub200", root, out, "--max-side", "48") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == CUB_CLASSES and meta["image_size"] is None and meta["max_side"] == 48
    assert meta["write_mode"] == "raw"  # auto: no stored side over 64
    assert meta["counts"]["train"] == {"total": 4, "per_class": [1, 2, 1]}
    assert set(meta["source"]["files"]) == {f"CUB_200_2011/{n}" for n in
                                            ("images.txt", "image_class_labels.txt", "train_test_split.txt",
                                             "classes.txt")}
    assert labels_and_index(out / "train.beton") == ([0, 1, 1, 2], [0, 1, 2, 3])  # ids 1, 4, 5, 6
    assert labels_and_index(out / "test.beton") == ([0, 1, 2], [0, 1, 2])  # ids 2, 3, 7
    assert meta["files"]["train.beton"]["bytes"] == (out / "train.beton").stat().st_size
    summary = capsys.readouterr().out
    assert "train: 4 images" in summary and "skipped: 0" in summary and "images/s" in summary
    assert convert("cub200", root, out, "--max-side", "48") == 0
    assert "up to date" in capsys.readouterr().out


def error_of(capsys, *args):
    assert prep(list(map(str, args))) == 2
    err = capsys.readouterr().err
    *progress, last = err.splitlines()  # progress lines (non-TTY), then the one-line error
    assert last.startswith("error: ") and not any("error" in line for line in progress)
    return last


def test_missing_list_file_and_missing_image(tmp_path, capsys):
    root = cub_replica(tmp_path)
    (root / "train_test_split.txt").unlink()
    assert "train_test_split.txt is missing" in error_of(capsys, "cub200", "--src", root, "--out", tmp_path / "o")
    root = tiny_replica(tmp_path / "t")
    (root / "val" / "images" / "val_1.JPEG").unlink()
    err = error_of(capsys, "tinyimagenet", "--src", root, "--out", tmp_path / "o")
    assert "val_annotations.txt line 2: val_1.JPEG has no image" in err
    assert not (tmp_path / "o").exists()


def test_empty_class(tmp_path, capsys):
    root = tiny_replica(tmp_path)
    for p in (root / "train" / WNIDS[0] / "images").iterdir():
        p.unlink()
    assert f"class {WNIDS[0]} has no training image" in error_of(capsys, "tinyimagenet", "--src", root,
                                                                 "--out", tmp_path / "o")
    root = cub_replica(tmp_path / "c")  # a class with test images only
    (root / "train_test_split.txt").write_text("".join(f"{i} {int(c != 3 and t)}\n" for i, c, t in CUB_IMAGES))
    assert "with no training image: 003.Sooty_Albatross" in error_of(capsys, "cub200", "--src", root, "--out",
                                                                      tmp_path / "o", "--allow-count-mismatch")


def test_undecodable_image_named_or_skipped(tmp_path, capsys):
    root = cub_replica(tmp_path)
    bad = root / "images" / CUB_CLASSES[1] / "Laysan_Albatross_0005_796005.jpg"  # image 5, train
    bad.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "out"
    err = error_of(capsys, "cub200", "--src", root, "--out", out, *OPTS)
    assert f"{bad}: cannot decode image" in err and "--skip-bad" in err and not out.exists()
    assert convert("cub200", root, out, "--skip-bad") == 0
    meta = json.loads((out / "meta.json").read_text())
    assert [(s["split"], s["image"]) for s in meta["skipped"]] == [("train", str(bad))]
    assert meta["write_mode"] == "smart" and meta["max_side"] == 67  # auto: JPEG above 64x64
    assert labels_and_index(out / "train.beton") == ([0, 1, 2], [0, 1, 2])  # ids 1, 4, 6
    assert "skipped: 1" in capsys.readouterr().out
    (root / "images" / CUB_CLASSES[2] / "Sooty_Albatross_0006_796006.jpg").write_bytes(b"")  # its class's only one
    assert "no training image: 003.Sooty_Albatross" in error_of(capsys, "cub200", "--src", root, "--out", out,
                                                                 *OPTS, "--skip-bad", "--force")
    assert labels_and_index(out / "train.beton")[0] == [0, 1, 2]  # the previous conversion is intact


def test_unknown_reader_module_is_explained(monkeypatch, capsys):
    from datasets_prep import __main__ as cli

    monkeypatch.setitem(cli.READERS, "cub200", "datasets_prep.nonexistent")
    assert "reader datasets_prep.nonexistent is missing" in error_of(capsys, "cub200", "--src", "x", "--out", "y")
