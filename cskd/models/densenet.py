"""DenseNet-BC-121 of the CS-KD paper (Table 1, §3.1): a 32-px CIFAR variant and torchvision's 224-px net.

`densenet121_bc_cifar` is the reference's `CIFAR_DenseNet121` (alinlab/cs-kd models/densenet3.py,
kuangliu/pytorch-cifar style; PS-KD has the same code): growth k = 32, dense blocks [6, 12, 24, 16],
a 64-channel (2k) 3x3 stem conv with no BN/ReLU/pool after it, bottleneck layers
BN-ReLU-1x1(4k)-BN-ReLU-3x3(k), transitions BN-ReLU-1x1-avgpool2 halving the channels
(reduction 0.5), a final BN-ReLU and `avg_pool2d(out, 4)`, which hard-codes 32x32 inputs.
PyTorch's default initialisation, as in the reference (densenet3.py sets none).

`densenet121` is the reference's `densenet121` (models/densenet.py, a copy of torchvision's), built
with torchvision's `DenseNet` class and trained from scratch; torchvision's initialisation is the
reference's (Kaiming-normal fan_in convolutions, BN 1/0, zero head bias).

Stages: the output of each dense block *before* its transition (the transition opens the next
stage), so both nets have 256/512/1024/1024 channels at reductions 1/2/4/8 (32/16/8/4 px for the
CIFAR net, 56/28/14/7 px at 224 px). Blocks 1-3 give the raw concatenation of their layers'
features, which is what BYOT-style auxiliary heads read, like a ResNet stage's output; the last
map is after the final BN + ReLU (`bn` here, torchvision's `norm5`), i.e. what the classifier pools.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.densenet import DenseNet

from cskd.models import Classifier, register_model
from cskd.models.preact_resnet import require_32x32

GROWTH = 32
BLOCKS = (6, 12, 24, 16)
STEM_CHANNELS = 2 * GROWTH  # 64 in both references


def _block_channels(stem: int, growth: int, blocks: tuple[int, ...]) -> tuple[int, ...]:
    """Channels after each dense block, with transitions halving them in between
    (densenet3.py: floor(planes * 0.5); torchvision: planes // 2)."""
    channels, planes = [], stem
    for i, n in enumerate(blocks):
        planes += n * growth
        channels.append(planes)
        if i < len(blocks) - 1:
            planes //= 2
    return tuple(channels)


class _Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)  # new features first, as densenet3.py (torchvision: last)


class _Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class CifarDenseNet(Classifier):
    """The reference's `CIFAR_DenseNet`; submodule names follow densenet3.py (`linear` -> `head`)."""

    stage_reductions = (1, 2, 4, 8)

    def __init__(self, num_classes: int, growth: int = GROWTH, blocks: tuple[int, ...] = BLOCKS):
        super().__init__()
        self.stage_channels = _block_channels(STEM_CHANNELS, growth, blocks)
        self.conv1 = nn.Conv2d(3, STEM_CHANNELS, 3, padding=1, bias=False)
        planes = STEM_CHANNELS
        # Registered in the reference's order (dense1, trans1, dense2, ...), so that under a fixed
        # seed the default initialisation draws the same numbers.
        for i, n in enumerate(blocks, start=1):
            self.add_module(f"dense{i}", nn.Sequential(*[_Bottleneck(planes + j * growth, growth) for j in range(n)]))
            planes += n * growth
            if i < len(blocks):
                self.add_module(f"trans{i}", _Transition(planes, planes // 2))
                planes //= 2
        self.num_blocks = len(blocks)
        self.bn = nn.BatchNorm2d(planes)
        self.head = nn.Linear(planes, num_classes)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        require_32x32(x, "densenet121_bc_cifar")
        out = self.conv1(x)
        maps = []
        for i in range(1, self.num_blocks + 1):
            out = self.get_submodule(f"dense{i}")(out)
            if i < self.num_blocks:
                maps.append(out)
                out = self.get_submodule(f"trans{i}")(out)
        maps.append(F.relu(self.bn(out)))
        return maps

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        # The reference's fixed 4x4 window; the 32x32 input check makes it a global pool.
        return F.avg_pool2d(last_map, 4).flatten(1)


class TorchvisionDenseNet(Classifier):
    """torchvision's `DenseNet`: its `features` Sequential is kept as is (conv0 ... denseblock4,
    norm5) and its `classifier` becomes `head`, so the state_dict keys are torchvision's with
    `classifier.` renamed `head.`; the DenseNet wrapper itself is not kept."""

    stage_reductions = (1, 2, 4, 8)

    def __init__(self, num_classes: int):
        super().__init__()
        net = DenseNet(growth_rate=GROWTH, block_config=BLOCKS, num_init_features=STEM_CHANNELS, num_classes=num_classes)
        self.features = net.features
        self.head = net.classifier
        self.stage_channels = _block_channels(STEM_CHANNELS, GROWTH, BLOCKS)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for name, module in self.features.named_children():
            x = module(x)
            if name.startswith("denseblock"):
                maps.append(x)
        # `x` is now norm5(denseblock4): the last stage map is it after the ReLU of torchvision's
        # forward, replacing the raw denseblock4 output.
        maps[-1] = F.relu(x)
        return maps


@register_model("densenet121_bc_cifar")
def densenet121_bc_cifar(num_classes: int) -> Classifier:
    """DenseNet-BC-121 for 32x32 inputs (reference `CIFAR_DenseNet121`), CS-KD on CIFAR-100/TinyImageNet."""
    return CifarDenseNet(num_classes)


@register_model("densenet121")
def densenet121(num_classes: int) -> Classifier:
    """torchvision DenseNet-121 for 224-px inputs, from scratch (reference `densenet121`), CS-KD fine-grained sets."""
    return TorchvisionDenseNet(num_classes)
