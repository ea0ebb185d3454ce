"""Write a prepared dataset: FFCV .beton per split (fields image, label, index) and meta.json.

Before any work, datasets_prep.outdir decides whether the output directory may be written (an
existing different conversion is never replaced without --force). Atomic as a whole: the files
are written into the conversion's locked temporary folder inside the output directory
(datasets_prep.staging, which also makes every worker process die with the converting process),
the old meta.json is removed first (so an interrupted replacement reads as "not prepared", never
as a mix), then the .beton files are moved in and meta.json is written last.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from cskd.fileio import sha256, write_json
from datasets_prep import outdir, staging
from datasets_prep.images import Resize, load_rgb, validate
from datasets_prep.source import Source, check_classes, check_counts

MIN_PAGE = 1 << 21  # FFCV's minimum page size (2 MiB)


def _quiet_tqdm() -> None:
    if not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")  # FFCV's writer bar floods batch logs; read at tqdm import


def _fields(write_mode: str, jpeg_quality: int = 90, smart_threshold: int | None = None) -> dict:
    _quiet_tqdm()
    from ffcv.fields import IntField, RGBImageField

    return {"image": RGBImageField(write_mode=write_mode, jpeg_quality=jpeg_quality, smart_threshold=smart_threshold),
            "label": IntField(), "index": IntField()}


def _abandon_queues(tb) -> None:
    """Let Python exit although FFCV's work queue still holds chunks no worker will read: at exit,
    multiprocessing joins every queue's feeder thread, which waits forever on a full pipe (measured
    after a writer worker was killed). The queues are locals of the failed call, found in its frames."""
    from multiprocessing.queues import Queue

    while tb is not None:
        for value in list(tb.tb_frame.f_locals.values()):
            if isinstance(value, Queue):
                value.cancel_join_thread()
        tb = tb.tb_next


def _write(path: Path, dataset, fields: dict, workers: int, page_size: int) -> None:
    """One .beton through FFCV's DatasetWriter; a worker that dies is a DataError, not a hang."""
    from ffcv.writer import DatasetWriter

    writer = DatasetWriter(str(path), fields, page_size=page_size, num_workers=workers)
    try:
        with staging.fail_if_a_worker_dies(path.name):
            writer.from_indexed_dataset(dataset)
    except BaseException:
        _abandon_queues(sys.exc_info()[2])
        shm = getattr(writer, "metadata_sm", None)  # FFCV unlinks its shared memory only on success
        if shm is not None and not isinstance(shm, int):
            shm.close()
            shm.unlink()
        raise


def commit(out: Path, work: Path, jobs: dict, meta: dict, check=None) -> dict:
    """Write each split's .beton ({split: (dataset, fields, workers, page_size)}) into `work` (the
    conversion's temporary folder inside `out`), call `check(work)` (which raises to abort), then
    move the files in and write meta.json (with the files' sizes and sha256) last. Returns the
    files entry. Removing `work` (and `out` after a failure) is the caller's job (staging.Staging)."""
    _quiet_tqdm()
    files, replacing = {}, False
    try:
        for split, (dataset, fields, workers, page_size) in jobs.items():
            path = work / f"{split}.beton"
            if sys.stderr.isatty():
                print(f"writing {path.name} ({len(dataset)} images)", file=sys.stderr, flush=True)
            _write(path, dataset, fields, workers, page_size)
            files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
        if check:
            check(work)
        replacing = True
        (out / "meta.json").unlink(missing_ok=True)
        for name in files:
            os.replace(work / name, out / name)
        write_json(out / "meta.json", {**meta, "files": files})
    except OSError as e:  # a full disk, a directory made read-only meanwhile: one line, never a mix
        state = (f"{out} holds no complete dataset now (no meta.json): fix it and rerun with --force" if replacing
                 else "nothing was written: free space or choose another --out")
        raise DataError(f"writing {out} failed ({e.strerror or e}); {state}") from None
    return files


class _SourceSplit:
    """A split of a `Source` as FFCV's writer wants it. Never raises: FFCV's writer hangs forever when
    a worker does, so a failure (a file changed since validation) is logged to `err_dir` (inside the
    conversion's temporary folder) and a placeholder is written; `commit` then fails the conversion."""

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


def _validate(source: Source, request: dict, resize: Resize, workers: int, skip_bad: bool, write_mode: str,
              problems: list[str]) -> tuple[dict, dict]:
    """Decode every sample (in `workers` processes): meta.json's entries, and per split the samples
    to write with the size in bytes of its largest stored image. Undecodable images are an error
    unless `skip_bad`."""
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
    return meta, {s: (v, checks[s].max_bytes) for s, v in splits.items()}


def _raise_write_errors(err_dir: Path) -> None:
    """Fail the conversion if a writer worker logged a sample it could not load (see _SourceSplit)."""
    errors = [line for p in sorted(err_dir.glob("*.txt")) for line in p.read_text().splitlines()]
    if errors:
        raise DataError(f"{len(errors)} image(s) failed while writing (changed since validation?): "
                        f"{'; '.join(errors[:3])}; nothing written")


def write_source(out: str | os.PathLike, source: Source, *, resize: Resize = Resize(), write_mode: str = "auto",
                 jpeg_quality: int = 90, workers: int = 1, skip_bad: bool = False,
                 allow_count_mismatch: bool = False, force: bool = False) -> dict | None:
    """Validate and write `source` to `out` (train/test .beton + meta.json); None if already up to date.

    Refused (a one-line DataError, before any work) if `out` holds another conversion, an
    unreadable meta.json or foreign files, unless `force` (see datasets_prep.outdir).
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
    if outdir.inspect(out, request, force):
        staging.remove_stale(out)  # e.g. left by a --force rerun that was killed
        return None
    # the lock is held (and workers die with this process) from validation to the last file moved in
    with staging.Staging(out) as work, staging.children_die_with_me():
        meta, splits = _validate(source, request, resize, workers, skip_bad, write_mode, problems)
        fields = _fields(meta["write_mode"], jpeg_quality, smart_threshold=64 * 64 * 3)
        jobs = {s: (_SourceSplit(v, resize, work.errors), fields, workers, _page_size(m, m * len(v)))
                for s, (v, m) in splits.items()}
        files = commit(out, work.path, jobs, meta, lambda _: _raise_write_errors(work.errors))
    return {"counts": meta["counts"], "skipped": meta["skipped"], "bytes": sum(f["bytes"] for f in files.values()),
            "seconds": time.perf_counter() - start, "write_mode": meta["write_mode"]}
