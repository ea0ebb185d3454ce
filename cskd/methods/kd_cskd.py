"""KD + CS-KD (Yun et al., CVPR 2020, Sec. 3.2, Table 4): distil from a teacher and from same-class partners.

"We combine our method with KD to learn dark knowledge from the teacher and itself simultaneously":
kd's loss on the anchors (see kd.py) + lam * T^2 * KL(p(x') || p(x)), x' a same-class partner
forwarded as in CS-KD (a separate pass in train mode, under no_grad; see cskd.py). One temperature
serves both terms (the paper writes a single T).
"""
from dataclasses import dataclass

from cskd.batch import Batch, Sampling
from cskd.errors import ConfigError
from cskd.methods.base import StepOutput, register_method
from cskd.methods.cskd import class_wise_term
from cskd.methods.kd import KD, KDParams


@dataclass
class KDCSKDParams(KDParams):
    lam: float = 1.0  # lambda_cls, CS-KD's default (reference train.py); the paper does not give Table 4's
    exclude_self: bool = False  # as cskd.exclude_self: the reference may pair a sample with itself


@register_method("kd_cskd")
class KDCSKD(KD):
    Params = KDCSKDParams

    @classmethod
    def check_params(cls, params: KDCSKDParams) -> None:
        super().check_params(params)
        if params.lam < 0:
            raise ConfigError(f"config key '{cls.name}.lam' must be >= 0, got {params.lam}; e.g. {cls.name}.lam=1")

    def sampling(self) -> Sampling:
        return Sampling("class_pairs", exclude_self=self.params.exclude_self)

    def loss(self, model, batch: Batch) -> StepOutput:
        logits = model(batch.images)
        loss, terms = self.distill(logits, batch)
        cls = class_wise_term(model, logits, batch.pair_images, self.params.temperature)
        return StepOutput(loss + self.params.lam * cls, logits, {**terms, "cls": cls.detach()})
