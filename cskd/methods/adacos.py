"""AdaCos (Zhang et al., CVPR 2019): cosine logits with an adaptive scale, s * cos(theta).

CS-KD uses the implementation 4uiiurz1/pytorch-adacos [CS-KD fn 5]; this follows its `metrics.py`
at 64e1415 (the version with `label=None`): bias-free normalised weights (Xavier-uniform initial
values), no hyperparameters, s0 = sqrt(2) * ln(C - 1), and per training batch a new scale from the
batch's cosines (`cskd.losses.adacos_scale`) that is applied to that same batch. Its margin `m` is
unused there (older versions of the file applied an ArcFace margin and took the median over all angles).

The scale lives in the head as a buffer, so it is checkpointed with the model and evaluation uses
the last training scale; the reference's `label=None` path returns unscaled cosines, which would
leave NLL and ECE to a temperature of 1. Under DDP every rank's new scale is averaged over the
ranks, so all of them hold the same s (DDP also broadcasts rank 0's buffers before each forward).
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from cskd import distributed as D
from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import adacos_scale, cross_entropy
from cskd.methods.base import Method, StepOutput, register_method


class CosineHead(nn.Module):
    """head(f) = scale * cos(f, W_j): a bias-free classifier on normalised features and weights."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)  # as the reference
        self.register_buffer("scale", torch.tensor(math.sqrt(2) * math.log(num_classes - 1)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cos = F.linear(F.normalize(features), F.normalize(self.weight))
        # A copy: the step updates the buffer in place before backward, which needs the value used here.
        return cos * self.scale.clone()


@register_method("adacos")
class AdaCos(Method):
    def prepare_model(self, model: nn.Module) -> nn.Module:
        if self.num_classes < 3:  # s0 = sqrt(2) * ln(1) = 0 and the scale never leaves 0
            raise ConfigError(f"method=adacos needs at least 3 classes (its scale starts at sqrt(2)*ln(C-1)), "
                              f"the data has {self.num_classes}; use another method")
        model.head = CosineHead(model.head.in_features, self.num_classes)
        return model

    def loss(self, model, batch: Batch) -> StepOutput:
        head = getattr(model, "module", model).head  # the bare net's head, under DDP too
        logits = model(batch.images)  # s_old * cos
        with torch.no_grad():
            s_old = head.scale.clone()
            s_new = D.all_reduce_mean(adacos_scale(logits.float() / s_old, batch.labels, s_old))
            head.scale.copy_(s_new)
        # The reference scales this batch's cosines by the scale computed from them: s_new * cos.
        logits = logits.float() * (s_new / s_old)
        return StepOutput(cross_entropy(logits, batch.labels), logits, {"scale": s_new.detach()})
