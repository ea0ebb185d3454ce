"""CS-KD-E (Yun et al., CVPR 2020, Sec. 3.4 and Table 6): CS-KD plus sample-wise consistency.

    L = CE(x_aug) + lam * T^2 * KL(P(x'_aug; stop-grad) || P(x_aug)) + lam_e * T^2 * KL(P(x; stop-grad) || P(x_aug))

with P = softmax(logits / T) (`losses.cskd_e_loss`). The paper writes the consistency term with
frozen parameters for x and says only that x_aug comes from the standard augmentation (its fn 6);
here x = `batch.images` (the usual training view) and x_aug = `batch.views[0]`, a second view of
the same images drawn independently, so CE and the class-wise term use x_aug and its same-class
partners x'_aug (`batch.pair_images`), and the consistency term is one-way and per sample.

As in CS-KD (`cskd.methods.cskd`), everything that is only a target goes through the network in its
own forward, in train mode, under no_grad: the partners, and the view x. Each forward's BatchNorm
normalises with its own statistics and updates the running ones (three times per step).
"""
from dataclasses import dataclass

from cskd.batch import Batch, Sampling
from cskd.errors import ConfigError
from cskd.losses import cross_entropy
from cskd.methods.base import Method, StepOutput, register_method
from cskd.methods.cskd import check_class_wise_params, class_wise_term


@dataclass
class CSKDEParams:
    temperature: float = 4.0  # CS-KD's default (alinlab/cs-kd train.py); the paper's grid is {1, 4}
    lam: float = 1.0  # the paper's lambda_cls, CS-KD's default (3 for CUB in the reference README)
    # lambda_E: the paper's main text gives no value; 1 is our choice, weighing the sample-wise term
    # like the class-wise one.
    lam_e: float = 1.0
    exclude_self: bool = False  # as CS-KD: the partner may be the anchor itself (p = 1/class size)


@register_method("cskd_e")
class CSKDE(Method):
    Params = CSKDEParams
    num_views = 2

    @classmethod
    def check_params(cls, params: CSKDEParams) -> None:
        check_class_wise_params(cls.name, params)
        if params.lam_e < 0:
            raise ConfigError(f"config key 'cskd_e.lam_e' must be >= 0, got {params.lam_e}")

    def sampling(self) -> Sampling:
        return Sampling("class_pairs", exclude_self=self.params.exclude_self)

    def loss(self, model, batch: Batch) -> StepOutput:
        p = self.params
        logits = model(batch.views[0])
        ce = cross_entropy(logits, batch.labels)
        cls = class_wise_term(model, logits, batch.pair_images, p.temperature)
        consistency = class_wise_term(model, logits, batch.images, p.temperature)  # same form, the view x as target
        loss = ce + p.lam * cls + p.lam_e * consistency  # == losses.cskd_e_loss, with the terms kept for logging
        return StepOutput(loss, logits, {"ce": ce.detach(), "cls": cls.detach(), "consistency": consistency.detach()})
