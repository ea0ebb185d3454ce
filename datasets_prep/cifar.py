"""CIFAR-10 and CIFAR-100, python version (50,000 train / 10,000 test 32x32 images).

--src is `cifar-10-batches-py/` (data_batch_1..5, test_batch, batches.meta) or
`cifar-100-python/` (train, test, meta), or the directory holding it, or the archive as
downloaded, `cifar-10-python.tar.gz` / `cifar-100-python.tar.gz` (read in place, see
datasets_prep.archive), or a directory holding that. The files are Python-2
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
import io
import pickle
import warnings
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from datasets_prep.archive import ArchivePath, as_path
from datasets_prep.source import Source, digest, int_labels, require

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


def _load(path: Path | ArchivePath, what: str) -> dict:
    """The dict a CIFAR pickle holds; anything else (a truncated or corrupt file, another object) is a
    DataError naming the file."""
    try:
        # read whole (an archive member has no file to open); a batch is 30 MB
        with io.BytesIO(require(path, what, "file").read_bytes()) as f, warnings.catch_warnings():
            # numpy 2 warns (on stderr) about the int `align` argument numpy-1 pickles pass to dtype()
            warnings.simplefilter("ignore")
            d = _CifarUnpickler(f, encoding="latin1").load()  # Python-2 pickles; latin1: str keys, as torchvision
    except Exception as e:
        # a damaged pickle fails anywhere in pickle or numpy's reconstructors (measured on truncated and
        # bit-flipped files: UnpicklingError, EOFError, MemoryError, LookupError, IndexError, ...); the
        # restricted unpickler guarantees none of it is code of the file's choosing
        raise DataError(f"{path}: not a CIFAR pickle ({type(e).__name__}: {e}); re-extract the archive") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: holds a {type(d).__name__}, not a CIFAR dict; re-extract the archive")
    return d


def _field(d: dict, key: str, path: Path):
    if key not in d:
        raise DataError(f"{path} has no '{key}' entry (keys: {', '.join(map(str, d))}); wrong CIFAR version?")
    return d[key]


def _names(d: dict, key: str, path: Path) -> list[str]:
    """A list of class names (str, or bytes from an unusual pickle)."""
    names = _field(d, key, path)
    if not isinstance(names, list) or not names or not all(isinstance(c, (str, bytes)) for c in names):
        raise DataError(f"{path}: '{key}' is not a non-empty list of names (got {type(names).__name__}); "
                        f"re-extract the archive")
    return [c.decode("latin1") if isinstance(c, bytes) else c for c in names]


def _images(d: dict, path: Path) -> np.ndarray:
    """The batch's images, N x 32 x 32 x 3, from `data` (uint8 N x 3072: R, G, B planes, row-major)."""
    data = _field(d, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' is a {desc}, expected a uint8 N x 3072 array; re-extract the archive")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW planes -> HWC


def _batch(path: Path, what: str, label_key: str, classes: list[str], coarse: list[str] | None):
    """(images, labels, coarse labels or None) of one batch file, every entry checked."""
    d = _load(path, what)
    images = _images(d, path)
    labels = int_labels(_field(d, label_key, path), len(classes), f"{path} '{label_key}'")
    if len(labels) != len(images):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} '{label_key}'; re-extract the archive")
    if coarse is None:
        return images, labels, None
    coarse_labels = int_labels(_field(d, "coarse_labels", path), len(coarse), f"{path} 'coarse_labels'")
    if len(coarse_labels) != len(labels):
        raise DataError(f"{path}: {len(labels)} fine but {len(coarse_labels)} coarse labels; re-extract the archive")
    return images, labels, coarse_labels


def read(src: Path, args) -> Source:
    """Read CIFAR-10 or CIFAR-100 (args.name) from `src` (see the module docstring)."""
    name = args.name
    folder, lists, meta_name, names_key, label_key = LAYOUT[name]
    src = as_path(src)
    root = src if src.name == folder or not (src / folder).is_dir() else src / folder
    meta_path = root / meta_name
    meta = _load(meta_path, f"{name} label names")
    classes = _names(meta, names_key, meta_path)
    coarse = _names(meta, "coarse_label_names", meta_path) if name == "cifar100" else None
    files = {f"{folder}/{meta_name}": digest(meta_path)}
    splits, coarse_of_class = {}, {}
    for split, names in lists.items():
        samples = []
        for file in names:
            path = root / file
            images, labels, coarse_labels = _batch(path, f"{name} {split} batch", label_key, classes, coarse)
            samples += [(np.ascontiguousarray(img), y) for img, y in zip(images, labels)]
            for fine, c in zip(labels, coarse_labels or ()):
                if coarse_of_class.setdefault(fine, c) != c:
                    raise DataError(f"{path}: fine label {fine} has two coarse labels ({coarse_of_class[fine]}, {c})")
            files[f"{folder}/{file}"] = digest(path)
        splits[split] = samples
    extra = {}
    if name == "cifar100":
        extra = {"coarse_classes": coarse, "coarse_of_class": [coarse_of_class.get(i) for i in range(len(classes))]}
    return Source(name, classes, splits, files, dict(EXPECTED), extra)
