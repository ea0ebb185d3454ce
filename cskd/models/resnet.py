"""ImageNet-style ResNets (224 px, trained from scratch), built from torchvision's classes.

They correspond to the CS-KD reference's `ResNet` (alinlab/cs-kd models/resnet.py), itself a copy
of torchvision's: 7x7/2 stem + BN + ReLU + 3x3/2 max-pool, then four stages of `BasicBlock`s or
`Bottleneck`s (stride on the 3x3 conv of a bottleneck, conv1x1 + BN projection shortcuts), global
average pooling and a linear head. The paper uses them for the fine-grained sets (CUB-200,
Stanford Dogs, MIT-67; CS-KD Table 1, §3.1) and for ImageNet (Table 5), always with
`pretrained=False`; PS-KD's ImageNet ResNet-152 is the same network (see `resnet152`).
Initialisation is torchvision's, the same as the reference's: Kaiming-normal (fan_out)
convolutions, BN weight 1 / bias 0, no zero-init of the last BN of each block, default `nn.Linear`
init for the head.

Stages are layer1..layer4 (the stem is not a stage): with a 224-px input they are 56/28/14/7 px,
with 64/128/256/512 channels (x4 for bottlenecks). Any input size works (adaptive pooling).
"""
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from cskd.models import Classifier, register_model


class TorchvisionResNet(Classifier):
    """A torchvision `ResNet` whose stem and stages become this module's own submodules and
    whose `fc` becomes `head`; its `avgpool` is `Classifier.pool` (global average).

    The state_dict keys are torchvision's with `fc.` renamed `head.`.
    """

    stage_reductions = (1, 2, 4, 8)

    def __init__(self, block: type[nn.Module], layers: list[int], num_classes: int, **resnet_kwargs):
        super().__init__()
        # torchvision's constructor performs the reference's initialisation; its modules are moved
        # here and the ResNet wrapper itself is not kept, so no unused copy (or unused `fc`) remains.
        net = ResNet(block, layers, num_classes=num_classes, **resnet_kwargs)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        self.head = net.fc
        self.stage_channels = tuple(w * block.expansion for w in (64, 128, 256, 512))

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            out = layer(out)
            maps.append(out)
        return maps


@register_model("resnet10")
def resnet10(num_classes: int) -> Classifier:
    """ResNet-10: one `BasicBlock` per stage (reference `resnet10`), the fine-grained KD student."""
    return TorchvisionResNet(BasicBlock, [1, 1, 1, 1], num_classes)


@register_model("resnet18")
def resnet18(num_classes: int) -> Classifier:
    """ResNet-18 (reference `resnet18`), the CS-KD network for the fine-grained sets at 224 px."""
    return TorchvisionResNet(BasicBlock, [2, 2, 2, 2], num_classes)


@register_model("resnet50")
def resnet50(num_classes: int) -> Classifier:
    """ResNet-50 (reference `resnet50`), CS-KD Table 5 (ImageNet)."""
    return TorchvisionResNet(Bottleneck, [3, 4, 6, 3], num_classes)


@register_model("resnet101")
def resnet101(num_classes: int) -> Classifier:
    """ResNet-101 (reference `resnet101`), CS-KD Table 5 (ImageNet)."""
    return TorchvisionResNet(Bottleneck, [3, 4, 23, 3], num_classes)


@register_model("resnet152")
def resnet152(num_classes: int) -> Classifier:
    """ResNet-152, PS-KD Table 4 (ImageNet) and the backbone of its Table 5 detector.

    PS-KD builds it with its own `ResNet(dataset='imagenet', depth=152, bottleneck=True)`
    (lgcnsai/PS-KD-Pytorch models/resnet_imagenet.py), a copy of torchvision's (stride on the 3x3
    conv, conv1x1 + BN projections, adaptive pooling). Its initialisation is torchvision's too:
    convs N(0, sqrt(2 / (k*k*out_channels))) is exactly `kaiming_normal_(mode="fan_out",
    nonlinearity="relu")` (std sqrt(2) / sqrt(fan_out), fan_out = k*k*out_channels), BN 1/0, and
    the default `nn.Linear` init for the head; under the same seed both draw bit-identical weights."""
    return TorchvisionResNet(Bottleneck, [3, 8, 36, 3], num_classes)


@register_model("resnext101_32x4d")
def resnext101_32x4d(num_classes: int) -> Classifier:
    """ResNeXt-101 32x4d, CS-KD Table 5 (ImageNet): 32 groups of width 4 in each bottleneck.

    The reference repository has no such constructor (it has `resnext50_32x4d` and
    `resnext101_32x8d` on the same `ResNet` class); this one follows that pattern, which is also
    torchvision's ResNeXt definition."""
    return TorchvisionResNet(Bottleneck, [3, 4, 23, 3], num_classes, groups=32, width_per_group=4)
