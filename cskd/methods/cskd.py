"""CS-KD (Yun et al., CVPR 2020): CE on anchors + lam * T^2 * KL(p(x') || p(x)) to same-class partners.

Reference semantics (alinlab/cs-kd train.py): the partners go through the network in a *separate*
forward pass, in train mode, under no_grad. Their BatchNorm statistics are therefore the partner
half's own, and the running statistics are updated twice per step; fusing both halves into one
forward would change this, so it is not done.
"""
from dataclasses import dataclass

import torch

from cskd.batch import Batch, Sampling
from cskd.errors import ConfigError
from cskd.losses import cross_entropy, kd_kl_div
from cskd.methods.base import Method, StepOutput, register_method


@dataclass
class CSKDParams:
    temperature: float = 4.0
    lam: float = 1.0  # the paper's lambda_cls; it uses 3 for CUB, see its supplement for the others
    # The reference draws the partner uniformly within the class *with* the anchor itself among the
    # candidates (p = 1/class size). True excludes it (classes of one sample still pair with themselves).
    exclude_self: bool = False


def check_class_wise_params(name: str, params) -> None:
    """CS-KD's T and lambda_cls in method `name`'s section (every method that adds the class-wise term)."""
    if not params.temperature > 0:
        raise ConfigError(f"config key '{name}.temperature' must be > 0, got {params.temperature}; "
                          f"e.g. {name}.temperature=4")
    if params.lam < 0:
        raise ConfigError(f"config key '{name}.lam' must be >= 0, got {params.lam}; e.g. {name}.lam=1")


def class_wise_term(model, logits: torch.Tensor, partner_images: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_cls = T^2 * KL(p(x') || p(x)) of the anchors' `logits` to their same-class partners, the
    partners forwarded as the reference does: a separate pass, in train mode, under no_grad."""
    with torch.no_grad():
        pair_logits = model(partner_images)
    return kd_kl_div(logits, pair_logits, temperature)


@register_method("cskd")
class CSKD(Method):
    Params = CSKDParams

    @classmethod
    def check_params(cls, params: CSKDParams) -> None:
        check_class_wise_params(cls.name, params)

    def sampling(self) -> Sampling:
        return Sampling("class_pairs", exclude_self=self.params.exclude_self)

    def loss(self, model, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        ce = cross_entropy(logits, batch.labels)
        kl = class_wise_term(model, logits, batch.pair_images, self.params.temperature)
        loss = ce + self.params.lam * kl  # == losses.cskd_loss, with the terms kept for logging
        return StepOutput(loss, logits, {"ce": ce.detach(), "cls": kl.detach()})
