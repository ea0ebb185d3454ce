"""datasets_prep against hostile inputs: malformed sources, output directories that hold something
else, conversions killed mid-write, dying workers, damaged meta.json. Every refusal is exit 2 with
one `error:` line, no traceback, and no file or folder written or changed.

Most cases call `datasets_prep.__main__.main` in-process (the CLI's code path); a few run the real
command in a subprocess: the headline refusal, the SIGKILL test and a worker that dies.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.io as sio

from conftest import REPO, assert_refused, file_tree, run_cli
from cskd.errors import DataError
from cskd.lock import DirLock
from datasets_prep import staging
from datasets_prep.__main__ import main as prep
from tests.test_prep_a import CUB_IMAGES, WNIDS, Touch, cifar_batch, cub_replica, dump, tiny_replica
from tests.test_prep_b import make_dogs, make_imagenet, make_mit67, savemat_list

OPTS = ["--workers", "1", "--allow-count-mismatch"]


def snapshot(*roots: Path) -> dict:
    """file_tree plus every directory: a refusal must not even leave an empty folder behind."""
    tree = file_tree(*roots)
    for root in roots:
        tree.update({str(p): "dir" for p in Path(root).rglob("*") if p.is_dir()} if Path(root).exists() else {})
    return tree


def refused(capsys, args, fragment: str, *roots: Path) -> str:
    """Run the CLI in-process and assert a clean refusal that changed nothing under `roots`."""
    before = snapshot(*roots)
    res = SimpleNamespace(returncode=prep([str(a) for a in args]), stderr=capsys.readouterr().err)
    assert_refused(res, fragment)
    assert snapshot(*roots) == before, "files or folders were written or changed"
    return res.stderr.strip()


# --- CIFAR pickles ----------------------------------------------------------------------------------

NAMES = [f"class{i}" for i in range(10)]


def cifar10_replica(src: Path) -> Path:
    root = src / "cifar-10-batches-py"
    dump(root / "batches.meta", {"label_names": NAMES})
    for i in range(1, 6):
        dump(root / f"data_batch_{i}", {**cifar_batch([i - 1, 10 - i], i), "labels": [i - 1, 10 - i]})
    dump(root / "test_batch", {**cifar_batch([0, 7, 3], 9), "labels": [0, 7, 3]})
    return root


def cifar100_replica(src: Path) -> Path:
    root = src / "cifar-100-python"
    dump(root / "meta", {"fine_label_names": [f"f{i}" for i in range(100)],
                         "coarse_label_names": [f"c{i}" for i in range(20)]})
    train = list(range(100))
    dump(root / "train", {**cifar_batch(train, 1), "fine_labels": train, "coarse_labels": [y // 5 for y in train]})
    dump(root / "test", {**cifar_batch([5, 42], 2), "fine_labels": [5, 42], "coarse_labels": [1, 8]})
    return root


def batch1(**entries):
    """data_batch_1 with two images, labels [1, 2], and `entries` replaced (None: removed)."""
    d = {**cifar_batch([1, 2], 0), "labels": [1, 2], **entries}
    return {k: v for k, v in d.items() if v is not None}


def write_bytes(name: str, data: bytes):
    return lambda root: (root / name).write_bytes(data)


def truncate(name: str, keep: float = 0.5):
    def cut(root):
        blob = (root / name).read_bytes()
        (root / name).write_bytes(blob[:int(len(blob) * keep)])
    return cut


def replace_by_dir(name: str):
    def swap(root):
        target = root / name
        target.unlink()
        target.mkdir()
    return swap


CIFAR10_CASES = [  # (case, mutation of cifar-10-batches-py/, fragment of the one error line)
    ("data not an array", lambda r: dump(r / "data_batch_1", batch1(data=[[0] * 3072] * 2)),
     "data_batch_1: 'data' is a list, expected a uint8 N x 3072 array"),
    ("data of wrong shape", lambda r: dump(r / "data_batch_1", batch1(data=np.zeros((2, 1024), np.uint8))),
     "data_batch_1: 'data' is a uint8 array of shape (2, 1024)"),
    ("data of wrong dtype", lambda r: dump(r / "data_batch_1", batch1(data=np.zeros((2, 3072), np.float32))),
     "data_batch_1: 'data' is a float32 array of shape (2, 3072)"),
    ("labels a string", lambda r: dump(r / "data_batch_1", batch1(labels="12")),
     "data_batch_1 'labels': labels are str, expected a list of integers"),
    ("labels a float array", lambda r: dump(r / "data_batch_1", batch1(labels=np.array([1.0, 2.0]))),
     "data_batch_1 'labels': labels are ndarray, expected a list of integers"),
    ("label a string", lambda r: dump(r / "data_batch_1", batch1(labels=["1", 2])),
     "data_batch_1 'labels': label 0 is '1' (str), not an integer"),
    ("label a float", lambda r: dump(r / "data_batch_1", batch1(labels=[1, 2.5])),
     "label 1 is 2.5 (float), not an integer"),
    ("label a bool", lambda r: dump(r / "data_batch_1", batch1(labels=[True, 2])),
     "label 0 is True (bool), not an integer"),
    ("label out of range", lambda r: dump(r / "data_batch_1", batch1(labels=[1, 10])),
     "data_batch_1 'labels': label 1 is 10, outside 0..9 (10 classes)"),
    ("label negative", lambda r: dump(r / "data_batch_1", batch1(labels=[-1, 2])),
     "label 0 is -1, outside 0..9"),
    ("fewer labels than images", lambda r: dump(r / "data_batch_1", batch1(labels=[1])),
     "data_batch_1: 2 images but 1 'labels'"),
    ("labels missing", lambda r: dump(r / "data_batch_1", batch1(labels=None)),
     "data_batch_1 has no 'labels' entry"),
    ("data missing", lambda r: dump(r / "data_batch_1", batch1(data=None)),
     "data_batch_1 has no 'data' entry"),
    ("not a dict", lambda r: dump(r / "data_batch_1", [1, 2]), "data_batch_1: holds a list, not a CIFAR dict"),
    ("truncated pickle", truncate("data_batch_2"), "data_batch_2: not a CIFAR pickle"),
    ("empty file", write_bytes("test_batch", b""), "test_batch: not a CIFAR pickle (EOFError"),
    ("not a pickle", write_bytes("test_batch", b"GIF89a" + bytes(100)), "test_batch: not a CIFAR pickle"),
    ("a directory", replace_by_dir("data_batch_4"), "data_batch_4 is not a file"),
    ("a missing batch", lambda r: (r / "data_batch_3").unlink(), "data_batch_3 is missing"),
    ("code in the pickle", lambda r: dump(r / "data_batch_1", batch1(labels=Touch(r / "ran"))),
     "it names posix.system, which CIFAR pickles never do"),
    ("label names not a list", lambda r: dump(r / "batches.meta", {"label_names": 10}),
     "batches.meta: 'label_names' is not a non-empty list of names (got int)"),
    ("label names empty", lambda r: dump(r / "batches.meta", {"label_names": []}),
     "batches.meta: 'label_names' is not a non-empty list of names"),
    ("label names missing", lambda r: dump(r / "batches.meta", {"num_vis": 3072}),
     "batches.meta has no 'label_names' entry"),
    ("truncated meta", truncate("batches.meta", 0.6), "batches.meta: not a CIFAR pickle"),
]


@pytest.mark.parametrize("case,mutate,fragment", CIFAR10_CASES, ids=[c[0] for c in CIFAR10_CASES])
def test_malformed_cifar10(tmp_path, capsys, case, mutate, fragment):
    root = cifar10_replica(tmp_path / "src")
    mutate(root)
    refused(capsys, ["cifar10", "--src", root, "--out", tmp_path / "out", *OPTS], fragment, tmp_path)
    assert not (root / "ran").exists()


def cifar100_train(**entries):
    train = list(range(100))
    d = {**cifar_batch(train, 1), "fine_labels": train, "coarse_labels": [y // 5 for y in train], **entries}
    return {k: v for k, v in d.items() if v is not None}


CIFAR100_CASES = [
    ("coarse label out of range", lambda r: dump(r / "train", cifar100_train(coarse_labels=[20] + [0] * 99)),
     "train 'coarse_labels': label 0 is 20, outside 0..19"),
    ("coarse labels missing", lambda r: dump(r / "train", cifar100_train(coarse_labels=None)),
     "train has no 'coarse_labels' entry"),
    ("fewer coarse labels", lambda r: dump(r / "train", cifar100_train(coarse_labels=[0] * 99)),
     "train: 100 fine but 99 coarse labels"),
    ("fine label in two coarse classes", lambda r: dump(r / "test", {**cifar_batch([5, 42], 2), "fine_labels": [5, 42],
                                                                     "coarse_labels": [2, 8]}),
     "test: fine label 5 has two coarse labels (1, 2)"),
    ("fine label out of range", lambda r: dump(r / "test", {**cifar_batch([5, 100], 2), "fine_labels": [5, 100],
                                                            "coarse_labels": [1, 8]}),
     "test 'fine_labels': label 1 is 100, outside 0..99"),
    ("coarse names missing", lambda r: dump(r / "meta", {"fine_label_names": [f"f{i}" for i in range(100)]}),
     "meta has no 'coarse_label_names' entry"),
]


@pytest.mark.parametrize("case,mutate,fragment", CIFAR100_CASES, ids=[c[0] for c in CIFAR100_CASES])
def test_malformed_cifar100(tmp_path, capsys, case, mutate, fragment):
    root = cifar100_replica(tmp_path / "src")
    mutate(root)
    refused(capsys, ["cifar100", "--src", root, "--out", tmp_path / "out", *OPTS], fragment, tmp_path)


# --- CUB-200-2011 lists ------------------------------------------------------------------------------

def edit(name: str, change):
    """Rewrite a CUB list: `change` maps its lines to new lines."""
    def apply(root):
        lines = (root / name).read_text().splitlines()
        (root / name).write_text("\n".join(change(lines)) + "\n")
    return apply


CUB_CASES = [
    ("non-integer image id", edit("images.txt", lambda L: ["x1 " + L[0].split()[1]] + L[1:]),
     "images.txt line 1: id 'x1' is not an integer"),
    ("non-integer class id, after blank lines", edit("image_class_labels.txt",
                                                     lambda L: ["", ""] + L[:2] + ["3 two"] + L[3:]),
     "image_class_labels.txt line 5: class id 'two' is not an integer"),
    ("three columns", edit("image_class_labels.txt", lambda L: L[:1] + ["2 1 1"] + L[2:]),
     "image_class_labels.txt line 2: expected 2 columns '<image_id> <class_id>', got '2 1 1'"),
    ("one column", edit("images.txt", lambda L: L[:-1] + ["7"]), "images.txt line 7: expected 2 columns"),
    ("id missing from the labels", edit("image_class_labels.txt", lambda L: L[:2] + L[3:]),
     "image_class_labels.txt: no entry for image id 3"),
    ("id missing from the split", edit("train_test_split.txt", lambda L: L[:-1]),
     "train_test_split.txt: no entry for image id 7"),
    ("id only in the split", edit("train_test_split.txt", lambda L: L + ["99 1"]),
     "train_test_split.txt line 8: image id 99 is not in"),
    ("id listed twice", edit("images.txt", lambda L: L + [L[0]]),
     "images.txt line 8: id 1 is listed twice (also line 1)"),
    ("split flag not 0 or 1", edit("train_test_split.txt", lambda L: L[:3] + ["4 yes"] + L[4:]),
     "train_test_split.txt line 4: is_training_image is 'yes', expected 0 or 1"),
    ("non-integer class id in classes.txt", edit("classes.txt", lambda L: ["one " + L[0].split()[1]] + L[1:]),
     "classes.txt line 1: id 'one' is not an integer"),
    ("class id out of range", edit("image_class_labels.txt", lambda L: ["1 9"] + L[1:]),
     "image_class_labels.txt line 1: class 9 does not match the folder"),
    ("not UTF-8", lambda r: (r / "images.txt").write_bytes(b"1 a.jpg\n2 b.jpg\n3 \xff\xfe.jpg\n"),
     "images.txt line 3: not UTF-8 text"),
    ("a list that is a directory", replace_by_dir("classes.txt"), "classes.txt is not a file"),
]


@pytest.mark.parametrize("case,mutate,fragment", CUB_CASES, ids=[c[0] for c in CUB_CASES])
def test_malformed_cub200(tmp_path, capsys, case, mutate, fragment):
    root = cub_replica(tmp_path / "src")
    assert len(CUB_IMAGES) == 7  # the line numbers above
    mutate(root)
    refused(capsys, ["cub200", "--src", root, "--out", tmp_path / "out", *OPTS], fragment, tmp_path)


# --- other readers ------------------------------------------------------------------------------------

def flip(path: Path, offset: int, value: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] = value
    path.write_bytes(bytes(data))


def dogs(mutate):
    def build(src):
        make_dogs(src)
        mutate(src)
    return "dogs", build


def imagenet(mutate, layout="devkit"):
    def build(src):
        make_imagenet(src, layout)
        mutate(src)
    return "imagenet", build


def text(path: str, data: bytes):
    return lambda src: (src / path).write_bytes(data)


TRUTH = "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
META_MAT = "ILSVRC2012_devkit_t12/data/meta.mat"
OTHER_CASES = [  # (case, (reader, build of --src), extra options, fragment)
    ("dogs: truncated .mat", dogs(truncate("train_list.mat", 0.3)), [], "train_list.mat: not a readable .mat file"),
    ("dogs: .mat of garbage", dogs(text("train_list.mat", b"garbage " * 64)), [],
     "train_list.mat: not a readable .mat file"),
    ("dogs: .mat without labels", dogs(lambda s: sio.savemat(s / "test_list.mat", {"file_list": np.zeros((2, 1))})), [],
     "test_list.mat: not a Stanford Dogs list (.mat with file_list and labels): KeyError"),
    ("dogs: fractional labels", dogs(lambda s: savemat_list(s / "test_list.mat", [("a/b.jpg", 1.5)])), [],
     "test_list.mat: file_list and labels differ in length, or labels are not integers"),
    ("dogs: Images is a file", dogs(lambda s: (shutil.rmtree(s / "Images"), (s / "Images").write_text("x"))), [],
     "Images is not a directory"),
    ("mit67: list not UTF-8", ("mit67", lambda s: (make_mit67(s), (s / "TrainImages.txt").write_bytes(
        b"airport_inside/airport_inside_0000.jpg\n\xe9t\xe9.jpg\n"))), [], "TrainImages.txt line 2: not UTF-8 text"),
    ("tinyimagenet: val labels not UTF-8", ("tinyimagenet", lambda s: (tiny_replica(s), (
        s / "tiny-imagenet-200/val/val_annotations.txt").write_bytes(b"val_0.JPEG\t\xff\n"))), [],
     "val_annotations.txt line 1: not UTF-8 text"),
    ("tinyimagenet: class images a file", ("tinyimagenet", lambda s: (tiny_replica(s), shutil.rmtree(
        s / f"tiny-imagenet-200/train/{WNIDS[1]}/images"), (s / f"tiny-imagenet-200/train/{WNIDS[1]}/images")
        .write_text(""))), [], f"{WNIDS[1]}/images is not a directory"),
    ("tinyimagenet: wnids.txt a directory", ("tinyimagenet", lambda s: (tiny_replica(s), replace_by_dir(
        "wnids.txt")(s / "tiny-imagenet-200"))), [], "wnids.txt is not a file"),
    ("imagenet: meta.mat that crashes scipy", imagenet(lambda s: flip(s / META_MAT, 776, 226)), [],
     "meta.mat: not a"),
    ("imagenet: truncated meta.mat", imagenet(truncate(META_MAT, 0.5)), [], "meta.mat: not a readable .mat file"),
    ("imagenet: non-ASCII digit id", imagenet(text(TRUTH, "\u0661\n".encode())), [],
     "ground_truth.txt: '\u0661' is not the ILSVRC2012_ID of a leaf synset"),
    ("imagenet: ground truth not UTF-8", imagenet(text(TRUTH, b"490\n\xff\n")), [],
     "ground_truth.txt line 2: not UTF-8 text"),
    ("imagenet: Kaggle CSV not UTF-8", imagenet(text("LOC_val_solution.csv", b"ImageId,PredictionString\n\xff,x\n"),
                                                "kaggle"), [], "LOC_val_solution.csv: expected UTF-8 CSV columns"),
    ("imagenet: Kaggle row without a prediction", imagenet(text("LOC_val_solution.csv", b"ImageId,PredictionString\n"
                                                                b"ILSVRC2012_val_00000001\n"), "kaggle"), [],
     "LOC_val_solution.csv: expected UTF-8 CSV columns ImageId,PredictionString"),
    ("imagenet: train is a file", imagenet(lambda s: (shutil.rmtree(s / "train"), (s / "train").write_text(""))), [],
     "train is not a directory"),
    ("mnist5k: negative seed", ("mnist5k", None), ["--seed", "-1"], "--seed must be 0 or more, got -1"),
    ("mixed: negative seed", ("mixed", None), ["--seed", "-3"], "--seed must be 0 or more, got -3"),
]


@pytest.mark.parametrize("case,reader,extra,fragment", OTHER_CASES, ids=[c[0] for c in OTHER_CASES])
def test_malformed_other_sources(tmp_path, capsys, case, reader, extra, fragment):
    name, build = reader
    src = tmp_path / "src"
    src.mkdir()
    if build:
        build(src)
    args = [name, "--out", tmp_path / "out", *OPTS, *extra] + (["--src", src] if build else [])
    refused(capsys, args, fragment, tmp_path)


def test_a_crashing_mat_reader_costs_only_its_child(tmp_path, monkeypatch):
    """scipy's reader segfaults on some corrupt files (the meta.mat case above): load_mat runs it in a
    forked child, so a crash is one DataError. Simulated here by a reader that kills its process."""
    import scipy.io

    from datasets_prep.source import load_mat

    monkeypatch.setattr(scipy.io, "loadmat", lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL))
    (tmp_path / "x.mat").write_bytes(b"x")
    with pytest.raises(DataError, match=r"x\.mat: not a readable \.mat file \(a list\): the MATLAB reader crashed "
                                        r"\(exit code -9\)"):
        load_mat(tmp_path / "x.mat", "a list")


# --- output directories that hold something else ----------------------------------------------------

@pytest.fixture(scope="module")
def cifar_done(tmp_path_factory):
    """(CIFAR-10 replica, a complete conversion of it), converted once for the module."""
    base = tmp_path_factory.mktemp("cifar")
    root = cifar10_replica(base / "src")
    assert prep(["cifar10", "--src", str(root), "--out", str(base / "done"), *OPTS]) == 0
    return root, base / "done"


def copy_of(done: Path, tmp_path: Path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(done, out)
    return out


def other_pixels(root: Path) -> None:
    dump(root / "test_batch", {**cifar_batch([0, 7, 3], 99), "labels": [0, 7, 3]})


def renamed_class(root: Path) -> None:
    dump(root / "batches.meta", {"label_names": ["plane"] + NAMES[1:]})


DIFFERENT_CASES = [  # (case, options, change of the source, fragment)
    ("max side", ["--max-side", "16"], None, "conversion.max_side: null -> 16"),
    ("write mode", ["--write-mode", "jpg"], None, 'conversion.write_mode: "auto" -> "jpg"'),
    ("jpeg quality", ["--jpeg-quality", "80"], None, "conversion.jpeg_quality: 90 -> 80"),
    ("skip bad", ["--skip-bad"], None, "conversion.skip_bad: false -> true"),
    ("resize", ["--size", "24"], None, 'conversion.resize: "none" -> "short-side-center-crop"'),
    ("source file", [], other_pixels, "source.files.cifar-10-batches-py/test_batch: "),
    ("class names", [], renamed_class, 'classes: ["class0", '),
]


@pytest.mark.parametrize("case,options,change,fragment", DIFFERENT_CASES, ids=[c[0] for c in DIFFERENT_CASES])
def test_a_different_conversion_is_not_replaced(cifar_done, tmp_path, capsys, case, options, change, fragment):
    root, done = cifar_done
    if change:
        root = shutil.copytree(root, tmp_path / "src" / root.name)
        change(root)
    out = copy_of(done, tmp_path)
    line = refused(capsys, ["cifar10", "--src", root, "--out", out, *OPTS, *options], fragment, tmp_path)
    assert line.startswith(f"error: {out} holds another conversion (") and line.endswith(
        "pass --force to replace it (runs trained on the current files will refuse to resume on the new ones)")


def meta_text(text: str):
    return lambda out: (out / "meta.json").write_text(text)


def foreign(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("mine")


HOST = socket.gethostname()


def hold_live_lock(out: Path) -> DirLock:
    """A conversion that is running right now: the directory's lock held (by this process)."""
    return DirLock(out, staging.LOCK, "dataset directory").acquire()


