"""CS-KD + CutMix (PS-KD Table 4, ImageNet): CutMix on the anchors, CS-KD's L_cls to partners cut the same way.

PS-KD does not describe the combination; it is built as Mixup + CS-KD is (mixup_cskd.py): the anchors
are cut-mixed as `cutmix` (same gate, lambda, permutation and box; see cutmix.py), and their
same-class partners get the SAME box from the SAME permutation of the partners. Partner i has anchor
i's label, so the cut partner carries exactly the cut anchor's area-weighted label. Loss:
lam * CE(y) + (1 - lam) * CE(y[perm]) on the cut anchors + lam_cls * T^2 * KL(p(cut partner) ||
p(cut anchor)), the partners forwarded as in CS-KD (a separate pass in train mode, under no_grad;
see cskd.py). A step the gate leaves plain is plain CS-KD.
"""
from dataclasses import dataclass

from cskd.batch import Batch, Sampling
from cskd.losses import cross_entropy
from cskd.methods.base import Method, StepOutput, register_method
from cskd.methods.cskd import CSKDParams, check_class_wise_params, class_wise_term
from cskd.methods.cutmix import CutMixParams, check_cutmix_params, cut_images, draw_step, mix_criterion


@dataclass
class CSKDCutMixParams(CSKDParams, CutMixParams):
    pass  # cskd's temperature, lam and exclude_self, cutmix's beta and prob, with their defaults


@register_method("cskd_cutmix")
class CSKDCutMix(Method):
    Params = CSKDCutMixParams

    @classmethod
    def check_params(cls, params: CSKDCutMixParams) -> None:
        check_class_wise_params(cls.name, params)
        check_cutmix_params(cls.name, params)

    def sampling(self) -> Sampling:
        return Sampling("class_pairs", exclude_self=self.params.exclude_self)

    def loss(self, model, batch: Batch) -> StepOutput:
        p = self.params
        cut = draw_step(batch.images, p.prob, p.beta)
        logits = model(cut_images(batch.images, cut))
        ce = mix_criterion(lambda y: cross_entropy(logits, y), batch.labels, cut)
        kl = class_wise_term(model, logits, cut_images(batch.pair_images, cut), p.temperature)
        return StepOutput(ce + p.lam * kl, logits, {"ce": ce.detach(), "cls": kl.detach()})
