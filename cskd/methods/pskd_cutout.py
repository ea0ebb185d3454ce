"""PS-KD + Cutout (Kim et al., ICCV 2021, Sec. 4.1, Table 2): PS-KD on a random half of each batch,
Cutout on the other half.

The Cutout half gets one `cutout.size`-pixel hole per image (`cskd.methods.cutout`, 8 in the
paper) and the plain cross-entropy on its labels; the split and the table refresh are
`PSKD.loss_half_augmented`'s.
"""
from dataclasses import dataclass

from cskd.batch import Batch
from cskd.losses import cross_entropy
from cskd.methods.base import StepOutput, register_method
from cskd.methods.cutout import check_cutout_size, cutout, draw_centres
from cskd.methods.pskd import PSKD, PSKDParams


@dataclass
class PSKDCutoutParams(PSKDParams):
    size: int = 8  # side of the square hole: 8 px on CIFAR-100, PS-KD Sec. 4.1


@register_method("pskd_cutout")
class PSKDCutout(PSKD):
    Params = PSKDCutoutParams

    @classmethod
    def check_params(cls, params: PSKDCutoutParams) -> None:
        super().check_params(params)
        check_cutout_size(cls.name, params.size)

    def loss(self, model, batch: Batch) -> StepOutput:
        def with_holes(images, labels):
            centres = draw_centres(len(labels), images.shape[-2], images.shape[-1])
            return cutout(images, self.params.size, centres), lambda logits: cross_entropy(logits, labels)

        return self.loss_half_augmented(model, batch, with_holes)