STATE_CASES = [  # (case, what --out holds: a change of a complete conversion, or a builder; --force; fragment)
    ("meta.json not JSON", meta_text("{"), False, "meta.json is unreadable (JSONDecodeError"),
    ("meta.json not UTF-8", lambda out: (out / "meta.json").write_bytes(b"\xff"), False,
     "meta.json is unreadable (UnicodeDecodeError"),
    ("meta.json a list", meta_text("[1]"), False, "meta.json holds a JSON list, not a conversion record"),
    ("meta.json a directory", lambda out: ((out / "meta.json").unlink(), (out / "meta.json").mkdir()), False,
     "meta.json is unreadable (IsADirectoryError"),
    ("files but no meta.json", lambda out: (out / "meta.json").unlink(), False,
     "holds files but no meta.json (test.beton, train.beton): an interrupted conversion"),
    ("another program's directory", ("new", foreign), False, "holds files but no meta.json (notes.txt)"),
    ("a live conversion", hold_live_lock, False, f"is being written by another conversion (host {HOST}, pid "),
    ("a live conversion, with --force", hold_live_lock, True, f"is being written by another conversion (host {HOST}, "),
    ("--out is a file", ("new", lambda out: out.write_text("x")), False, "is a file, not a directory"),
    ("--out under a file", ("new", lambda out: (out.parent / "f").write_text("x")), False,
     "cannot be created: "),
]


