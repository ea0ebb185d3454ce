"""Write a prepared dataset: FFCV .beton per split (fields image, label, index) and meta.json.

One pass over the images: worker processes decode each image (by content, to RGB), resize it,
encode it as FFCV stores it (JPEG or raw pixels) and return the bytes with the pixel sums for the
mean/std; this process writes the results in sample order (datasets_prep.beton_writer). Nothing
is decoded twice and no worker can hang the conversion: an image that cannot be decoded comes
back as a reason (the conversion stops, or with --skip-bad leaves it out and lists it), and a
worker that dies (the out-of-memory killer) breaks the pool, which is a one-line error.

Before any work, datasets_prep.outdir decides whether the output directory may be written (an
existing different conversion is never replaced without --force). Atomic as a whole: the files
are written into the conversion's locked temporary folder inside the output directory
(datasets_prep.staging, which also makes every worker process die with the converting process),
the old meta.json is removed first (so an interrupted replacement reads as "not prepared", never
as a mix), then the .beton files are moved in and meta.json is written last.
"""
from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from cskd.fileio import sha256, write_json
from datasets_prep import outdir, staging
from datasets_prep.beton_writer import MODE_JPG, MODE_RAW, BetonWriter, page_size_for
from datasets_prep.images import Resize, load_rgb, sample_name
from datasets_prep.progress import Progress
from datasets_prep.source import Source, check_classes, check_counts

SMART_THRESHOLD = 64 * 64 * 3  # 'auto'/'smart': images with more bytes than a 64x64 one are stored as JPEG
FULL_PAGE_TOTAL = 256 << 20  # splits estimated above this get FFCV's default 8 MiB pages (2 MiB below)
IN_FLIGHT_PER_WORKER = 4  # chunks queued per worker: enough to keep it busy, bounded memory


@dataclass(frozen=True)
class Encoding:
    """How every image of a conversion is stored (sent with each chunk to the workers)."""

    resize: Resize
    write_mode: str  # auto, raw, jpg, smart
    jpeg_quality: int
    stats: bool  # also return the pixel sums (the training split's mean/std)


def encode_jpeg(img: np.ndarray, quality: int) -> bytes:
    """`img` (RGB) as FFCV's RGBImageField encodes it: OpenCV's JPEG encoder on the BGR image, so a
    file written here holds the same bytes as one written by FFCV."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [int(cv2.IMWRITE_JPEG_QUALITY), quality])
    if not ok:
        raise ValueError("OpenCV could not encode it as JPEG")
    return buf.tobytes()


def pixel_sums(img: np.ndarray) -> np.ndarray:
    """Per-channel sums of the values and of their squares (2 x 3, uint64): exact integers, so the
    dataset's mean/std do not depend on the order the workers finish in. Channel-major first: summing
    contiguous rows is 10x faster than summing the interleaved channels (measured, 500x375)."""
    planes = np.ascontiguousarray(img.reshape(-1, 3).T)
    squares = planes.astype(np.uint16)  # 255**2 fits in 16 bits
    np.multiply(squares, squares, out=squares)
    return np.stack([planes.sum(1, dtype=np.uint64), squares.sum(1, dtype=np.uint64)])


def stores_raw(write_mode: str, nbytes: int) -> bool:
    """Whether an image of `nbytes` stored bytes is kept as raw pixels (else JPEG), as FFCV decides it."""
    return write_mode == "raw" or write_mode in ("auto", "smart") and nbytes <= SMART_THRESHOLD


def encode_one(src, enc: Encoding):
    """(None, mode, height, width, bytes, pixel sums or None) for one sample, or (reason, ...) if it
    cannot be decoded or encoded. Never raises: a reason is data, the caller decides."""
    try:
        img = load_rgb(src, resize=enc.resize)
        if stores_raw(enc.write_mode, img.nbytes):
            mode, blob = MODE_RAW, img.tobytes()
        else:
            mode, blob = MODE_JPG, encode_jpeg(img, enc.jpeg_quality)
    except Exception as e:  # DataError from load_rgb names the file; anything else is a bug shown as a reason
        reason = str(e) if isinstance(e, DataError) else f"{src}: {type(e).__name__}: {e}"
        return reason, 0, 0, 0, b"", None
    return None, mode, img.shape[0], img.shape[1], blob, pixel_sums(img) if enc.stats else None


def encode_chunk(enc: Encoding, sources: list) -> list:
    """`encode_one` of every sample of a chunk (what one worker task does)."""
    return [encode_one(src, enc) for src in sources]


def _worker_init(parent_pid: int) -> None:
    staging.die_with_parent(parent_pid)  # also for callers outside a conversion (staging's fork hook)
    try:
        import cv2

        cv2.setNumThreads(1)  # one process per core already; OpenCV's own threads would oversubscribe it
    except ImportError:
        pass


@dataclass
class SplitResult:
    """What writing one split found."""

    kept: list = field(default_factory=list)  # the samples written, in order
    bad: list = field(default_factory=list)  # (sample name, reason)
    max_side: int = 0
    shapes: set = field(default_factory=set)  # (h, w), at most two kept: one shape or not
    pixels: int = 0
    sums: np.ndarray = field(default_factory=lambda: np.zeros((2, 3), np.uint64))  # see pixel_sums
    bytes: int = 0

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of every stored pixel, in [0, 1]."""
        mean = self.sums[0] / (255 * self.pixels)
        std = np.sqrt(np.maximum(self.sums[1] / (255 ** 2 * self.pixels) - mean ** 2, 0))
        return mean.round(6).tolist(), std.round(6).tolist()


