"""The papers' input pipelines as batched, seeded torch ops on uint8 NHWC batches, on the batch's device.

Running the augmentation in torch after decoding (rather than FFCV's numba transforms or PIL per
sample) makes it reproducible from a seeded `torch.Generator` (FFCV's transforms draw from numba's
unseeded per-thread RNG), identical for the FFCV and the device-resident loaders, and lets it run
on the GPU when the batch is there.

Pipelines, as the reference code's `load_dataset` (CS-KD) and PS-KD's ImageNet loader:

| pipeline | train | test | mean / std |
|---|---|---|---|
| cifar | RandomCrop(32, padding=4), HFlip | none | CIFAR (0.4914, 0.4822, 0.4465) / (0.2023, 0.1994, 0.2010) |
| tinyimagenet32 | RandomResizedCrop(32), HFlip | Resize(32) | ImageNet |
| tinyimagenet64 | RandomResizedCrop(64), HFlip | Resize(64) (identity at 64 px) | ImageNet |
| imagenet224 | RandomResizedCrop(224), HFlip | Resize(256), CenterCrop(224) | ImageNet |
| crop / none | pad-4 crop / nothing (MNIST: mirrored digits are other digits) | none | meta.json's |

ImageNet mean/std: (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225). Optional, off by default:
ColorJitter(b, c, s) and PCA lighting (AlexNet-style, eigval/eigvec below), PS-KD's ImageNet recipe
(0.4 and 0.1). RandomResizedCrop draws its boxes exactly as torchvision's `get_params` (10 tries,
then the centre-crop fallback) but resamples bilinearly without antialiasing (PIL's bilinear
antialiases when shrinking): the same crop distribution, slightly sharper pixels when a crop is
shrunk, i.e. statistically equivalent rather than bit-identical to the reference.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)  # the reference's, for CIFAR-10 and -100
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# PCA of ImageNet RGB pixels (fb.resnet.torch), as PS-KD's `Lighting`.
IMAGENET_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_EIGVEC = ((-0.5675, 0.7192, 0.4009), (-0.5808, -0.0045, -0.8140), (-0.5836, -0.6948, 0.4203))
RRC_SCALE, RRC_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


@dataclass(frozen=True)
class Spec:
    """One pipeline: train crop (pad or RandomResizedCrop size), flip, test resize / centre crop, constants."""

    pad: int = 0  # RandomCrop(original size, padding=pad)
    rrc: int = 0  # RandomResizedCrop(rrc)
    flip: bool = False
    resize: int = 0  # test: shorter side to `resize`
    center_crop: int = 0  # test: CenterCrop(center_crop) after the resize
    mean: tuple | None = None  # None: the dataset's meta.json mean/std
    std: tuple | None = None


PIPELINES = {
    "cifar": Spec(pad=4, flip=True, mean=CIFAR_MEAN, std=CIFAR_STD),
    "tinyimagenet32": Spec(rrc=32, flip=True, resize=32, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "tinyimagenet64": Spec(rrc=64, flip=True, resize=64, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "imagenet224": Spec(rrc=224, flip=True, resize=256, center_crop=224, mean=IMAGENET_MEAN, std=IMAGENET_STD),
    "crop": Spec(pad=4),
    "none": Spec(),
}


def _gather_pixels(images: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[i, y, x] = images[i, rows[i, y], cols[i, x]] for NHWC `images`, in one `index_select` of
    whole pixels; coordinates outside the image read 0 (zero padding, applied in place after).

    Index arithmetic on (n, H) and (n, W) coordinates replaces padding, cropping and flipping as
    separate passes over the batch (crop + flip of 256 CIFAR images: 3.4 -> 1.0 ms on 2 CPU cores)."""
    n, h, w, c = images.shape
    first_row = torch.arange(n, device=images.device)[:, None] * h
    flat = (((first_row + rows.clamp(0, h - 1)) * w)[:, :, None] + cols.clamp(0, w - 1)[:, None, :])
    out = images.reshape(n * h * w, c).index_select(0, flat.view(-1)).view(n, rows.shape[1], cols.shape[1], c)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    return out.mul_(inside[..., None])


