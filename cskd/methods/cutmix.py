"""CutMix (Yun et al., ICCV 2019): paste a box from another sample of the batch, mix the labels by area.

As clovaai/CutMix-PyTorch `train.py`: each step draws r ~ U[0, 1); if r < prob it draws lambda ~
Beta(beta, beta), a random permutation and a box (`rand_bbox`: sides floor(H * sqrt(1 - lambda)) and
floor(W * sqrt(1 - lambda)), each halved then doubled, centre uniform over the image, clipped at the
borders), pastes x[perm]'s box into x, sets lambda to 1 - (box area) / (H * W), and the loss is
lambda * CE(y) + (1 - lambda) * CE(y[perm]); otherwise the step is plain CE. Every draw comes from
torch's global CPU generator, seeded per rank and checkpointed by the trainer (see mixup.py);
under DDP each rank draws its own gate and box for its share of the batch.

A box is (top, left, bottom, right) in pixels: rows top..bottom-1 and columns left..right-1 of NCHW
images (the reference's (bbx1, bby1, bbx2, bby2) on dims 2 and 3).

As for Mixup, train accuracy scores the mixed batch against the first labels y: only indicative.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cskd.batch import Batch
from cskd.errors import ConfigError
from cskd.losses import cross_entropy, mixup_cross_entropy
from cskd.methods.base import Method, StepOutput, register_method

Box = tuple[int, int, int, int]  # (top, left, bottom, right)
Cut = tuple[float, torch.Tensor, Box]  # (lambda, permutation, box): what `draw_cutmix` returns


def draw_gate(prob: float) -> bool:
    """Whether this step is cut-mixed: r ~ U[0, 1) < prob (the reference's `np.random.rand(1) < cutmix_prob`),
    r drawn at every step from torch's CPU generator."""
    return float(torch.rand(())) < prob


def rand_box(height: int, width: int, lam: float) -> Box:
    """The reference's `rand_bbox`: a box of about (1 - lam) of the image, centre uniform (CPU generator)."""
    cut = math.sqrt(1.0 - lam)
    half_h, half_w = int(height * cut) // 2, int(width * cut) // 2
    row, col = int(torch.randint(height, ())), int(torch.randint(width, ()))
    return max(row - half_h, 0), max(col - half_w, 0), min(row + half_h, height), min(col + half_w, width)


def box_lambda(box: Box, height: int, width: int) -> float:
    """1 - the box's share of the image: the weight of the first labels (the reference's adjusted lambda)."""
    top, left, bottom, right = box
    return 1.0 - (bottom - top) * (right - left) / (height * width)


def draw_cutmix(n: int, beta: float, height: int, width: int, device: torch.device) -> Cut:
    """One CutMix draw for n images of height x width: (lambda adjusted to the box's area, a random
    permutation of n on `device`, the box), from torch's global CPU generator."""
    concentration = torch.tensor(float(beta))
    lam = float(torch.distributions.Beta(concentration, concentration).sample())
    perm = torch.randperm(n)
    box = rand_box(height, width, lam)
    return box_lambda(box, height, width), perm.to(device), box


def paste_box(images: torch.Tensor, perm: torch.Tensor, box: Box) -> torch.Tensor:
    """A copy of `images` (N, C, H, W) whose `box` holds images[perm]'s box; `images` is left as it is."""
    top, left, bottom, right = box
    out = images.clone()
    out[:, :, top:bottom, left:right] = images[perm, :, top:bottom, left:right]
    return out


def draw_step(images: torch.Tensor, prob: float, beta: float) -> Cut | None:
    """This step's CutMix of `images`: the gate, then (if it passes) `draw_cutmix`; None: a plain step."""
    if not draw_gate(prob):
        return None
    n, _, height, width = images.shape
    return draw_cutmix(n, beta, height, width, images.device)


def cut_images(images: torch.Tensor, cut: Cut | None) -> torch.Tensor:
    """`images` with the step's box pasted (unchanged on a plain step)."""
    return images if cut is None else paste_box(images, cut[1], cut[2])


def mix_criterion(criterion: Callable[[torch.Tensor], torch.Tensor], labels: torch.Tensor,
                  cut: Cut | None) -> torch.Tensor:
    """lam * criterion(labels) + (1 - lam) * criterion(labels[perm]): the reference's label mixing for
    any label-wise criterion; criterion(labels) on a plain step."""
    if cut is None:
        return criterion(labels)
    lam, perm, _ = cut
    return lam * criterion(labels) + (1 - lam) * criterion(labels[perm])


@dataclass
class CutMixParams:
    # Beta(beta, beta) of the box area: 1.0, PS-KD §4.1 and the reference's commands (CIFAR and ImageNet).
    beta: float = 1.0
    # The chance that a step is cut-mixed: 0.5, the reference's CIFAR command (README); its ImageNet
    # command uses 1.0. PS-KD does not state it.
    prob: float = 0.5


def check_cutmix_params(name: str, params: CutMixParams) -> None:
    """CutMix's keys of method `name`'s section (shared by the methods that add CutMix)."""
    if not params.beta > 0:
        raise ConfigError(f"config key '{name}.beta' must be > 0 (lambda ~ Beta(beta, beta)), got {params.beta}; "
                          f"e.g. {name}.beta=1")
    if not 0 <= params.prob <= 1:
        raise ConfigError(f"config key '{name}.prob' must be in [0, 1] (the chance a step is cut-mixed), got "
                          f"{params.prob}; e.g. {name}.prob=0.5")


@register_method("cutmix")
class CutMix(Method):
    Params = CutMixParams

    @classmethod
    def check_params(cls, params: CutMixParams) -> None:
        check_cutmix_params(cls.name, params)

    def loss(self, model, batch: Batch) -> StepOutput:
        cut = draw_step(batch.images, self.params.prob, self.params.beta)
        logits = model(cut_images(batch.images, cut))
        if cut is None:
            return StepOutput(cross_entropy(logits, batch.labels), logits)
        lam, perm, _ = cut
        return StepOutput(mixup_cross_entropy(logits, batch.labels, batch.labels[perm], lam), logits)
