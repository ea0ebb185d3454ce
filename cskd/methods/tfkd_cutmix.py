"""TF-KD + CutMix (PS-KD Table 4, ImageNet): CutMix's label mixing applied to the TF-KD criterion.

PS-KD does not describe the combination; CutMix's own rule for a label-wise criterion L is used,
lam * L(x~, y) + (1 - lam) * L(x~, y[perm]) on the cut image x~ (cut as `cutmix`: same gate, lambda,
permutation and box; see cutmix.py), with L = tfkd's (1 - alpha) * CE + alpha * soft term:
- mode self: the teacher scores the cut image x~ the student sees (as kd scores the student's own
  input); its term does not depend on the label, so the loss is (1 - alpha) * (lam * CE(y) +
  (1 - lam) * CE(y[perm])) + alpha * T^2 * multiplier * KLDivLoss()(student, teacher on x~);
- mode reg: the hand-designed teacher of each label, weighted by area: (1 - alpha) * mixed CE +
  alpha * (lam * KL_reg(y) + (1 - lam) * KL_reg(y[perm])), i.e. the TF-KD_reg loss of each label
  mixed as CutMix mixes CE (the KL is not linear in its target, so this is not the KL to a mixed
  hand-designed teacher; its gradient is, the two differing by the targets' entropies, constants).
A step the gate leaves plain is plain tfkd.
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.losses import cross_entropy
from cskd.methods.base import StepOutput, register_method
from cskd.methods.cutmix import CutMixParams, check_cutmix_params, cut_images, draw_step, mix_criterion
from cskd.methods.tfkd import TFKD, TFKDParams


@dataclass
class TFKDCutMixParams(TFKDParams, CutMixParams):
    pass  # tfkd's keys (mode, teacher, self_*, reg_*), cutmix's beta and prob, with their defaults


@register_method("tfkd_cutmix")
class TFKDCutMix(TFKD):
    Params = TFKDCutMixParams

    @classmethod
    def check_params(cls, params: TFKDCutMixParams) -> None:
        super().check_params(params)
        check_cutmix_params(cls.name, params)

    def loss(self, model, batch: Batch) -> StepOutput:
        cut = draw_step(batch.images, self.params.prob, self.params.beta)
        images = cut_images(batch.images, cut)
        logits = model(images)
        ce = mix_criterion(lambda y: cross_entropy(logits, y), batch.labels, cut)
        if self.params.mode == "self":  # the teacher's term does not depend on the label: scored once
            soft = self.soft_term(logits, images, batch.labels)
        else:
            soft = mix_criterion(lambda y: self.soft_term(logits, images, y), batch.labels, cut)
        loss = (1 - self.alpha) * ce + self.alpha * soft
        return StepOutput(loss, logits, {"ce": ce.detach(), "kd": soft.detach()})
