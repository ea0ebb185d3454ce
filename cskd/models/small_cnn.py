"""A small CNN for fast CPU runs (the demo's model): three conv-BN-ReLU stages, global pooling.

About 0.5 M multiply-adds per 32x32 image, so an mnist5k epoch takes seconds on two CPU cores.
"""
import torch
from torch import nn

from cskd.models import Classifier, register_model


def _stage(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class SmallCNN(Classifier):
    stage_reductions = (1, 2, 2)

    def __init__(self, num_classes: int, width: int = 16):
        super().__init__()
        self.body = nn.Sequential(
            _stage(3, width, pool=True),  # 32 -> 16
            _stage(width, 2 * width, pool=True),  # 16 -> 8
            _stage(2 * width, 4 * width, pool=False),
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