def _estimate_page_size(samples: list, resize: Resize) -> int:
    """The page size to start with: from the largest stored image the resize policy allows (arrays:
    their own size), else FFCV's default; BetonWriter grows it for an image that does not fit."""
    if resize.policy == "short-side-center-crop":
        bound = resize.size * resize.size * 3
    elif samples and isinstance(samples[0][0], np.ndarray):  # a reader gives arrays or files, not both
        bound = max(s.shape[0] * s.shape[1] * 3 for s, _ in samples)
        bound = min(bound, resize.max_side ** 2 * 3) if resize.max_side else bound
    else:
        bound = resize.max_side ** 2 * 3 if resize.max_side else None
    floor = page_size_for(0) * (4 if len(samples) * (bound or 1 << 20) > FULL_PAGE_TOTAL else 1)
    return max(floor, page_size_for(bound)) if bound else floor


def _chunks(samples: list, size: int):
    for start in range(0, len(samples), size):
        yield start, [src.member() if hasattr(src, "member") else src for src, _ in samples[start:start + size]]


def _stored_as_given(samples: list, enc: Encoding) -> bool:
    """Every sample is an RGB array stored as it is (CIFAR, MNIST): nothing to decode or encode."""
    return all(isinstance(src, np.ndarray) and src.ndim == 3 and src.shape[2] == 3 and enc.resize.keeps(*src.shape[:2])
               and stores_raw(enc.write_mode, src.nbytes)
               for src, _ in samples)


