"""ResNeXt-29 (8x64d) for 32x32 inputs, PS-KD's CIFAR-100 ResNeXt (PS-KD Table 1): the reference's
`CifarResNeXt(cardinality=8, depth=29, nlabels=100, base_width=64, widen_factor=4)`
(lgcnsai/PS-KD-Pytorch models/resnext.py, Pau Rodriguez's port of Xie et al.'s CIFAR ResNeXt).

A 3x3 conv(64) + BN + ReLU stem, then 3 stages of (depth - 2) // 9 = 3 post-activation "type C"
bottlenecks: conv1x1 to D channels - BN - ReLU - grouped conv3x3 (cardinality groups, the stride
of the stage's first block) - BN - ReLU - conv1x1 - BN, plus the shortcut, then ReLU. Stage outputs
are 256/512/1024 (64/128/256 x widen_factor); D = cardinality * int(base_width * out / (64 *
widen_factor)) = 512/1024/2048. The shortcut is conv1x1(stride) + BN where the channels change
(the first block of each stage), else the identity. `avg_pool2d(x, 8, 1)` then a linear head, so
32x32 inputs only. Submodule names are the reference's (`classifier` -> `head`).

Initialisation as the reference: the head's weight Kaiming-normal (fan_in), then every conv
Kaiming-normal (fan_out), BN weight 1, and every bias (BN's and the head's) 0.

Stages: 256/512/1024 channels at 32/16/8 px; the last (after its final ReLU) is what is pooled.
"""
import torch
import torch.nn.functional as F
from torch import nn

from cskd.models import Classifier, register_model
from cskd.models.preact_resnet import require_32x32


class ResNeXtBottleneck(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int, cardinality: int, base_width: int,
                 widen_factor: int):
        super().__init__()
        d = cardinality * int(base_width * out_channels / (widen_factor * 64.0))
        self.conv_reduce = nn.Conv2d(in_channels, d, 1, bias=False)
        self.bn_reduce = nn.BatchNorm2d(d)
        self.conv_conv = nn.Conv2d(d, d, 3, stride, 1, groups=cardinality, bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.conv_expand = nn.Conv2d(d, out_channels, 1, bias=False)
        self.bn_expand = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Sequential()
        # The reference projects only when the channels change; every stride-2 block also changes them.
        if in_channels != out_channels:
            self.shortcut.add_module("shortcut_conv", nn.Conv2d(in_channels, out_channels, 1, stride, bias=False))
            self.shortcut.add_module("shortcut_bn", nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn_reduce(self.conv_reduce(x)), inplace=True)
        out = F.relu(self.bn(self.conv_conv(out)), inplace=True)
        out = self.bn_expand(self.conv_expand(out))
        return F.relu(self.shortcut(x) + out, inplace=True)


class CifarResNeXt(Classifier):
    stage_reductions = (1, 2, 4)

    def __init__(self, cardinality: int, depth: int, num_classes: int, base_width: int, widen_factor: int,
                 name: str):
        super().__init__()
        self.model_name = name
        block_depth = (depth - 2) // 9
        widths = (64, 64 * widen_factor, 128 * widen_factor, 256 * widen_factor)
        self.stage_channels = widths[1:]
        self.conv_1_3x3 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn_1 = nn.BatchNorm2d(64)
        for i, stride in enumerate((1, 2, 2), start=1):
            stage = nn.Sequential()
            for j in range(block_depth):
                c_in = widths[i - 1] if j == 0 else widths[i]
                stage.add_module(f"stage_{i}_bottleneck_{j}", ResNeXtBottleneck(
                    c_in, widths[i], stride if j == 0 else 1, cardinality, base_width, widen_factor))
            self.add_module(f"stage_{i}", stage)
        self.head = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference initialises the classifier first, then walks its state_dict in order; the same
        # order of draws gives the same weights under a fixed seed.
        nn.init.kaiming_normal_(self.head.weight)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.head.bias)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        require_32x32(x, self.model_name)
        out = F.relu(self.bn_1(self.conv_1_3x3(x)), inplace=True)
        maps = []
        for stage in (self.stage_1, self.stage_2, self.stage_3):
            out = stage(out)
            maps.append(out)
        return maps

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        # The reference's avg_pool2d(x, 8, 1): one window on the 8x8 map of a 32x32 input.
        return F.avg_pool2d(last_map, 8, 1).flatten(1)


@register_model("resnext29_8x64d")
def resnext29_8x64d(num_classes: int) -> Classifier:
    """ResNeXt-29 8x64d for 32x32 inputs (PS-KD's `CifarResNeXt`), PS-KD Table 1 on CIFAR-100."""
    return CifarResNeXt(8, 29, num_classes, 64, 4, "resnext29_8x64d")
