"""Label smoothing + CutMix (PS-KD Table 4, ImageNet): CutMix's label mixing applied to the smoothed labels.

PS-KD does not describe the combination; the natural one is used: each step is cut-mixed as `cutmix`
(same gate, lambda, permutation and box; see cutmix.py), and the loss is
lam * LS(y) + (1 - lam) * LS(y[perm]) with LS as `ls` (its epsilon and convention), i.e. CE against
the area-weighted mix of the two smoothed labels; a step the gate leaves plain is LS(y).
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.losses import label_smoothing_loss
from cskd.methods.base import Method, StepOutput, register_method
from cskd.methods.cutmix import CutMixParams, check_cutmix_params, cut_images, draw_step, mix_criterion
from cskd.methods.ls import LSParams, check_ls_params


@dataclass
class LSCutMixParams(LSParams, CutMixParams):
    pass  # ls's epsilon and convention, cutmix's beta and prob, with their defaults


@register_method("ls_cutmix")
class LSCutMix(Method):
    Params = LSCutMixParams

    @classmethod
    def check_params(cls, params: LSCutMixParams) -> None:
        check_ls_params(cls.name, params)
        check_cutmix_params(cls.name, params)

    def loss(self, model, batch: Batch) -> StepOutput:
        p = self.params
        cut = draw_step(batch.images, p.prob, p.beta)
        logits = model(cut_images(batch.images, cut))
        loss = mix_criterion(lambda y: label_smoothing_loss(logits, y, p.epsilon, p.convention), batch.labels, cut)
        return StepOutput(loss, logits)
