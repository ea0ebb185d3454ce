"""ResNet-101 for 32x32 inputs, PS-KD's CIFAR-100 `CIFAR_ResNet101_Bottle` (lgcnsai/PS-KD-Pytorch
models/preact_resnet.py: class `CIFAR_ResNet` with `Bottleneck_CIFAR`; PS-KD Table 1).

Despite the file it lives in (and the PS-KD README's "PreAct ResNet-101"), the blocks are
*post-activation* bottlenecks: conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(x4)-BN, plus the
shortcut, then ReLU. The shortcut is a conv1x1(stride) + BN projection where the shape changes,
else the identity. Blocks [3, 4, 23, 3] with widths 64/128/256/512 (outputs x4), a 3x3 conv(64) +
BN + ReLU stem with no max-pool, `avg_pool2d(out, 4)` (so 32x32 inputs only, as the other reference
CIFAR nets) and a linear head with bias. PyTorch's default initialisation: `CIFAR_ResNet` sets none.

Stages are layer1..layer4: 256/512/1024/2048 channels at 32/16/8/4 px; the last map (after the
final block's ReLU) is what is pooled.
"""
import torch
import torch.nn.functional as F
from torch import nn

from cskd.models import Classifier, register_model
from cskd.models.preact_resnet import CifarResNet


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out_planes = self.expansion * planes
        # Registered in the reference's order, so that under a fixed seed the default
        # initialisation draws the same numbers.
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


@register_model("resnet101_cifar")
def resnet101_cifar(num_classes: int) -> Classifier:
    """ResNet-101 for 32x32 inputs (PS-KD's `CIFAR_ResNet101_Bottle`), PS-KD Table 1 on CIFAR-100."""
    return CifarResNet(Bottleneck, [3, 4, 23, 3], num_classes, "resnet101_cifar")
