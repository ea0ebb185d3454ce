"""PyramidNet-200 (alpha 240, bottleneck) for 32x32 inputs, with and without ShakeDrop: PS-KD's
CIFAR-100 `PyramidNet(dataset='cifar100', depth=200, alpha=240, num_classes=100, bottleneck=True)`
and `PyramidNet_ShakeDrop(...)` (lgcnsai/PS-KD-Pytorch models/pyramid.py, models/pyramid_shake_drop.py
and models/shakedrop/shakedrop.py; the net is dyhan0920/PyramidNet-PyTorch PyramidNet.py; PS-KD
Table 1).

Han et al.'s PyramidNet: (depth - 2) // 9 = 22 bottleneck blocks per stage, 66 in all, the width
growing by alpha / 66 at every block, 16 -> 256 (outputs x4: 1024), rounded as the reference does.
Block: BN - conv1x1 - BN - ReLU - conv3x3(stride) - BN - ReLU - conv1x1(x4) - BN, no ReLU after the
addition. The shortcut is the identity, zero-padded with the missing channels, after a 2x2
average pool in the first block of stages 2 and 3 (no projection, hence no parameters). A 3x3
conv(16) + BN stem (no ReLU), a final BN - ReLU, `AvgPool2d(8)` (32x32 inputs only) and a linear
head. Initialisation as the reference: convs N(0, sqrt(2 / (k*k*out_channels))), BN 1/0, the head
PyTorch's default.

ShakeDrop (Yamada et al., 2019) multiplies the residual branch of block i (0-based, of 66) before
the addition. Training: one Bernoulli gate per block and batch, kept with probability 1 - p_i where
p_i = 0.5 * (i + 1) / 66; if dropped, the forward scales each sample by alpha ~ U[-1, 1] and the
backward its gradient by an independent beta ~ U[0, 1]. Evaluation: the branch times (1 - p_i).
It adds no parameters.

Stages are the three groups' outputs: 384/704/1024 channels at 32/16/8 px; the last map is after
the final BN-ReLU, what is pooled.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from cskd.models import Classifier, register_model
from cskd.models.preact_resnet import require_32x32


class ShakeDropFunction(torch.autograd.Function):
    """x times a per-sample factor in the forward, the gradient times another in the backward.

    Where the gate keeps the branch both factors are 1; where it drops it they are alpha (forward) and
    beta (backward). Unlike the reference, which reads the gate on the host (`gate.item()`) and draws
    alpha and beta only when it drops, both are drawn every time and selected on the device: the same
    distribution, without a device-to-host sync in each of the 66 blocks, forward and backward.
    Draws come from torch's global generator of x's device, which the trainer seeds and checkpoints.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p_drop: float) -> torch.Tensor:
        keep = torch.empty(1, device=x.device).bernoulli_(1 - p_drop).bool()
        alpha = torch.empty(x.shape[0], device=x.device).uniform_(-1, 1)
        ctx.save_for_backward(keep)
        return x * _per_sample(torch.where(keep, 1.0, alpha), x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        beta = torch.empty(grad.shape[0], device=grad.device).uniform_(0, 1)
        return grad * _per_sample(torch.where(keep, 1.0, beta), grad), None


def _per_sample(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N,) factors in `like`'s dtype (bf16 under autocast, not promoting it), broadcast over C, H, W."""
    return factor.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class ShakeDrop(nn.Module):
    def __init__(self, p_drop: float):
        super().__init__()
        self.p_drop = p_drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return ShakeDropFunction.apply(x, self.p_drop)
        return (1 - self.p_drop) * x

    def extra_repr(self) -> str:
        return f"p_drop={self.p_drop:.4f}"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int, p_drop: float | None):
        super().__init__()
        # Registered in the reference's order, so that under a fixed seed the init draws the same numbers.
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = nn.AvgPool2d(2, 2, ceil_mode=True) if stride != 1 else nn.Identity()
        self.shake_drop = ShakeDrop(p_drop) if p_drop is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        out = self.shake_drop(self.bn4(out))
        shortcut = self.downsample(x)
        # The identity shortcut, zero-padded with the channels the block adds.
        return out + F.pad(shortcut, (0, 0, 0, 0, 0, out.shape[1] - shortcut.shape[1]))


class PyramidNet(Classifier):
    """The reference's CIFAR PyramidNet with bottlenecks; submodule names follow it (`fc` -> `head`)."""

    stage_reductions = (1, 2, 4)

    def __init__(self, depth: int, alpha: float, num_classes: int, shakedrop: bool, name: str):
        super().__init__()
        self.model_name = name
        n = (depth - 2) // 9
        total = 3 * n
        add_rate = alpha / total
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        # The widths as the reference computes them: a running float sum, each block's rounded.
        width, in_planes, i = 16.0, 16, 0
        stage_channels = []
        for s, stride in enumerate((1, 2, 2), start=1):
            blocks = []
            for j in range(n):
                width += add_rate
                # p_i = 0.5 * (i + 1) / 66, written as the reference does so that the values are identical
                p_drop = 1.0 - (1.0 - (0.5 / total) * (i + 1)) if shakedrop else None
                blocks.append(Bottleneck(in_planes, int(round(width)), stride if j == 0 else 1, p_drop))
                in_planes, i = int(round(width)) * Bottleneck.expansion, i + 1
            self.add_module(f"layer{s}", nn.Sequential(*blocks))
            stage_channels.append(in_planes)
        self.stage_channels = tuple(stage_channels)
        self.bn_final = nn.BatchNorm2d(in_planes)
        self.head = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data.normal_(0, math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels)))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        require_32x32(x, self.model_name)
        out = self.bn1(self.conv1(x))
        maps = []
        for layer in (self.layer1, self.layer2, self.layer3):
            out = layer(out)
            maps.append(out)
        maps[-1] = F.relu(self.bn_final(out))
        return maps

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        # The reference's AvgPool2d(8): one window on the 8x8 map of a 32x32 input.
        return F.avg_pool2d(last_map, 8).flatten(1)


@register_model("pyramidnet200_a240")
def pyramidnet200_a240(num_classes: int) -> Classifier:
    """PyramidNet-200 (alpha 240, bottleneck) for 32x32 inputs (PS-KD's `PyramidNet`), PS-KD Table 1."""
    return PyramidNet(200, 240, num_classes, shakedrop=False, name="pyramidnet200_a240")


@register_model("pyramidnet200_a240_shakedrop")
def pyramidnet200_a240_shakedrop(num_classes: int) -> Classifier:
    """The same with ShakeDrop (PS-KD's `PyramidNet_ShakeDrop`), PS-KD Table 1."""
    return PyramidNet(200, 240, num_classes, shakedrop=True, name="pyramidnet200_a240_shakedrop")
