"""Mixup (Zhang et al., ICLR 2018): train on convex combinations of sample pairs and of their labels.

One lambda ~ Beta(alpha, alpha) and one random permutation per step, as the authors' code
(facebookresearch/mixup-cifar10 `mixup_data`): x~ = lam * x + (1 - lam) * x[perm], loss
lam * CE(y) + (1 - lam) * CE(y[perm]). Both are drawn from torch's global CPU generator, which the
trainer seeds per rank (seed + rank) and checkpoints, so a resumed run draws what an uninterrupted
one would; drawing on the CPU also spares the device a sync per step. Under DDP each rank mixes its
own share of the batch with its own lambda.

The logits returned for train accuracy are the mixed batch's, scored against the first labels y:
the train error of a Mixup run is therefore only indicative.
"""
from dataclasses import dataclass

import torch

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import mixup_cross_entropy
from cskd.methods.base import Method, StepOutput, register_method


def draw_mix(n: int, alpha: float, device: torch.device) -> tuple[float, torch.Tensor]:
    """One step's (lambda ~ Beta(alpha, alpha), random permutation of n on `device`), from torch's CPU RNG."""
    concentration = torch.tensor(float(alpha))
    lam = float(torch.distributions.Beta(concentration, concentration).sample())
    return lam, torch.randperm(n).to(device)


def mix(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """lam * x + (1 - lam) * x[perm]."""
    return lam * x + (1 - lam) * x[perm]


@dataclass
class MixupParams:
    # Beta(alpha, alpha) of the mixing weight. The CS-KD paper (Sec. 3.2, Table 3) does not state its
    # alpha; 1.0 (lambda uniform on [0, 1]) is the default of the Mixup authors' CIFAR code
    # (facebookresearch/mixup-cifar10 `--alpha`).
    alpha: float = 1.0


@register_method("mixup")
class Mixup(Method):
    Params = MixupParams

    @classmethod
    def check_params(cls, params: MixupParams) -> None:
        if not params.alpha > 0:
            raise ConfigError(f"config key '{cls.name}.alpha' must be > 0 (lambda ~ Beta(alpha, alpha)), got "
                              f"{params.alpha}; e.g. {cls.name}.alpha=1")

    def loss(self, model, batch: Batch) -> StepOutput:
        lam, perm = draw_mix(len(batch.labels), self.params.alpha, batch.images.device)
        logits = model(mix(batch.images, lam, perm))
        return StepOutput(mixup_cross_entropy(logits, batch.labels, batch.labels[perm], lam), logits)
