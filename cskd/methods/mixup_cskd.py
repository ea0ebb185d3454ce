"""Mixup + CS-KD (Yun et al., CVPR 2020, Sec. 3.2, Table 3): CS-KD's L_cls on mixed inputs and labels.

The paper says only "applying L_cls to mixed inputs and mixed labels"; the pairing rule is not
given. Here the anchors and their same-class partners are mixed with the SAME
lambda and the SAME permutation: partner i has anchor i's label, so the mixed partner
lam * x'_i + (1 - lam) * x'_perm(i) carries exactly the mixed anchor's mixed label. Loss:
Mixup CE on the mixed anchors + lam_cls * T^2 * KL(p(mixed partner) || p(mixed anchor)), the
partners forwarded as in CS-KD (a separate pass in train mode, under no_grad; see cskd.py).
"""
from dataclasses import dataclass

from cskd.batch import Batch, Sampling
from cskd.losses import mixup_cross_entropy
from cskd.methods.base import StepOutput, register_method
from cskd.methods.cskd import check_class_wise_params, class_wise_term
from cskd.methods.mixup import Mixup, MixupParams, draw_mix, mix


@dataclass
class MixupCSKDParams(MixupParams):
    # CS-KD's T and lambda_cls, with CS-KD's defaults (reference train.py: T=4, lambda=1); the paper
    # does not give the values used for Table 3.
    temperature: float = 4.0
    lam: float = 1.0  # lambda_cls, the weight of L_cls (not Mixup's lambda, which is drawn each step)
    exclude_self: bool = False  # as cskd.exclude_self: the reference may pair a sample with itself


@register_method("mixup_cskd")
class MixupCSKD(Mixup):
    Params = MixupCSKDParams

    @classmethod
    def check_params(cls, params: MixupCSKDParams) -> None:
        super().check_params(params)
        check_class_wise_params(cls.name, params)

    def sampling(self) -> Sampling:
        return Sampling("class_pairs", exclude_self=self.params.exclude_self)

    def loss(self, model, batch: Batch) -> StepOutput:
        lam, perm = draw_mix(len(batch.labels), self.params.alpha, batch.images.device)
        logits = model(mix(batch.images, lam, perm))
        ce = mixup_cross_entropy(logits, batch.labels, batch.labels[perm], lam)
        kl = class_wise_term(model, logits, mix(batch.pair_images, lam, perm), self.params.temperature)
        return StepOutput(ce + self.params.lam * kl, logits, {"ce": ce.detach(), "cls": kl.detach()})
