"""PreAct ResNets for 32x32 inputs, as the CS-KD reference's `CIFAR_ResNet18` / `CIFAR_ResNet10`
(alinlab/cs-kd models/resnet.py, class `CIFAR_ResNet` with `PreActBlock`).

Reproduced with the reference's quirks, because the paper's numbers come from this network:
1. The stem is post-activated (conv3x3 -> BN -> ReLU) and is followed by pre-activation blocks,
   so the first block applies BN -> ReLU a second time.
2. The identity shortcut carries the block's *pre-activated* input relu(bn1(x)), not x: the
   reference always defines `self.shortcut = nn.Sequential()` and applies it to the activated
   tensor (kuangliu's original uses x when there is no projection).
3. The projection shortcut is a bare 1x1 conv (no BN), also fed the pre-activated input.
4. There is no final BN -> ReLU before pooling, unlike He et al.'s PreAct ResNet.
5. The pooling is `avg_pool2d(out, 4)`: it assumes a 32x32 input (4x4 final map); other sizes
   are refused with a clear error here rather than a shape mismatch in the linear layer.
6. PyTorch's default initialisation; the linear head has a bias.

Stages are layer1..layer4 (the stem is not a stage): 64/128/256/512 channels at 32/16/8/4 px.
Because of quirk 4 the last stage map is the raw sum of a residual branch and its shortcut, which
is also what the pooled features and BYOT's deepest head read.
"""
import torch
import torch.nn.functional as F
from torch import nn

from cskd.models import Classifier, register_model


def require_32x32(x: torch.Tensor, model_name: str) -> None:
    """Refuse inputs other than 32x32 for the reference's CIFAR nets, whose `avg_pool2d(out, 4)`
    only reduces the 4x4 final map of a 32x32 input to one vector."""
    if x.shape[-2:] != (32, 32):
        raise ValueError(
            f"{model_name} expects 32x32 inputs (reference avg_pool2d(out, 4)), got {tuple(x.shape[-2:])}"
        )


class PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out)  # quirk 2: the activated input, also for the identity
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(Classifier):
    """The reference's `CIFAR_ResNet`: a 3x3 conv(64)-BN-ReLU stem, four stages of `block`s (widths
    64-512 times the block's expansion), `avg_pool2d(out, 4)` and a linear head; PS-KD's
    `resnet101_cifar` is the same class with bottleneck blocks (cskd/models/resnet_cifar.py)."""

    stage_reductions = (1, 2, 4, 8)

    def __init__(self, block: type[nn.Module], num_blocks: list[int], num_classes: int, name: str):
        super().__init__()
        self.model_name = name
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(block, 64, num_blocks[0], 1)
        self.layer2 = self._make_layer(block, 128, num_blocks[1], 2)
        self.layer3 = self._make_layer(block, 256, num_blocks[2], 2)
        self.layer4 = self._make_layer(block, 512, num_blocks[3], 2)
        self.stage_channels = tuple(block.expansion * w for w in (64, 128, 256, 512))
        self.head = nn.Linear(self.stage_channels[-1], num_classes)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = block.expansion * planes
        return nn.Sequential(*layers)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        require_32x32(x, self.model_name)
        out = F.relu(self.bn1(self.conv1(x)))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            maps.append(out)
        return maps

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        # The reference's fixed 4x4 window (quirk 5); the input check makes it a global pool.
        return F.avg_pool2d(last_map, 4).flatten(1)


@register_model("preact_resnet18")
def preact_resnet18(num_classes: int) -> Classifier:
    """The CS-KD paper's network for CIFAR-100 and TinyImageNet (reference `CIFAR_ResNet18`)."""
    return CifarResNet(PreActBlock, [2, 2, 2, 2], num_classes, "preact_resnet18")


@register_model("preact_resnet10")
def preact_resnet10(num_classes: int) -> Classifier:
    """One PreAct block per stage (reference `CIFAR_ResNet10`), a small student for KD runs."""
    return CifarResNet(PreActBlock, [1, 1, 1, 1], num_classes, "preact_resnet10")
