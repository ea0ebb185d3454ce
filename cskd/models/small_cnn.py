"""A small CNN for fast CPU runs (the demo's model): three conv-BN-ReLU stages, global pooling.

About 0.5 M multiply-adds per 32x32 image, so an mnist5k epoch takes seconds on two CPU cores.
`small_cnn_gn` swaps BatchNorm for GroupNorm, which normalises each sample on its own: a step's
gradient then does not depend on how its batch is split into micro-batches or over ranks.
"""
import torch
from torch import nn

from cskd.models import Classifier, register_model


def _stage(c_in: int, c_out: int, pool: bool, group_norm: bool) -> nn.Sequential:
    norm = nn.GroupNorm(4, c_out) if group_norm else nn.BatchNorm2d(c_out)
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), norm, nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(Classifier):
    stage_reductions = (1, 2, 2)

    def __init__(self, num_classes: int, width: int = 16, group_norm: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            _stage(3, width, pool=True, group_norm=group_norm),  # 32 -> 16
            _stage(width, 2 * width, pool=True, group_norm=group_norm),  # 16 -> 8
            _stage(2 * width, 4 * width, pool=False, group_norm=group_norm),
        )
        self.stage_channels = (width, 2 * width, 4 * width)
        self.head = nn.Linear(4 * width, num_classes)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.body:
            x = stage(x)
            maps.append(x)
        return maps


@register_model("small_cnn")
def small_cnn(num_classes: int) -> Classifier:
    """16-32-64 channel CNN for 32x32 inputs; any input size works (global average pooling)."""
    return SmallCNN(num_classes)


@register_model("small_cnn_gn")
def small_cnn_gn(num_classes: int) -> Classifier:
    """small_cnn with GroupNorm(4 groups): no batch statistics."""
    return SmallCNN(num_classes, group_norm=True)
