"""A dataset prepared by `datasets_prep` (train/test .beton + meta.json): opened and checked once.

`open_dataset` reads meta.json and the labels and image sizes of both splits from the .beton
headers (no image is decoded), and turns every way a directory can be wrong into one line that
names the fix. Both loaders and `cskd.eval` start from the `DatasetInfo` it returns.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cskd import orders
from cskd.batch import Shard
from cskd.beton import read_beton
from cskd.errors import DataError

SPLITS = ("train", "test")
FIELDS = ("image", "label", "index")
KNOWN_DATASETS = ("mnist5k",)


def _prep_hint(path: Path) -> str:
    name = path.name if path.name in KNOWN_DATASETS else "NAME"
    return f"prepare it with: python -m datasets_prep {name} --out {path}"


@dataclass
class DatasetInfo:
    """A prepared dataset: its meta.json and the labels of each split, read from the .beton files."""

    path: Path
    meta: dict
    labels: dict[str, np.ndarray]
    image_shape: dict[str, tuple[int, int] | None]  # (height, width) of every stored image; None: sizes vary

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def name(self) -> str:
        """The dataset's name as meta.json records it (the directory name for older conversions)."""
        return str(self.meta.get("name") or self.path.name)

    def beton(self, split: str) -> str:
        return str(self.path / f"{split}.beton")

    def sha256(self) -> dict[str, str]:
        """The .beton files' sha256s as meta.json records them: which conversion this is."""
        return {name: entry.get("sha256") for name, entry in sorted(self.meta.get("files", {}).items())}


def import_ffcv() -> None:
    """Import FFCV without letting it change torch's intra-op thread count.

    FFCV's Compiler.set_num_threads also calls torch.set_num_threads: once with 1 at import, then
    with num_workers from its loader thread at every epoch. Keep only its numba part."""
    import numba

    threads = torch.get_num_threads()
    from ffcv.pipeline.compiler import Compiler

    def set_num_threads(cls, n):
        cls.num_threads = n if n >= 1 else os.cpu_count()
        numba.set_num_threads(min(cls.num_threads, numba.config.NUMBA_NUM_THREADS))

    Compiler.set_num_threads = classmethod(set_num_threads)
    torch.set_num_threads(threads)


def _read_beton(path: Path, expected_bytes: int | None, hint: str
                ) -> tuple[np.ndarray, tuple[int, int] | None]:
    """Labels and fixed image shape (None if sizes vary) of a .beton after checking it is complete."""
    size = path.stat().st_size
    if expected_bytes is not None and size != expected_bytes:
        raise DataError(f"{path} has {size} bytes but meta.json records {expected_bytes}: it is truncated or "
                        f"was modified; {hint} --force")
    try:
        beton = read_beton(path)
    except ValueError as e:
        raise DataError(f"{path} is not a readable FFCV file ({e}); {hint} --force") from None
    table = beton.alloc_table
    end = int((table["ptr"] + table["size"]).max(initial=0))
    if end > size or len(table) < beton.num_samples:
        raise DataError(f"{path} is truncated (its samples need {end} bytes, the file has {size}); {hint} --force")
    missing = [f for f in FIELDS if f not in beton.field_names]
    if missing:
        raise DataError(f"{path} lacks the field(s) {', '.join(missing)} (has {', '.join(beton.field_names)}); "
                        f"{hint} --force")
    images = beton.field("image")
    fixed = len(images) and all(images[k].min() == images[k].max() for k in ("height", "width"))
    shape = (int(images["height"][0]), int(images["width"][0])) if fixed else None
    return np.asarray(beton.field("label"), dtype=np.int64), shape


def _check_meta(meta, meta_path: Path, hint: str) -> tuple[dict, int]:
    """meta.json's `files` (a mapping of file name -> {bytes, sha256}) and `num_classes` (a positive
    int that agrees with `classes` when that is there), or a DataError naming the entry and the fix."""
    def bad(what: str) -> DataError:
        return DataError(f"{meta_path}: {what} (damaged or edited?); {hint} --force")

    if not isinstance(meta, dict):
        raise bad(f"holds a JSON {type(meta).__name__}, not the record of a conversion")
    if "files" not in meta or "num_classes" not in meta:
        raise bad(f"lacks '{'files' if 'files' not in meta else 'num_classes'}'")
    files, num_classes = meta["files"], meta["num_classes"]
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        raise bad(f"'files' is {json.dumps(files)[:40]}, not a mapping of file name to its bytes and sha256")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise bad(f"'num_classes' is {json.dumps(num_classes)[:40]}, not a positive integer")
    classes = meta.get("classes")
    if classes is not None and (not isinstance(classes, list) or len(classes) != num_classes):
        listed = f"{len(classes)} classes" if isinstance(classes, list) else f"a {type(classes).__name__}"
        raise bad(f"'num_classes' is {num_classes} but 'classes' lists {listed}")
    return files, num_classes


def open_dataset(path: str | os.PathLike) -> DatasetInfo:
    """Check a prepared dataset directory and read its metadata; every failure names the fix."""
    root = Path(path)
    hint = _prep_hint(root)
    if not root.is_dir():
        raise DataError(f"data.path {root} does not exist; {hint}")
    meta_path = root / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"data.path {root} has no meta.json (not a prepared dataset); {hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{meta_path} is unreadable ({type(e).__name__}: {e}); {hint} --force") from None
    files, num_classes = _check_meta(meta, meta_path, hint)
    labels, shapes = {}, {}
    for split in SPLITS:
        beton = root / f"{split}.beton"
        if not beton.is_file():
            raise DataError(f"data.path {root} has no {split}.beton; {hint} --force")
        labels[split], shapes[split] = _read_beton(beton, files.get(f"{split}.beton", {}).get("bytes"), hint)
        if len(labels[split]) and not 0 <= labels[split].min() <= labels[split].max() < num_classes:
            raise DataError(f"{beton} has labels outside 0..{num_classes - 1} (meta.json num_classes); {hint} --force")
    return DatasetInfo(root, meta, labels, shapes)


def eval_ids(info: DatasetInfo, split: str, shard: Shard) -> np.ndarray:
    """This rank's contiguous block of `split` (cskd.orders.shard), after checking every rank gets one."""
    if len(info.labels[split]) < shard.world_size:
        raise DataError(f"{info.beton(split)} has {len(info.labels[split])} samples, fewer than the "
                        f"{shard.world_size} ranks; use fewer processes")
    return orders.shard(len(info.labels[split]), shard.world_size, shard.rank)
