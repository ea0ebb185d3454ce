"""Batched augmentation on uint8 NHWC tensors, on whatever device the batch lives on.

Running the augmentation in torch after FFCV's decode (rather than FFCV's numba transforms) makes
it reproducible from a seeded `torch.Generator` (FFCV's transforms draw from numba's unseeded
per-thread RNG), identical for the loaders that issue 4's device-resident path will add, and
runs on the GPU when the batch is there.
"""
from __future__ import annotations

import torch


def pad_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the original size from the zero-padded image, independently per sample.

    Same distribution as torchvision `RandomCrop(size, padding=padding)` (fill 0): offsets uniform
    in [0, 2 * padding] on each axis.
    """
    n, h, w, _ = images.shape
    padded = torch.nn.functional.pad(images, (0, 0, padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, :, None]  # (n, h, 1)
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, :]  # (n, 1, w)
    batch = torch.arange(n, device=images.device)[:, None, None]
    return padded[batch, rows, cols]  # (n, h, w, c)


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each sample left-right with probability 1/2."""
    flip = torch.rand(images.shape[0], generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(2), images)


def augment(images: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """Apply a named policy: 'cifar' (pad-4 crop + flip), 'crop' (pad-4 crop), 'none'."""
    if policy in ("cifar", "crop"):
        images = pad_crop(images, 4, generator)
    if policy == "cifar":
        images = random_hflip(images, generator)
    return images


class Normalize:
    """uint8 NHWC -> float NCHW, (x / 255 - mean) / std; channels_last keeps the NHWC memory layout."""

    def __init__(self, mean, std, device: torch.device, channels_last: bool):
        std_t = torch.tensor(std, dtype=torch.float32, device=device)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32, device=device) / std_t
        self.channels_last = channels_last

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() * self.scale + self.shift).permute(0, 3, 1, 2)
        return x if self.channels_last else x.contiguous()