def _results(samples: list, enc: Encoding, workers: int, path: Path):
    """(sample, encode_one result) of every sample in order, encoded in `workers` processes."""
    size = max(1, min(64, len(samples) // (8 * workers) or 1))
    # a pool would only copy such arrays there and back: CIFAR-100 took 2.2 s with 2 workers, 1.1 s here
    if workers == 1 or _stored_as_given(samples, enc):
        for start, sources in _chunks(samples, size):
            yield from zip(samples[start:start + size], encode_chunk(enc, sources))
        return
    before = staging.children()
    pool = ProcessPoolExecutor(workers, mp_context=get_context("fork"), initializer=_worker_init,
                               initargs=(os.getpid(),))
    pending, chunks = [], _chunks(samples, size)
    procs = set()  # kept here: the pool joins (and forgets) a dead worker before reporting it
    finished = False
    try:
        for start, sources in chunks:
            pending.append((start, pool.submit(encode_chunk, enc, sources)))
            procs |= staging.children() - before
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                break
        while pending:
            start, future = pending.pop(0)
            results = future.result()
            nxt = next(chunks, None)
            if nxt is not None:
                pending.append((nxt[0], pool.submit(encode_chunk, enc, nxt[1])))
            yield from zip(samples[start:start + len(results)], results)
        finished = True
    except BrokenProcessPool:
        for p in procs:  # the pool's own thread may be reaping it right now: give it a moment
            p.join(1)
        dead = [p.exitcode for p in procs if p.exitcode not in (None, 0, -signal.SIGTERM)]
        cause = f" ({staging.cause(dead[0])})" if dead else ""
        raise DataError(f"a worker process died while writing {path.name}{cause}; nothing was written: check free "
                        f"memory and disk space, or rerun with fewer --workers") from None
    finally:
        for p in procs if not finished else ():  # a failed pass leaves no worker decoding for nobody
            if p.exitcode is None:
                p.terminate()
        pool.shutdown(wait=True, cancel_futures=True)


def write_split(path: Path, samples: list, enc: Encoding, workers: int, skip_bad: bool, split: str) -> SplitResult:
    """Encode and write one split's .beton at `path`; undecodable images stop the conversion (a
    one-line DataError) unless `skip_bad`, which leaves them out (the index field counts written ones)."""
    result = SplitResult()
    writer = BetonWriter(path, len(samples), _estimate_page_size(samples, enc.resize))
    progress = Progress(split, len(samples))
    results = _results(samples, enc, workers, path)
    try:
        for i, ((src, label), (reason, mode, h, w, blob, sums)) in enumerate(results):
            if reason is not None:
                name = sample_name(src, split, i)
                if not skip_bad:
                    raise DataError(f"an image cannot be decoded: {reason} (nothing written; replace or remove it, "
                                    f"or pass --skip-bad to leave undecodable images out, listed in meta.json)")
                result.bad.append((name, reason))
            else:
                writer.add(blob, mode, h, w, int(label), len(result.kept))
                result.kept.append((src, label))
                result.max_side = max(result.max_side, h, w)
                if len(result.shapes) < 2:
                    result.shapes.add((h, w))
                if sums is not None:
                    result.pixels += h * w
                    result.sums += sums
            progress.update(i + 1, len(result.bad))
        result.bytes = writer.close()
    except BaseException:
        writer.abort()
        raise
    finally:
        results.close()  # now, not when the traceback goes: its pool stops with the failure
        progress.close()
    return result


def _meta(source: Source, request: dict, results: dict[str, SplitResult], write_mode: str,
          problems: list[str]) -> dict:
    """meta.json's entries (all but `files`) from what writing the splits found."""
    max_side = max(r.max_side for r in results.values())
    shapes = set().union(*(r.shapes for r in results.values()))
    mode = write_mode if write_mode != "auto" else ("raw" if max_side <= 64 else "smart")
    mean, std = results["train"].mean_std()
    n = len(source.classes)
    skipped = [{"split": s, "image": name, "reason": reason} for s, r in results.items() for name, reason in r.bad]
    return {**request, **source.extra, "num_classes": n,
            "counts": {s: {"total": len(r.kept), "per_class": np.bincount([y for _, y in r.kept], minlength=n).tolist()}
                       for s, r in results.items()},
            "image_size": list(shapes.pop()) if len(shapes) == 1 else None, "max_side": max_side,
            "mean": mean, "std": std,
            "stats": "mean/std per RGB channel in [0,1] over every pixel of every stored training image",
            "write_mode": mode, "count_check": {"expected": source.expected, "problems": problems},
            "skipped": list(source.skipped) + skipped}


def commit(out: Path, work: Path, names: list[str], meta: dict) -> dict:
    """Move the finished files `names` from `work` (the conversion's temporary folder inside `out`)
    into `out` and write meta.json (with the files' sizes and sha256) last. Returns the files entry.
    Removing `work` (and `out` after a failure) is the caller's job (staging.Staging)."""
    files, replacing = {}, False
    try:
        for name in names:
            files[name] = {"bytes": (work / name).stat().st_size, "sha256": sha256(work / name)}
        replacing = True
        (out / "meta.json").unlink(missing_ok=True)
        for name in names:
            os.replace(work / name, out / name)
        write_json(out / "meta.json", {**meta, "files": files})
    except OSError as e:  # a full disk, a directory made read-only meanwhile: one line, never a mix
        state = (f"{out} holds no complete dataset now (no meta.json): fix it and rerun with --force" if replacing
                 else "nothing was written: free space or choose another --out")
        raise DataError(f"writing {out} failed ({e.strerror or e}); {state}") from None
    return files


def write_source(out: str | os.PathLike, source: Source, *, resize: Resize = Resize(), write_mode: str = "auto",
                 jpeg_quality: int = 90, workers: int = 1, skip_bad: bool = False,
                 allow_count_mismatch: bool = False, force: bool = False) -> dict | None:
    """Decode, check and write `source` to `out` (train/test .beton + meta.json) in one pass over the
    images; None if `out` is already up to date.

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
    # the lock is held (and workers die with this process) from the first image to the last file moved in
    with staging.Staging(out) as work, staging.children_die_with_me():
        results = {split: write_split(work.path / f"{split}.beton", samples,
                                      Encoding(resize, write_mode, jpeg_quality, stats=split == "train"),
                                      workers, skip_bad, split)
                   for split, samples in source.splits.items()}
        # skipping may have emptied a class
        check_classes(Source(source.name, source.classes, {s: r.kept for s, r in results.items()}))
        meta = _meta(source, request, results, write_mode, problems)
        files = commit(out, work.path, [f"{split}.beton" for split in results], meta)
    return {"counts": meta["counts"], "skipped": meta["skipped"], "bytes": sum(f["bytes"] for f in files.values()),
            "seconds": time.perf_counter() - start, "write_mode": meta["write_mode"]}