@pytest.mark.parametrize("case,state,force,fragment", STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_an_unclear_output_directory_is_not_touched(cifar_done, tmp_path, capsys, case, state, force, fragment):
    root, done = cifar_done
    held = None
    if isinstance(state, tuple):  # a builder of --out from nothing
        out = tmp_path / "out"
        state[1](out)
        out = out if case != "--out under a file" else tmp_path / "f" / "out"
    else:
        out = copy_of(done, tmp_path)
        result = state(out)
        held = result if state is hold_live_lock else None  # the lock, kept during the run
    try:
        refused(capsys, ["cifar10", "--src", root, "--out", out, *OPTS, *(["--force"] if force else [])],
                fragment, tmp_path)
    finally:
        if held is not None:
            held.release()


def test_unwritable_out(cifar_done, capsys):
    root, _ = cifar_done
    out = Path("/sys") / f"cskd-test-{os.getpid()}"  # refused even to root (sysfs)
    if os.access("/sys", os.W_OK) and os.geteuid() != 0:
        pytest.skip("/sys is writable here")
    refused(capsys, ["cifar10", "--src", root, "--out", out, *OPTS], f"--out {out} is not writable")
    assert not out.exists()


def test_the_headline_case_seed_change_is_refused_by_the_real_command(mnist_dir, tmp_path):
    """A resumed run must not continue on another split: --seed 1 over a seed-0 conversion."""
    out = copy_of(mnist_dir, tmp_path)
    before = snapshot(tmp_path)
    res = run_cli(["-m", "datasets_prep", "mnist5k", "--out", str(out), "--seed", "1"], timeout=300)
    assert_refused(res, f"{out} holds another conversion (conversion.reader.seed: 0 -> 1); pass --force")
    assert snapshot(tmp_path) == before


def test_same_request_is_up_to_date_and_removes_stale_folders(cifar_done, tmp_path, capsys):
    root, done = cifar_done
    out = copy_of(done, tmp_path)
    for name in (".prep-crashed", ".prep-old"):  # left by killed conversions (no live process holds the lock)
        (out / name).mkdir()
    (out / ".prep-crashed" / "train.beton").write_bytes(b"partial")
    (out / staging.LOCK).write_text("{}")  # a killed holder's lock file: not held
    kept = file_tree(*(out / n for n in ("meta.json", "train.beton", "test.beton")))
    assert prep(["cifar10", "--src", str(root), "--out", str(out), *OPTS]) == 0
    assert "up to date" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.beton", "train.beton"]
    assert file_tree(*(out / n for n in ("meta.json", "train.beton", "test.beton"))) == kept

    (out / ".prep-live").mkdir()  # while a conversion runs, its folder is not stale
    with hold_live_lock(out):
        assert staging.remove_stale(out) == [] and (out / ".prep-live").is_dir()


def test_force_replaces_and_same_request_repairs(cifar_done, tmp_path, capsys):
    root, done = cifar_done
    out = copy_of(done, tmp_path)
    assert prep(["cifar10", "--src", str(root), "--out", str(out), *OPTS, "--max-side", "16", "--force"]) == 0
    assert json.loads((out / "meta.json").read_text())["conversion"]["max_side"] == 16
    out = copy_of(done, tmp_path / "b")
    (out / "train.beton").write_bytes(b"damaged")  # the same conversion with a damaged file: rewritten
    assert prep(["cifar10", "--src", str(root), "--out", str(out), *OPTS]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "train.beton").read_bytes() == (done / "train.beton").read_bytes()  # 1 worker: deterministic


# --- killed conversions and dying workers ---------------------------------------------------------

def children(pid: int) -> dict[int, str]:
    """{pid: command line} of the live (not zombie) child processes of `pid`, from /proc."""
    found = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            state, ppid = open(stat).read().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == pid and state != "Z":
                found[int(stat.split("/")[2])] = open(stat[:-4] + "cmdline").read().replace("\0", " ")
        except (OSError, ValueError):
            continue
    return found


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_for(condition, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_sigkill_leaves_no_worker_and_the_rerun_cleans_up(tmp_path):
    out = tmp_path / "out"
    errors_before = set(glob.glob(os.path.join(tempfile.gettempdir(), ".prep-errors-*")))
    # --size 128: JPEG-encoded 128 px images make the pass last a few seconds
    proc = subprocess.Popen([sys.executable, "-m", "datasets_prep", "mnist5k", "--out", str(out), "--workers", "2",
                             "--size", "128"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kids = {}

    def busy():
        beton = glob.glob(str(out / ".prep-*" / "train.beton"))
        found = children(proc.pid)
        workers = [k for k, cmd in found.items() if "resource_tracker" not in cmd]
        return found if len(workers) >= 2 and beton else None

    try:
        kids = wait_for(busy, 120, "two worker processes writing")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()
        wait_for(lambda: not any(alive(k) for k in kids), 10, f"the workers {kids} to die with their parent")
        print(f"{len(kids)} children gone {time.monotonic() - killed:.2f} s after SIGKILL")
    finally:
        proc.kill()
        proc.wait()
        for k in kids:  # only what this test started, and only if the assertion above failed
            if alive(k):
                os.kill(k, signal.SIGKILL)
    stale = glob.glob(str(out / ".prep-*"))
    assert len(stale) == 2 and (out / staging.LOCK).is_file()  # the folder (the one place to clean) and the lock
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), ".prep-errors-*"))) == errors_before
    ref = tmp_path / "ref"
    ref.mkdir()  # an existing empty directory is fine
    assert prep(["mnist5k", "--out", str(ref), "--workers", "1"]) == 0
    # other options than the killed run's: that one never completed, so there is nothing to refuse
    assert prep(["mnist5k", "--out", str(out), "--workers", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "test.beton", "train.beton"]
    for name in ("train.beton", "test.beton"):
        assert sha(out / name) == sha(ref / name)


WORKER_DIES = """
import os, sys
import datasets_prep.writer as writer
parent, real = os.getpid(), writer.encode_chunk
def encode_chunk(enc, sources):
    if os.getpid() != parent:  # in a pool worker: die as an uncaught bug or the OOM killer would
        os._exit(3)
    return real(enc, sources)
writer.encode_chunk = encode_chunk
from datasets_prep.__main__ import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_dying_writer_worker_is_one_line_not_a_hang(tmp_path):
    """A pool worker that dies (a bug, the OOM killer) must fail the conversion in seconds, naming how."""
    out = tmp_path / "out"
    start = time.monotonic()
    # --size 40: resized images go through the pool (arrays stored as they are never do)
    res = run_cli(["-c", WORKER_DIES, "mnist5k", "--out", str(out), "--workers", "2", "--size", "40"], timeout=180)
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert lines == ["error: a worker process died while writing train.beton (exit code 3); nothing was written: "
                     "check free memory and disk space, or rerun with fewer --workers"]
    assert not out.exists() and time.monotonic() - start < 120


# --- open_dataset: meta.json that lies ----------------------------------------------------------------

META_CASES = [  # (case, change of meta.json, fragment)
    ("num_classes disagrees with classes", {"num_classes": 9}, "'num_classes' is 9 but 'classes' lists 10 classes"),
    ("num_classes zero", {"num_classes": 0}, "'num_classes' is 0, not a positive integer"),
    ("num_classes a string", {"num_classes": "10"}, "'num_classes' is \"10\", not a positive integer"),
    ("num_classes a float", {"num_classes": 10.0}, "'num_classes' is 10.0, not a positive integer"),
    ("num_classes a bool", {"num_classes": True}, "'num_classes' is true, not a positive integer"),
    ("num_classes missing", {"num_classes": None}, "lacks 'num_classes'"),
    ("classes not a list", {"classes": "0123456789"}, "'num_classes' is 10 but 'classes' lists a str"),
    ("files a list", {"files": []}, "'files' is [], not a mapping of file name to its bytes and sha256"),
    ("files entry a number", {"files": {"train.beton": 5}}, "'files' is {\"train.beton\": 5}, not a mapping"),
    ("the whole file a list", [1, 2], "holds a JSON list, not the record of a conversion"),
]


@pytest.mark.parametrize("case,change,fragment", META_CASES, ids=[c[0] for c in META_CASES])
def test_open_dataset_rejects_inconsistent_meta(mnist_dir, tmp_path, case, change, fragment):
    from cskd.dataset import open_dataset

    meta = json.loads((mnist_dir / "meta.json").read_text())
    if isinstance(change, dict):
        meta = {k: v for k, v in {**meta, **change}.items() if v is not None}
    else:
        meta = change
    out = tmp_path / "mnist5k"
    out.mkdir()
    for name in ("train.beton", "test.beton"):
        os.symlink(mnist_dir / name, out / name)
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError) as err:
        open_dataset(out)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"{out / 'meta.json'}: ") and fragment in message
    assert message.endswith(f"python -m datasets_prep mnist5k --out {out} --force")


def test_a_failed_conversion_removes_every_directory_it_created(tmp_path, capsys):
    """Undecodable images are found after the output directory was made: it goes, parents included."""
    root = cub_replica(tmp_path / "src")
    (root / "images" / "001.Black_footed_Albatross" / "Black_footed_Albatross_0001_796001.jpg").write_bytes(b"x")
    out = tmp_path / "a" / "b" / "out"
    before = snapshot(tmp_path)
    assert prep(["cub200", "--src", str(root), "--out", str(out), *OPTS]) == 2
    *progress, last = capsys.readouterr().err.splitlines()  # non-TTY progress lines, then the one error line
    assert last.startswith("error: an image cannot be decoded") and all(p.startswith("train") for p in progress)
    assert snapshot(tmp_path) == before and not (tmp_path / "a").exists()
