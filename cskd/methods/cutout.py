"""Cutout (DeVries & Taylor, 2017): zero one square patch of every training image; loss CE.

As uoguelph-mlrg/Cutout `util/cutout.py` with n_holes=1: the patch centre (y, x) is uniform over
the image, the patch spans rows y - size//2 .. y + size//2 - 1 (columns likewise), clipped at the
borders, so a patch near an edge is smaller (an odd size cuts size - 1, as the reference does).
The reference appends Cutout after Normalize in its train transform: the patch is 0 on the
*normalised* image (the mean colour), which is what zeroing the device batch here gives.

The centres are drawn from torch's global CPU generator, seeded per rank and checkpointed by the
trainer (see mixup.py), and the mask is built on the device batch with tensor ops.
"""
from dataclasses import dataclass

import torch

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import cross_entropy
from cskd.methods.base import Method, StepOutput, register_method


def draw_centres(n: int, height: int, width: int) -> torch.Tensor:
    """(n, 2) int64 on the CPU: each image's patch centre (row uniform in [0, height), column in [0, width)),
    from torch's global CPU generator."""
    rows = torch.randint(height, (n,))
    cols = torch.randint(width, (n,))
    return torch.stack([rows, cols], dim=1)


def cutout(images: torch.Tensor, size: int, centres: torch.Tensor) -> torch.Tensor:
    """`images` (N, C, H, W) with the patch of side `size` around each row of `centres` (N, 2) set to 0.

    Patch rows [y - size//2, y + size//2) clipped to [0, H), columns likewise: the reference's
    `mask[y1: y2, x1: x2] = 0.`. A new tensor; `images` is left as it is."""
    _, _, height, width = images.shape
    centres = centres.to(images.device)
    half = size // 2
    rows = torch.arange(height, device=images.device)
    cols = torch.arange(width, device=images.device)
    in_rows = (rows >= centres[:, :1] - half) & (rows < centres[:, :1] + half)  # (N, H)
    in_cols = (cols >= centres[:, 1:] - half) & (cols < centres[:, 1:] + half)  # (N, W)
    hole = in_rows[:, None, :, None] & in_cols[:, None, None, :]  # (N, 1, H, W)
    return images.clone().masked_fill_(hole, 0)  # in place on a clone: keeps a channels_last layout


@dataclass
class CutoutParams:
    # Side of the patch in pixels: 8, PS-KD §4.1 (also the Cutout reference's CIFAR-100 setting).
    size: int = 8


def check_cutout_size(name: str, size: int) -> None:
    """The patch side in method `name`'s section (cutout, pskd_cutout)."""
    if size < 2:  # the patch side is 2 * (size // 2): size 1 would cut nothing
        raise ConfigError(f"config key '{name}.size' must be >= 2 (the patch side in pixels), got {size}; "
                          f"e.g. {name}.size=8")


@register_method("cutout")
class Cutout(Method):
    Params = CutoutParams

    @classmethod
    def check_params(cls, params: CutoutParams) -> None:
        check_cutout_size(cls.name, params.size)

    def loss(self, model, batch: Batch) -> StepOutput:
        n, _, height, width = batch.images.shape
        logits = model(cutout(batch.images, self.params.size, draw_centres(n, height, width)))
        return StepOutput(cross_entropy(logits, batch.labels), logits)