def pad_crop(images: torch.Tensor, padding: int, generator: torch.Generator, flip: bool = False) -> torch.Tensor:
    """Random crop of the original size from the zero-padded image, independently per sample, then
    (with `flip`) a left-right mirror with probability 1/2: one gather of uint8 pixels.

    Same distribution as torchvision `RandomCrop(size, padding=padding)` (fill 0), then
    `RandomHorizontalFlip()`: offsets uniform in [0, 2 * padding] on each axis. Draws, in order:
    row offsets, column offsets, then the flips (`flip_mask`)."""
    n, h, w, _ = images.shape
    device = images.device
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    rows = dy[:, None] + torch.arange(-padding, h - padding, device=device)  # (n, h) in unpadded coordinates
    cols = dx[:, None] + torch.arange(-padding, w - padding, device=device)
    if flip:
        cols = torch.where(flip_mask(n, generator, device)[:, None], cols.flip(1), cols)
    return _gather_pixels(images, rows, cols)


def flip_mask(n: int, generator: torch.Generator, device) -> torch.Tensor:
    """Which of n samples to mirror (probability 1/2 each)."""
    return torch.rand(n, generator=generator, device=device) < 0.5


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each NHWC sample left-right with probability 1/2."""
    flip = flip_mask(images.shape[0], generator, images.device)
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def rrc_boxes(n: int, height: int, width: int, generator: torch.Generator, scale=RRC_SCALE, ratio=RRC_RATIO,
              device=None) -> torch.Tensor:
    """(n, 4) int64 boxes (top, left, h, w), each drawn as torchvision's RandomResizedCrop.get_params.

    Ten tries of area ~ U(scale) * H * W and log aspect ~ U(log ratio); the first try that fits
    wins, else the centre crop clamped to the ratio range. All ten tries are drawn for every sample
    (a fixed number of draws keeps the stream position independent of the outcome).
    """
    area = torch.rand(n, 10, generator=generator, device=device, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0]
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, 10, generator=generator, device=device, dtype=torch.float64) * (hi - lo) + lo)
    target = area * height * width
    ws = torch.round(torch.sqrt(target * aspect)).long()  # round half to even, as Python's round
    hs = torch.round(torch.sqrt(target / aspect)).long()
    ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = ok.int().argmax(1, keepdim=True)  # first fitting try (0 if none: then `found` is False)
    found = ok.any(1)
    w, h = ws.gather(1, first)[:, 0], hs.gather(1, first)[:, 0]
    in_ratio = width / height  # fallback, the same for every sample
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    u = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    top = torch.where(found, (u[:, 0] * (height - h + 1)).long(), (height - fh) // 2)
    left = torch.where(found, (u[:, 1] * (width - w + 1)).long(), (width - fw) // 2)
    return torch.stack([top, left, h, w], 1)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample crop (top, left, h, w) of float NCHW `x`, resized bilinearly to size x size.

    One `grid_sample` for the whole batch; each output pixel samples the crop where
    `interpolate(crop, size, mode='bilinear', align_corners=False, antialias=False)` would.
    `flip` (bool per sample) mirrors the sampling grid: the flipped output without another pass.
    """
    n, c, height, width = x.shape
    b = boxes.to(x.dtype)
    theta = torch.zeros(n, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = b[:, 3] / width
    if flip is not None:
        theta[:, 0, 0] *= 1 - 2 * flip.to(x.dtype)
    theta[:, 0, 2] = (2 * b[:, 1] + b[:, 3]) / width - 1
    theta[:, 1, 1] = b[:, 2] / height
    theta[:, 1, 2] = (2 * b[:, 0] + b[:, 2]) / height - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resize_center_crop(x: torch.Tensor, resize: int, crop: int) -> torch.Tensor:
    """torchvision Resize(resize) (shorter side, antialiased bilinear) then CenterCrop(crop) on NCHW."""
    height, width = x.shape[-2:]
    if resize and min(height, width) != resize:
        short, long = sorted((height, width))
        new_long = int(resize * long / short)
        size = (resize, new_long) if height <= width else (new_long, resize)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        height, width = size
    if crop:
        top, left = int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0))
        x = x[..., top:top + crop, left:left + crop]
    return x


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # torchvision rgb_to_grayscale


