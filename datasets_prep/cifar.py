"""CIFAR-10 and CIFAR-100, python version (50,000 train / 10,000 test 32x32 images).

--src is `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) or
`cifar-100-python/` (train, test, meta), or the directory holding it. The files are Python-2
pickles: `data` is uint8 N x 3072 (1024 R, then G, then B, each row-major), labels are `labels`
(CIFAR-10) or `fine_labels` (CIFAR-100).

Label order: the dataset's own (label_names / fine_label_names), which is the documented order and
torchvision's. CIFAR-100's 20 super-classes go to meta.json: `coarse_classes` (coarse_label_names)
and `coarse_of_class` (fine label -> coarse label, checked consistent over every image).

The pickles may come from anywhere, so they are read with a restricted unpickler: only dicts,
lists, strings, bytes, numbers and numpy arrays are built; any other object a pickle names (a
function to call, a class) is refused before it is looked up, so a crafted file cannot run code.
"""
from __future__ import annotations

import codecs
import pickle
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from datasets_prep.source import Source, require, sha256

LAYOUT = {  # name -> (folder, {split: files}, meta file, class-name key, label key)
    "cifar10": ("cifar-10-batches-py", {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", {"train": ["train"], "test": ["test"]}, "meta", "fine_label_names",
                 "fine_labels"),
}
EXPECTED = {"train": 50000, "test": 10000}
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]  # numpy's array reconstructor, whatever its module path
# The only globals a CIFAR pickle names: numpy's array machinery (under numpy 1's and numpy 2's
# module paths) and, in pickles written by Python 3 at protocol 2, `_codecs.encode` for bytes.
ALLOWED_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
                   ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
                   ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                   ("_codecs", "encode"): codecs.encode}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which CIFAR pickles never do; not loaded")
        return ALLOWED_GLOBALS[(module, name)]


def _load(path: Path, what: str) -> dict:
    try:
        with open(require(path, what), "rb") as f:
            return _CifarUnpickler(f, encoding="latin1").load()  # Python-2 pickles; latin1: str keys, as torchvision
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DataError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {e}); re-extract the archive") from None


def _field(d: dict, key: str, path: Path):
    if key not in d:
        raise DataError(f"{path} has no '{key}' entry (keys: {', '.join(map(str, d))}); wrong CIFAR version?")
    return d[key]


def read(src: Path, args) -> Source:
    """Read CIFAR-10 or CIFAR-100 (args.name) from `src` (see the module docstring)."""
    name = args.name
    folder, lists, meta_name, names_key, label_key = LAYOUT[name]
    src = Path(src)
    root = src if src.name == folder or not (src / folder).is_dir() else src / folder
    meta_path = root / meta_name
    meta = _load(meta_path, f"{name} label names")
    classes = [str(c) for c in _field(meta, names_key, meta_path)]
    files = {f"{folder}/{meta_name}": sha256(meta_path)}
    splits, coarse_of_class = {}, {}
    for split, names in lists.items():
        samples = []
        for file in names:
            path = root / file
            d = _load(path, f"{name} {split} batch")
            data, labels = np.asarray(_field(d, "data", path)), _field(d, label_key, path)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
                raise DataError(f"{path}: data is {data.dtype} {data.shape} for {len(labels)} labels, "
                                f"expected uint8 N x 3072")
            images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC
            samples += [(np.ascontiguousarray(img), int(y)) for img, y in zip(images, labels)]
            if name == "cifar100":
                for fine, coarse in zip(labels, _field(d, "coarse_labels", path)):
                    if coarse_of_class.setdefault(int(fine), int(coarse)) != int(coarse):
                        raise DataError(f"{path}: fine label {fine} has two coarse labels")
            files[f"{folder}/{file}"] = sha256(path)
        splits[split] = samples
    extra = {}
    if name == "cifar100":
        extra = {"coarse_classes": [str(c) for c in _field(meta, "coarse_label_names", meta_path)],
                 "coarse_of_class": [coarse_of_class.get(i) for i in range(len(classes))]}
    return Source(name, classes, splits, files, dict(EXPECTED), extra)
