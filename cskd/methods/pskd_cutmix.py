"""PS-KD + CutMix (Kim et al., ICCV 2021, Sec. 4.1, Tables 2 and 4): PS-KD on a random half of each
batch, CutMix on the other half.

The CutMix half is mixed within itself as CutMix mixes a batch (clovaai/CutMix-PyTorch: one
lambda ~ Beta(beta, beta), one box and one permutation per step, lambda corrected to the pasted
area; every step, as the paper applies CutMix to its whole half) and scored with the mixed
cross-entropy. The split, the CutMix draws and the table refresh are `PSKD.loss_half_augmented`'s
and `cskd.methods.cutmix`'s.
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import mixup_cross_entropy
from cskd.methods.base import StepOutput, register_method
from cskd.methods.cutmix import draw_cutmix, paste_box
from cskd.methods.pskd import PSKD, PSKDParams


@dataclass
class PSKDCutMixParams(PSKDParams):
    beta: float = 1.0  # CutMix's Beta(beta, beta): 1, PS-KD Sec. 4.1


@register_method("pskd_cutmix")
class PSKDCutMix(PSKD):
    Params = PSKDCutMixParams

    @classmethod
    def check_params(cls, params: PSKDCutMixParams) -> None:
        super().check_params(params)
        if not params.beta > 0:
            raise ConfigError(f"config key '{cls.name}.beta' must be > 0 (lambda ~ Beta(beta, beta)), got "
                              f"{params.beta}; e.g. {cls.name}.beta=1")

    def loss(self, model, batch: Batch) -> StepOutput:
        def cutmix(images, labels):
            lam, perm, box = draw_cutmix(len(labels), self.params.beta, images.shape[-2], images.shape[-1],
                                         images.device)
            return paste_box(images, perm, box), lambda logits: mixup_cross_entropy(logits, labels, labels[perm], lam)

        return self.loss_half_augmented(model, batch, cutmix)
