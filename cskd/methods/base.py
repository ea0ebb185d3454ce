"""The method interface: what a training objective asks of the data and how it computes its loss.

The interface already carries what the later methods of the CS-KD and PS-KD papers need:
- `sampling()`: random order, or class pairs (each anchor followed by a same-class partner);
- `num_views`: extra augmented views of the same anchors (DDGSD, CS-KD-E) in `Batch.views`;
- `Batch.index`: each sample's position in the dataset, for per-sample state (PS-KD's table);
- `bind(ctx)`: one-time setup with the device, class count, dataset size and rank (a KD teacher,
  a prediction table), and `state_dict`/`load_state_dict` so that state is checkpointed;
- `prepare_model(model)`: replace the classifier or add auxiliary heads (AdaCos, Virtual-softmax,
  BYOT); the returned module is what gets optimised and evaluated;
- `loss(model, batch)` may mix inputs itself (Mixup) with torch's RNG, which is seeded per rank
  and checkpointed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from cskd.batch import Batch, Sampling

METHODS: dict[str, type["Method"]] = {}


@dataclass
class StepOutput:
    """A method's result for one step: the loss to minimise and the anchors' logits (train accuracy).

    `terms` holds detached 0-dim tensors of loss components, averaged per epoch into metrics.jsonl.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class MethodContext:
    device: torch.device
    num_classes: int
    num_train: int
    rank: int
    world_size: int
    epochs: int
    classes: list[str] | None = None  # the training set's class names (meta.json), where it records them
    batch_per_rank: int = 0  # anchors per rank in a full step: no step of any rank holds more


@dataclass
class NoParams:
    pass


class Method:
    """Base class of a training objective. Subclasses set `Params` and implement `loss`."""

    Params: ClassVar[type] = NoParams
    num_views: ClassVar[int] = 1

    def __init__(self, params, num_classes: int):
        self.params = params
        self.num_classes = num_classes

    @classmethod
    def check_params(cls, params) -> None:
        """Raise ConfigError for out-of-range hyperparameters (called during config validation)."""

    @classmethod
    def check_inputs(cls, params) -> None:
        """Raise a CskdError if a file the method reads (a KD teacher's run dir) is missing or unusable.

        Called by the trainer before the run dir is written, so a mistyped path leaves nothing behind;
        unlike `check_params` it is not part of config validation (a grid is resolved before its
        teachers are trained)."""

    def sampling(self) -> Sampling:
        return Sampling()

    def bind(self, ctx: MethodContext) -> None:
        """One-time setup once the device and data are known."""

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def loss(self, model: nn.Module, batch: Batch) -> StepOutput:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def register_method(name: str):
    """Class decorator: make a Method subclass available as config `method: name`."""

    def wrap(cls):
        cls.name = name
        METHODS[name] = cls
        return cls

    return wrap
