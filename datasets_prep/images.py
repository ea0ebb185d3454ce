"""Decode samples to RGB uint8 arrays and apply the resize policy.

Decoding is by content (PIL ignores the file extension: ImageNet's PNG named .JPEG works) and
every mode (L, LA, P, CMYK, RGBA, I;16, ...) becomes 3-channel RGB, the only layout FFCV's
RGBImageField stores. EXIF orientation is ignored, as torchvision's ImageFolder (hence CS-KD) does.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from cskd.errors import DataError

RESIZE_POLICIES = ("none", "short-side-center-crop")


@dataclass(frozen=True)
class Resize:
    """How stored images are sized: `max_side` caps the longer side (aspect kept, as ffcv-imagenet's
    max_resolution); policy 'short-side-center-crop' makes every image size x size (shorter side
    scaled to `size`, then the centre cropped, as torchvision Resize(S) + CenterCrop(S))."""

    max_side: int | None = None
    policy: str = "none"
    size: int | None = None

    def keeps(self, height: int, width: int) -> bool:
        """Whether an image of this size is stored as it is."""
        if self.policy == "short-side-center-crop":
            return height == width == self.size
        return not self.max_side or max(height, width) <= self.max_side

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
    """An image file (decoded by content), an archive member (any object with `read_bytes()`, see
    datasets_prep.archive) or an HxW[x1|3|4] uint8 array as an HxWx3 uint8 array.

    `resize` (default: cap the longer side at `max_side`, if given) is applied after the RGB conversion.
    """
    resize = resize or Resize(max_side=max_side)
    if isinstance(src, np.ndarray):
        if src.dtype != np.uint8 or src.ndim not in (2, 3) or (src.ndim == 3 and src.shape[2] not in (1, 3, 4)):
            raise DataError(f"array sample must be uint8 HxW or HxWx1/3/4, got {src.dtype} {src.shape}")
        if src.ndim == 3 and src.shape[2] == 3 and resize.keeps(*src.shape[:2]):
            return np.ascontiguousarray(src)  # CIFAR, MNIST: nothing to convert (70 us per image through PIL)
        img = Image.fromarray(src[..., 0] if src.ndim == 3 and src.shape[2] == 1 else src)
    else:
        try:
            img = Image.open(src if isinstance(src, (str, os.PathLike)) else io.BytesIO(src.read_bytes()))
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
