"""Write a prepared dataset: FFCV .beton per split (fields image, label, index) and meta.json.

Atomic as a whole: the files are written into a temporary directory beside the output, the old
meta.json is removed first (so an interrupted replacement reads as "not prepared", never as a
mix), then the .beton files are moved in and meta.json is written last.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from cskd.fileio import write_json


def sha256_file(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


class _ArraySplit:
    """Indexable (image, label, index) samples, as FFCV's writer wants them."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), int(i)


def _check_images(images: np.ndarray, split: str) -> None:
    # FFCV's writer hangs forever if a worker raises on a sample (e.g. a grayscale H x W array), so
    # every sample is validated before the writer starts.
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"{split} images must be uint8 N x H x W x 3, got {images.dtype} {images.shape}")


def up_to_date(out: Path, meta: dict) -> bool:
    """True if `out` already holds exactly this conversion (same source, parameters, complete files)."""
    try:
        old = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if {k: v for k, v in old.items() if k != "files"} != meta:
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == info["bytes"]
               for name, info in old.get("files", {}).items())


def write_dataset(out: str | os.PathLike, splits: dict[str, tuple[np.ndarray, np.ndarray]], meta: dict,
                  force: bool = False) -> bool:
    """Write `splits` ({'train': (images, labels), 'test': ...}) and `meta` to `out`.

    Returns False (and writes nothing) when `out` already holds the identical conversion and
    `force` is not set.
    """
    out = Path(out)
    if not force and up_to_date(out, meta):
        return False
    for split, (images, _) in splits.items():
        _check_images(images, split)
    out.mkdir(parents=True, exist_ok=True)
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's writer bar floods batch logs; read at tqdm import
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter
    tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=out))
    try:
        files = {}
        for split, (images, labels) in splits.items():
            path = tmp / f"{split}.beton"
            fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
            DatasetWriter(str(path), fields, num_workers=1).from_indexed_dataset(_ArraySplit(images, labels))
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
        (out / "meta.json").unlink(missing_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
        write_json(out / "meta.json", {**meta, "files": files})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True
