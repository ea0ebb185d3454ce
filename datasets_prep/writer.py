"""Write a prepared dataset: FFCV .beton per split (fields image, label, index) and meta.json.

Atomic as a whole: the files are written into a temporary directory beside the output, the old
meta.json is removed first (so an interrupted replacement reads as "not prepared", never as a
mix), then the .beton files are moved in and meta.json is written last.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from cskd.fileio import write_json
from datasets_prep.images import Resize, load_rgb, validate
from datasets_prep.source import Source, check_classes, check_counts, sha256


def up_to_date(out: Path, meta: dict, keys=None) -> bool:
    """True if `out` already holds exactly this conversion (same source, parameters, complete files):
    its meta.json equals `meta` on `keys` (default: on everything but the files entry)."""
    try:
        old = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    keys = keys or (set(meta) | set(old)) - {"files"}
    if any(old.get(k) != meta.get(k) for k in keys):
        return False
    return all((out / name).is_file() and (out / name).stat().st_size == info["bytes"]
               for name, info in old.get("files", {}).items())


MIN_PAGE = 1 << 21  # FFCV's minimum page size (2 MiB)


def _quiet_tqdm() -> None:
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's writer bar floods batch logs; read at tqdm import


def _fields(write_mode: str, jpeg_quality: int = 90, smart_threshold: int | None = None) -> dict:
    _quiet_tqdm()
    from ffcv.fields import IntField, RGBImageField

    return {"image": RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality, smart_threshold=smart_threshold),
            "label": IntField(), "index": IntField()}


def commit(out: Path, jobs: dict, meta: dict, check=None) -> dict:
    """Write each split's .beton ({split: (dataset, fields, workers, page_size)}) into a temporary
    directory inside `out`, call `check(tmp)` (which raises to abort), then move the files in and
    write meta.json (with the files' sizes and sha256) last. Returns the files entry."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    _quiet_tqdm()
    from ffcv.writer import DatasetWriter
    tmp = Path(tempfile.mkdtemp(prefix=".prep-", dir=out))
    try:
        files = {}
        for split, (dataset, fields, workers, page_size) in jobs.items():
            path = tmp / f"{split}.beton"
            if sys.stderr.isatty():
                print(f"writing {path.name} ({len(dataset)} images)", file=sys.stderr, flush=True)
            DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers).from_indexed_dataset(dataset)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        if check:
            check(tmp)
        (out / "meta.json").unlink(missing_ok=True)
        for name in files:
            os.replace(tmp / name, out / name)
        write_json(out / "meta.json", {**meta, "files": files})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:  # leave no trace of a conversion that never completed
            shutil.rmtree(out, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return files


class _SourceSplit:
    """A split of a `Source` as FFCV's writer wants it. Never raises: FFCV's writer hangs forever when
    a worker does, so a failure (a file changed since validation) is logged to `err_dir` and a
    placeholder is written; `commit` then fails the whole conversion."""

    def __init__(self, samples: list, resize: Resize, err_dir: Path):
        self.samples, self.resize, self.err_dir = samples, resize, err_dir

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        src, label = self.samples[i]
        try:
            return load_rgb(src, resize=self.resize), int(label), int(i)
        except BaseException as e:
            with open(self.err_dir / f"errors-{os.getpid()}.txt", "a") as f:
                f.write(f"{src}: {e}\n".replace("\n", " ").strip() + "\n")
            return np.zeros((8, 8, 3), np.uint8), int(label), int(i)


def _page_size(max_bytes: int, total_bytes: int) -> int:
    """Smallest power of 2 that holds two of the largest stored images; FFCV's 8 MiB default for big
    splits, its 2 MiB minimum for small ones (every worker pads its last page, which dominates a
    tiny file)."""
    floor = 4 * MIN_PAGE if total_bytes > 256 << 20 else MIN_PAGE
    return max(floor, 1 << int(2 * max_bytes + (1 << 16)).bit_length())


def write_source(out: str | os.PathLike, source: Source, *, resize: Resize = Resize(), write_mode: str = "auto",
                 jpeg_quality: int = 90, workers: int = 1, skip_bad: bool = False,
                 allow_count_mismatch: bool = False, force: bool = False) -> dict | None:
    """Validate and write `source` to `out` (train/test .beton + meta.json); None if already up to date.

    write_mode 'auto' stores raw pixels when no stored image has a side over 64 (CIFAR,
    TinyImageNet: bit-exact, nothing to decode), else 'smart': JPEG (quality `jpeg_quality`) for
    images larger than 64x64, as ffcv-imagenet stores ImageNet.
    Returns a summary: counts, skipped samples, bytes written, seconds."""
    out, start = Path(out), time.perf_counter()
    check_classes(source)
    problems = check_counts(source, strict=not allow_count_mismatch)
    conversion = {"max_side": resize.max_side, "resize": resize.policy, "size": resize.size,
                  "write_mode": write_mode, "jpeg_quality": jpeg_quality, "skip_bad": skip_bad, "reader": source.params}
    request = {"name": source.name, "classes": source.classes, "conversion": conversion,
               "source": {"files": source.files, "listed": {s: len(v) for s, v in source.splits.items()}}}
    if not force and up_to_date(out, request, keys=set(request)):
        return None
    checks = {s: validate(samples, workers, resize, stats=s == "train", label=f"validate {s}", split=s)
              for s, samples in source.splits.items()}
    bad = [(s, name, reason) for s, v in checks.items() for name, reason in v.bad]
    if bad and not skip_bad:
        listed = "; ".join(reason for _, _, reason in bad[:3])
        raise DataError(f"{len(bad)} image(s) cannot be decoded: {listed}{' ...' if len(bad) > 3 else ''} "
                        f"(nothing written; replace or remove them, or pass --skip-bad to leave them out)")
    splits = {s: [x for x, ok in zip(samples, checks[s].ok) if ok] for s, samples in source.splits.items()}
    check_classes(Source(source.name, source.classes, splits))  # skipping may have emptied a class
    max_side = max(v.max_side for v in checks.values())
    shapes = {v.shape for v in checks.values()}
    image_size = list(shapes.pop()) if len(shapes) == 1 and None not in shapes else None
    mode = write_mode if write_mode != "auto" else ("raw" if max_side <= 64 else "smart")
    mean, std = checks["train"].mean_std()
    n = len(source.classes)
    meta = {**request, **source.extra, "num_classes": n,
            "counts": {s: {"total": len(v), "per_class": np.bincount([y for _, y in v], minlength=n).tolist()}
                       for s, v in splits.items()},
            "image_size": image_size, "max_side": max_side,
            "mean": mean, "std": std,
            "stats": "mean/std per RGB channel in [0,1] over every pixel of every stored training image",
            "write_mode": mode, "count_check": {"expected": source.expected, "problems": problems},
            "skipped": [{"split": s, "image": name, "reason": reason} for s, name, reason in bad]}
    err_dir = Path(tempfile.mkdtemp(prefix=".prep-errors-"))
    fields = _fields(mode, jpeg_quality, smart_threshold=64 * 64 * 3)
    jobs = {s: (_SourceSplit(v, resize, err_dir), fields, workers,
                _page_size(checks[s].max_bytes, checks[s].max_bytes * len(v))) for s, v in splits.items()}

    def check(_tmp):
        errors = [line for p in sorted(err_dir.glob("*.txt")) for line in p.read_text().splitlines()]
        if errors:
            raise DataError(f"{len(errors)} image(s) failed while writing (changed since validation?): "
                            f"{'; '.join(errors[:3])}; nothing written")

    try:
        files = commit(out, jobs, meta, check)
    finally:
        shutil.rmtree(err_dir, ignore_errors=True)
    return {"counts": meta["counts"], "skipped": meta["skipped"], "bytes": sum(f["bytes"] for f in files.values()),
            "seconds": time.perf_counter() - start, "write_mode": mode}
