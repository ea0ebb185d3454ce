"""BYOT (Zhang et al., ICCV 2019, "Be Your Own Teacher"), a CS-KD Table 2 baseline.

The reference is luanyunteng/pytorch-be-your-own-teacher (`models/resnet.py`, `train.py`). After every
stage but the last, a training-only auxiliary head: a bottleneck (1x1 conv to C/4 channels, k x k
conv with stride k, 1x1 conv to C = the final feature width, BN-ReLU after each), global average
pooling, and a linear classifier. k = (last stage's reduction) / (this stage's), 8/4/2 on a 4-stage
ResNet as in the reference, so every branch ends at the last stage's resolution. Where k = 1 (a
stage that does not downsample before the last, as the second of `small_cnn`) the middle conv is a
3x3 stride-1 conv (padding 1), keeping a spatial receptive field like the other branches.
Departures: the convs have no bias (each feeds a BatchNorm, which makes it redundant).

Loss (`losses.byot_loss`), with the reductions of the reference's `train.py`:
    (1 - alpha) * sum over all heads of CE  (batch mean each)
  + alpha * sum over aux heads of T^2 * KL(softmax(final / T) || softmax(aux / T))  (batch mean)
  + beta * sum over aux heads of the masked L2 hint between pooled features, summed over batch and dims
The final logits and features are targets only (detached). The reference's soft cross-entropy
differs from this KL by the target's entropy, a constant: same gradients, a smaller logged value.
The hint's sum over the batch (beta = 1e-6 is sized for it) makes its weight grow with the batch size.

Evaluation scores the final head only: the wrapper's `forward_features`/`head` are the network's.
The paper's heads also have attention modules, which the reference (and this) leaves out.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import byot_hint_loss, cross_entropy, kd_kl_div
from cskd.methods.base import Method, StepOutput, register_method
from cskd.models import Classifier


@dataclass
class BYOTParams:
    temperature: float = 3.0  # the reference's --temperature
    alpha: float = 0.1  # the reference's --alpha: weight of the distillation terms, 1 - alpha on the CEs
    beta: float = 1e-6  # the reference's --beta: weight of the (summed) feature hints


class AuxHead(nn.Module):
    """One BYOT branch: bottleneck to the final width and resolution, global pooling, a linear classifier."""

    def __init__(self, c_in: int, c_out: int, k: int, num_classes: int):
        super().__init__()
        mid = c_out // 4  # the reference's branchBottleNeck width
        middle = nn.Conv2d(mid, mid, k, stride=k, bias=False) if k > 1 else nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.body = nn.Sequential(
            nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            middle, nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
        )
        self.fc = nn.Linear(c_out, num_classes)
        for m in self.body:
            if isinstance(m, nn.Conv2d):  # the reference's init of every conv
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, stage_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled features) of one stage's map."""
        features = F.adaptive_avg_pool2d(self.body(stage_map), 1).flatten(1)
        return self.fc(features), features


class BYOTNet(Classifier):
    """A network with BYOT's auxiliary heads; evaluation (`forward_features`, `head`) sees the network only.

    `forward(x, with_aux=True)` returns (logits, features, aux logits, aux features) from one call,
    so under DDP every parameter the loss uses comes from one forward of the wrapped module.
    """

    def __init__(self, net: Classifier, num_classes: int):
        super().__init__()
        channels, reductions = tuple(net.stage_channels), tuple(net.stage_reductions)
        if len(channels) < 2 or len(reductions) != len(channels):
            raise ConfigError(f"method 'byot' needs a model with stage outputs (stage_channels, stage_reductions) of "
                              f"2 or more stages; {type(net).__name__} has {len(channels)}: choose another model")
        if any(reductions[-1] % r for r in reductions[:-1]):
            raise ConfigError(f"method 'byot' needs each stage's reduction to divide the last's; "
                              f"{type(net).__name__} has stage_reductions={reductions}: choose another model")
        self.net = net
        self.stage_channels, self.stage_reductions = channels, reductions
        width = net.head.in_features
        self.aux = nn.ModuleList(AuxHead(c, width, reductions[-1] // r, num_classes)
                                 for c, r in zip(channels[:-1], reductions[:-1]))

    @property
    def head(self) -> nn.Module:
        return self.net.head

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.stage_outputs(x)

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        return self.net.pool(last_map)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)

    def forward(self, x: torch.Tensor, with_features: bool = False, with_stages: bool = False,
                with_aux: bool = False):
        """As `Classifier.forward`; with `with_aux`: (logits, features, [aux logits], [aux features])."""
        if not with_aux:
            return self.net(x, with_features=with_features, with_stages=with_stages)
        maps = self.net.stage_outputs(x)
        features = self.net.pool(maps[-1])
        aux = [head(m) for head, m in zip(self.aux, maps[:-1])]
        return self.net.head(features), features, [a[0] for a in aux], [a[1] for a in aux]


@register_method("byot")
class BYOT(Method):
    Params = BYOTParams

    @classmethod
    def check_params(cls, params: BYOTParams) -> None:
        if not params.temperature > 0:
            raise ConfigError(f"config key 'byot.temperature' must be > 0, got {params.temperature}")
        if not 0 <= params.alpha <= 1:
            raise ConfigError(f"config key 'byot.alpha' must be in [0, 1], got {params.alpha}")
        if params.beta < 0:
            raise ConfigError(f"config key 'byot.beta' must be >= 0, got {params.beta}")

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return BYOTNet(model, self.num_classes)

    def loss(self, model, batch: Batch) -> StepOutput:
        p = self.params
        logits, features, aux_logits, aux_features = model(batch.images, with_aux=True)
        ce = cross_entropy(logits, batch.labels) + sum(cross_entropy(a, batch.labels) for a in aux_logits)
        kd = sum(kd_kl_div(a, logits, p.temperature) for a in aux_logits)
        hint = sum(byot_hint_loss(f, features) for f in aux_features)
        loss = (1 - p.alpha) * ce + p.alpha * kd + p.beta * hint  # == losses.byot_loss, with the terms kept for logging
        return StepOutput(loss, logits, {"ce": ce.detach(), "kd": kd.detach(), "hint": hint.detach()})
