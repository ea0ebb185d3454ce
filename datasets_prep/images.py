"""Decode samples to RGB uint8 arrays, apply the resize policy, and validate whole splits up front.

Decoding is by content (PIL ignores the file extension: ImageNet's PNG named .JPEG works) and
every mode (L, LA, P, CMYK, RGBA, I;16, ...) becomes 3-channel RGB, because FFCV's writer only
accepts H x W x 3 and *hangs forever* when one of its workers raises. `validate` therefore decodes
every image in a process pool before anything is written, and accumulates the per-channel pixel
sums of the training split on the way (the mean/std recorded in meta.json) so no extra pass is
needed. EXIF orientation is ignored, as torchvision's ImageFolder (hence CS-KD) does.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from multiprocessing import Pool

import numpy as np
from PIL import Image

from cskd.errors import DataError
from datasets_prep.staging import die_with_parent

RESIZE_POLICIES = ("none", "short-side-center-crop")


@dataclass(frozen=True)
class Resize:
    """How stored images are sized: `max_side` caps the longer side (aspect kept, as ffcv-imagenet's
    max_resolution); policy 'short-side-center-crop' makes every image size x size (shorter side
    scaled to `size`, then the centre cropped, as torchvision Resize(S) + CenterCrop(S))."""

    max_side: int | None = None
    policy: str = "none"
    size: int | None = None

    def apply(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if self.policy == "short-side-center-crop":
            s = self.size
            scale = s / min(w, h)
            nw, nh = (s, max(s, int(h * scale))) if w <= h else (max(s, int(w * scale)), s)
            if (nw, nh) != (w, h):
                img = img.resize((nw, nh), Image.Resampling.BICUBIC)
            left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
            return img.crop((left, top, left + s, top + s))
        if self.max_side and max(w, h) > self.max_side:
            # Pillow's BICUBIC widens its kernel when downscaling, i.e. it antialiases
            scale = self.max_side / max(w, h)
            img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BICUBIC)
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert('RGB') clips at 255 instead of scaling
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(src: str | os.PathLike | np.ndarray, max_side: int | None = None,
             resize: Resize | None = None) -> np.ndarray:
    """An image file (decoded by content) or an HxW[x1|3|4] uint8 array as an HxWx3 uint8 array.

    `resize` (default: cap the longer side at `max_side`, if given) is applied after the RGB conversion.
    """
    resize = resize or Resize(max_side=max_side)
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise DataError(f"array sample must be uint8 HxW or HxWx1/3/4, got {src.dtype} {src.shape}")
        img = Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src)
    else:
        try:
            img = Image.open(src)
            img.load()  # Image.open is lazy: a truncated file only fails here
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
            raise DataError(f"{src}: cannot decode image ({type(e).__name__}: {e})") from None
    try:
        out = np.asarray(resize.apply(_to_rgb(img)), dtype=np.uint8)
    except Exception as e:
        raise DataError(f"{src}: cannot convert image of mode {img.mode} to RGB ({e})") from None
    return np.ascontiguousarray(out)


def sample_name(src, split: str, i: int) -> str:
    """How a sample is named in errors and meta.json: its path, or split[i] for arrays."""
    return f"{split}[{i}]" if isinstance(src, np.ndarray) else str(src)


def _check_one(job):
    """Decode one sample fully: (None, h, w, channel sums, channel sums of squares) or (reason, ...)."""
    src, resize, stats = job
    try:
        img = load_rgb(src, resize=resize)
    except DataError as e:
        return str(e), 0, 0, None, None
    if not stats:
        return None, img.shape[0], img.shape[1], None, None
    px = img.reshape(-1, 3).astype(np.float64) / 255
    return None, img.shape[0], img.shape[1], px.sum(0), np.square(px).sum(0)


@dataclass
class Validation:
    """What `validate` found for one split."""

    bad: list[tuple[str, str]]  # (sample name, reason)
    ok: list[bool]  # per sample
    max_side: int  # largest stored side among good samples
    max_bytes: int  # largest stored raw image (h*w*3)
    shape: tuple[int, int] | None = None  # (h, w) of every good sample if they all share it, else None
    pixels: int = 0
    sums: np.ndarray | None = None
    sumsq: np.ndarray | None = None

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.sums / self.pixels
        std = np.sqrt(np.maximum(self.sumsq / self.pixels - mean ** 2, 0))
        return mean.round(6).tolist(), std.round(6).tolist()


def validate(samples, workers: int = 1, resize: Resize | None = None, stats: bool = False,
             label: str = "validate", split: str = "") -> Validation:
    """Fully decode every sample in `workers` processes; list the bad ones instead of raising.

    With `stats`, also accumulate per-channel pixel sums of the stored (resized) images, every
    pixel weighted equally, for the dataset mean/std."""
    resize = resize or Resize()
    jobs = ((src, resize, stats) for src, _ in samples)
    bad, ok = [], []
    result = Validation(bad, ok, 0, 0, None, 0, np.zeros(3), np.zeros(3))
    shapes = set()
    chunk = max(1, min(256, len(samples) // (4 * max(workers, 1)) or 1))
    # die_with_parent: a pool worker blocks on its task queue forever if this process is killed (the
    # fork hook of datasets_prep.staging covers it during a conversion; this also covers other callers)
    pool = Pool(workers, initializer=die_with_parent, initargs=(os.getpid(),)) if workers > 1 else None
    try:
        results = pool.imap(_check_one, jobs, chunksize=chunk) if pool else map(_check_one, jobs)
        for i, (reason, h, w, s, sq) in enumerate(progress(results, len(samples), label)):
            ok.append(reason is None)
            if reason is not None:
                bad.append((sample_name(samples[i][0], split, i), reason))
                continue
            result.max_side, result.max_bytes = max(result.max_side, h, w), max(result.max_bytes, h * w * 3)
            if len(shapes) < 2:
                shapes.add((h, w))
            if stats:
                result.pixels += h * w
                result.sums += s
                result.sumsq += sq
    finally:
        if pool:
            pool.terminate()
    result.shape = next(iter(shapes)) if len(shapes) == 1 else None
    return result


def progress(iterable, total: int, label: str):
    """Yield from `iterable`; a rich progress bar on a terminal, start/end lines otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import track

        yield from track(iterable, total=total, description=label, transient=True, console=Console(stderr=True))
        return
    print(f"{label}: {total} images ...", file=sys.stderr, flush=True)
    yield from iterable

