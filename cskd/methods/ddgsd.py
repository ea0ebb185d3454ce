"""DDGSD (Xu & Liu, AAAI 2019, "Data-distortion guided self-distillation"), a CS-KD Table 2 baseline.

Each image comes as two independently augmented views (`batch.images` and `batch.views[0]`); one
network learns consistent posteriors and feature distributions across them:

    L = CE(x1) + CE(x2) + kl_weight * T^2 * (KL(p2 || p1) + KL(p1 || p2)) + mmd_weight * MMD^2(f1, f2)

with p = softmax(logits / T) and f the penultimate (pooled) features (`losses.ddgsd_loss`). There is
no official code, and the CS-KD paper only names it (re-implemented, its Table 2), so where the
formulation leaves a choice we state ours:
- MMD: linear kernel, so MMD^2 = ||mean(f1) - mean(f2)||^2 over the batch (`losses.mmd_linear`).
  Self-KD-Lib's re-implementation instead penalises 5e-4 * (mean(f1) - mean(f2))^2 with the means
  over the batch *and* the feature dimensions, a single scalar; ours compares every dimension.
- KL: each direction treats the other view as a fixed target (detached), as Self-KD-Lib does (and
  deep mutual learning): view 1 is pulled towards view 2 and view 2 towards view 1, but no gradient
  flows through a view's role as a target.
- CE: the sum over the two views (each view is a full training sample); Self-KD-Lib takes half the
  mean over both, i.e. (CE1 + CE2) / 4.
- Both views go through the network in one forward (the two concatenated, as Self-KD-Lib does):
  BatchNorm normalises with statistics of the 2B images of both views together and updates its
  running statistics once per step, and under DDP everything comes from one call of the model.
The anchors' logits returned for the training accuracy are those of the first view.
"""
from dataclasses import dataclass

import torch

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import cross_entropy, kd_kl_div, mmd_linear
from cskd.methods.base import Method, StepOutput, register_method


@dataclass
class DDGSDParams:
    temperature: float = 4.0  # Self-KD-Lib's DDGSD (DistillKL(T=4)); T = 1 is the plain-softmax KL
    kl_weight: float = 1.0  # Self-KD-Lib: each KL direction with weight 1
    # Self-KD-Lib's 5e-4, there on the squared difference of the scalar feature means (see above),
    # which is at most 1/D of ours, so 5e-4 weighs the feature term more here than there.
    mmd_weight: float = 5e-4


@register_method("ddgsd")
class DDGSD(Method):
    Params = DDGSDParams
    num_views = 2

    @classmethod
    def check_params(cls, params: DDGSDParams) -> None:
        if not params.temperature > 0:
            raise ConfigError(f"config key 'ddgsd.temperature' must be > 0, got {params.temperature}")
        if params.kl_weight < 0:
            raise ConfigError(f"config key 'ddgsd.kl_weight' must be >= 0, got {params.kl_weight}")
        if params.mmd_weight < 0:
            raise ConfigError(f"config key 'ddgsd.mmd_weight' must be >= 0, got {params.mmd_weight}")

    def loss(self, model, batch: Batch) -> StepOutput:
        p = self.params
        n = len(batch.labels)
        logits, features = model(torch.cat([batch.images, batch.views[0]]), with_features=True)
        l1, l2, f1, f2 = logits[:n], logits[n:], features[:n], features[n:]
        ce = cross_entropy(l1, batch.labels) + cross_entropy(l2, batch.labels)
        kl = kd_kl_div(l1, l2, p.temperature) + kd_kl_div(l2, l1, p.temperature)
        mmd = mmd_linear(f1, f2)
        loss = ce + p.kl_weight * kl + p.mmd_weight * mmd  # == losses.ddgsd_loss, with the terms kept for logging
        return StepOutput(loss, l1, {"ce": ce.detach(), "kl": kl.detach(), "mmd": mmd.detach()})