def color_jitter(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """ColorJitter(brightness=s, contrast=s, saturation=s) on float NCHW in [0, 255], per sample.

    Factors ~ U(max(0, 1 - s), 1 + s) and a random order of the three ops per sample, as torchvision.
    Each position blends every sample once with its own op's target (black, its mean grey level, or
    its grey image), so the batch pays for one blend per position, not three.
    """
    n = x.shape[0]
    factors = (torch.rand(n, 3, generator=generator, device=x.device) * 2 - 1) * strength + 1
    factors = factors.clamp(min=0)
    order = torch.rand(n, 3, generator=generator, device=x.device).argsort(1)
    for pos in range(3):
        op = order[:, pos, None, None, None]  # 0 brightness, 1 contrast, 2 saturation
        f = factors.gather(1, order[:, pos:pos + 1])[:, :, None, None]
        gray = _gray(x)
        target = torch.where(op == 2, gray, torch.where(op == 1, gray.mean((1, 2, 3), keepdim=True), 0.0))
        x = (f * x + (1 - f) * target).clamp(0, 255)
    return x


@functools.lru_cache(maxsize=None)
def _pca_basis(device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet's PCA eigenvalues and eigenvectors on `device`, built once: no host-to-device copy per step."""
    return (torch.tensor(IMAGENET_EIGVAL, device=device, dtype=dtype),
            torch.tensor(IMAGENET_EIGVEC, device=device, dtype=dtype))


def lighting(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """PCA lighting noise (PS-KD `Lighting(0.1, eigval, eigvec)`) on float NCHW in [0, 255], per sample."""
    alpha = torch.randn(x.shape[0], 3, generator=generator, device=x.device) * std
    eigval, eigvec = _pca_basis(x.device, alpha.dtype)
    rgb = (alpha * eigval) @ eigvec.T  # (n, 3): sum_j eigvec[c, j] * alpha_j * eigval_j
    return x + 255 * rgb[:, :, None, None]


class Transform:
    """A pipeline's train and test transforms, uint8 NHWC -> normalised float NCHW.

    `decoded_crop`: FFCV's RandomResizedCrop / CenterCrop decoders already cropped and resized
    (variable-size stored images), so only flip, colour ops and normalisation are left here.
    """

    def __init__(self, pipeline: str, meta: dict, device: torch.device, channels_last: bool,
                 color_jitter: float = 0.0, lighting: float = 0.0, decoded_crop: bool = False):
        self.spec = PIPELINES[pipeline]
        self.jitter, self.lighting, self.decoded_crop = color_jitter, lighting, decoded_crop
        mean = self.spec.mean or meta["mean"]
        std = torch.tensor(self.spec.std or meta["std"], dtype=torch.float32, device=device)
        # x / 255 - mean) / std as one multiply-add; [:, None, None] broadcasts over NCHW
        self.scale = (1.0 / (255.0 * std))[:, None, None]
        self.shift = (-torch.tensor(mean, dtype=torch.float32, device=device) / std)[:, None, None]
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """NCHW (uint8 or float32 in [0, 255]) -> float32, normalised, in the requested memory format.

        A uint8 batch changes layout before the float conversion: a quarter of the bytes to move."""
        if not x.is_floating_point():
            x = x.contiguous(memory_format=self.memory_format)
        return torch.mul(x, self.scale).add_(self.shift).contiguous(memory_format=self.memory_format)

    def train(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        spec = self.spec
        if spec.pad:  # crop and flip in one uint8 gather, before anything is converted to float
            x = pad_crop(images, spec.pad, generator, flip=spec.flip).permute(0, 3, 1, 2)
        elif spec.rrc and not self.decoded_crop:
            n, height, width, _ = images.shape
            flip = flip_mask(n, generator, images.device) if spec.flip else None
            boxes = rrc_boxes(n, height, width, generator, device=images.device)
            x = resized_crop(images.permute(0, 3, 1, 2).float(), boxes, spec.rrc, flip)
        else:
            if spec.flip:
                images = random_hflip(images, generator)
            x = images.permute(0, 3, 1, 2)  # a view; uint8 stays uint8 until something needs floats
        if self.jitter:
            x = color_jitter(x.float(), self.jitter, generator)
        if self.lighting:
            x = lighting(x.float(), self.lighting, generator)
        return self.normalize(x)

    def test(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2)
        if not self.decoded_crop and (self.spec.resize or self.spec.center_crop):
            x = resize_center_crop(x.float(), self.spec.resize, self.spec.center_crop)
        return self.normalize(x)
