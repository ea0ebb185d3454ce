"""PS-KD (Kim et al., ICCV 2021): train on (1 - alpha_t) * y + alpha_t * P_{t-1}(x), the model's own past predictions.

alpha_t = alpha_T * (epoch + 1) / epochs (`losses.pskd_alpha`); the loss is the soft-target
cross-entropy `losses.pskd_loss`. In epoch 0 there is no past model and the target is the one-hot
label (lgcnsai/PS-KD-Pytorch main.py), so epoch 0 is plain CE. Where P_{t-1} comes from:

- `pskd.teacher: table` (the official code's way, used for its CIFAR-100 results): the softmax of
  every training sample's forward pass in the previous epoch (train mode, that epoch's augmentation),
  one row per sample. The official code keeps it in float32 on the CPU, a full copy per process,
  and fills it row by row in Python after an all_gather each step (5.1 GB per rank on ImageNet).
  Here it is one tensor on the device in `pskd.table_dtype` (float16 by default: 2.6 GB per rank
  for ImageNet's 1.28 M x 1000), every rank writes every rank's rows of the step with one
  all_gather and one indexed copy, and it is checkpointed with the run, so a resume continues from
  exactly the saved rows. A row never written yet (all of epoch 0) reads as the one-hot label.
- `pskd.teacher: model` (the paper's Sec. 3.2 way for ImageNet and translation): a frozen copy of
  the network as it was when the epoch started, i.e. at the end of the previous one, forwarded on
  the current batch under no_grad: the teacher sees this epoch's augmentation and nothing is
  stored per sample. The copy runs in eval mode, a choice the paper leaves open: a past model used
  as a predictor, its BatchNorm using the running statistics that the previous epoch's evaluation
  scored, so a sample's target does not depend on the other samples of its batch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cskd import distributed as D
from cskd.batch import Batch
from cskd.errors import ConfigError, RunDirError
from cskd.losses import pskd_alpha, pskd_loss
from cskd.methods.base import Method, MethodContext, StepOutput, register_method
from cskd.progress import log

TEACHERS = ("table", "model")
TABLE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class PSKDParams:
    # alpha_T: 0.8 on CIFAR-100 (PS-KD Sec. 4.1, tuned on a held-out 10% with ResNet-18); 0.7 does
    # better for ResNeXt-29 (footnote 5); ImageNet's value is only in the supplement (the configs say).
    alpha_T: float = 0.8
    teacher: str = "table"  # table: last epoch's stored predictions; model: last epoch's network
    # table storage: float16 keeps probabilities to ~3 significant digits (down to 6e-8); float32 is
    # the official code's exact storage at twice the memory.
    table_dtype: str = "float16"


class PredictionTable:
    """Every training sample's last softmax on the device, identical on every rank.

    Row `num_samples` is a scratch row: each rank pads its step to the longest a rank can have,
    so the all_gather has one shape on every rank and no host sync; pads write the scratch row."""

    def __init__(self, num_samples: int, num_classes: int, dtype: torch.dtype, device: torch.device,
                 batch_per_rank: int):
        self.num_samples = num_samples
        self.probs = torch.zeros(num_samples + 1, num_classes, dtype=dtype, device=device)
        self.written = torch.zeros(num_samples + 1, dtype=torch.bool, device=device)
        self.rows_per_rank = batch_per_rank

    @property
    def nbytes(self) -> int:
        return self.probs.nbytes + self.written.nbytes

    def lookup(self, index: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The stored probabilities of these samples in float32, the one-hot label where none is stored."""
        one_hot = F.one_hot(labels, self.probs.shape[1]).float()
        return torch.where(self.written[index, None], self.probs[index].float(), one_hot)

    def update(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Store `probs` (this rank's rows) and every other rank's rows of the same step."""
        pad = self.rows_per_rank - len(index)
        if pad < 0:
            raise ValueError(f"a step of {len(index)} samples on one rank; the table was sized for "
                             f"{self.rows_per_rank}")
        index = F.pad(index, (0, pad), value=self.num_samples)
        probs = F.pad(probs.to(self.probs.dtype), (0, 0, 0, pad))
        index, probs = D.all_gather_equal(index), D.all_gather_equal(probs)
        self.probs[index] = probs  # a permutation order holds each sample once per step: no write races
        self.written[index] = True

    def state_dict(self) -> dict:
        return {"probs": self.probs[:-1].cpu(), "written": self.written[:-1].cpu()}

    def load_state_dict(self, state: dict) -> None:
        probs, written = state.get("probs"), state.get("written")
        if not (isinstance(probs, torch.Tensor) and probs.shape == self.probs[:-1].shape
                and isinstance(written, torch.Tensor) and written.shape == self.written[:-1].shape):
            raise RunDirError(f"the checkpoint's PS-KD prediction table is not one of {self.num_samples} samples x "
                              f"{self.probs.shape[1]} classes; it belongs to another run: pass --force to start over")
        self.probs[:-1].copy_(probs)
        self.written[:-1].copy_(written)


class EpochStartTeacher:
    """The network as it was when the current epoch started, frozen, in eval mode."""

    def __init__(self):
        self.model: nn.Module | None = None
        self.epoch = -1

    @torch.no_grad()
    def probs(self, model: nn.Module, images: torch.Tensor, epoch: int) -> torch.Tensor:
        """Its softmax on `images`, float32; `model` is the network being trained (or its DDP wrapper)."""
        if self.epoch != epoch:  # the first step of an epoch: no update of this epoch has happened yet
            net = getattr(model, "module", model)  # the network itself, not its DDP wrapper
            if self.model is None:
                self.model = copy.deepcopy(net).requires_grad_(False)
            else:
                self.model.load_state_dict(net.state_dict())
            self.model.eval()
            self.epoch = epoch
        return F.softmax(self.model(images).float(), dim=1)


def split_in_halves(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A random split of a batch's positions: (ceil(n/2) positions, the other floor(n/2)), drawn from
    torch's CPU RNG (seeded per rank and checkpointed by the trainer; no device sync)."""
    order = torch.randperm(n).to(device)
    return order[:n - n // 2], order[n - n // 2:]


@register_method("pskd")
class PSKD(Method):
    Params = PSKDParams

    def __init__(self, params: PSKDParams, num_classes: int):
        super().__init__(params, num_classes)
        self.table: PredictionTable | None = None
        self.snapshot = EpochStartTeacher() if params.teacher == "model" else None
        self.epochs = 1

    @classmethod
    def check_params(cls, params: PSKDParams) -> None:
        if not 0 <= params.alpha_T <= 1:
            raise ConfigError(f"config key '{cls.name}.alpha_T' must be in [0, 1] (the final weight of the past "
                              f"predictions), got {params.alpha_T}; e.g. {cls.name}.alpha_T=0.8")
        if params.teacher not in TEACHERS:
            raise ConfigError(f"config key '{cls.name}.teacher' must be one of {', '.join(TEACHERS)}, got "
                              f"{params.teacher!r}")
        if params.table_dtype not in TABLE_DTYPES:
            raise ConfigError(f"config key '{cls.name}.table_dtype' must be one of {', '.join(TABLE_DTYPES)}, got "
                              f"{params.table_dtype!r}")

    def bind(self, ctx: MethodContext) -> None:
        self.epochs = ctx.epochs
        if self.params.teacher != "table":
            return
        self.table = PredictionTable(ctx.num_train, ctx.num_classes, TABLE_DTYPES[self.params.table_dtype],
                                     ctx.device, ctx.batch_per_rank)
        if ctx.rank == 0:
            log(f"{self.name}: prediction table {ctx.num_train} x {ctx.num_classes} {self.params.table_dtype} on "
                f"{ctx.device}: {self.table.nbytes / 2**20:.1f} MiB per rank")

    def alpha(self, epoch: int) -> float:
        return pskd_alpha(self.params.alpha_T, epoch, self.epochs)

    def past_predictions(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
                         epoch: int) -> torch.Tensor:
        """P_{t-1}(x) of these samples, float32: the one-hot label in epoch 0."""
        if epoch == 0:
            return F.one_hot(labels, self.num_classes).float()
        if self.snapshot is not None:
            return self.snapshot.probs(model, images, epoch)
        return self.table.lookup(index, labels)

    def remember(self, index: torch.Tensor, logits: torch.Tensor) -> None:
        """Store these samples' predictions for the next epoch (table teacher only)."""
        if self.table is not None:
            self.table.update(index, F.softmax(logits.detach().float(), dim=1))

    def loss(self, model, batch: Batch) -> StepOutput:
        # read before this step overwrites the rows
        past = self.past_predictions(model, batch.images, batch.labels, batch.index, batch.epoch)
        logits = model(batch.images)
        self.remember(batch.index, logits)
        return StepOutput(pskd_loss(logits, batch.labels, past, self.alpha(batch.epoch)), logits)

    def loss_half_augmented(self, model, batch: Batch, augment) -> StepOutput:
        """PS-KD on a random half of the batch and an augmentation on the other half (PS-KD Sec. 4.1:
        "PS-KD is applied to the half of the data in a randomly shuffled mini-batch, and Cutout or
        CutMix is performed on another half"), both halves in one forward pass, so BatchNorm sees
        the whole batch as it would without the split.

        `augment(images, labels) -> (augmented images, loss of their logits)` handles the other half;
        the result is the batch mean of the per-sample losses. Only the PS-KD half's predictions
        refresh the table: the other half's are of altered images (a row not refreshed keeps its
        older prediction, or reads as the one-hot label until it has one)."""
        n = len(batch.labels)
        if n < 2:
            return self.loss(model, batch)
        plain, other = split_in_halves(n, batch.images.device)
        images, labels, index = batch.images[plain], batch.labels[plain], batch.index[plain]
        past = self.past_predictions(model, images, labels, index, batch.epoch)
        augmented, augmented_loss = augment(batch.images[other], batch.labels[other])
        logits = model(torch.cat([images, augmented]))
        k = len(plain)
        self.remember(index, logits[:k])
        pskd_term = pskd_loss(logits[:k], labels, past, self.alpha(batch.epoch))
        augmented_term = augmented_loss(logits[k:])
        loss = (k * pskd_term + (n - k) * augmented_term) / n
        in_batch_order = logits[torch.argsort(torch.cat([plain, other]))]  # train accuracy scores against batch.labels
        return StepOutput(loss, in_batch_order, {"pskd": pskd_term.detach(), "aug": augmented_term.detach()})

    def state_dict(self) -> dict:
        return {"table": self.table.state_dict()} if self.table is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.table is not None:
            if "table" not in state:
                raise RunDirError("the checkpoint holds no PS-KD prediction table; pass --force to start the run over")
            self.table.load_state_dict(state["table"])
