"""Model registry. A model module registers a builder with `@register_model("name")`.

Every model is a `Classifier`: `forward_features(x)` gives the pooled penultimate features
(used by R@1 and by methods that need embeddings) and `head` maps them to logits, so a method
can replace the classifier (AdaCos, Virtual-softmax) or add heads without touching the trainer.
"""
import importlib
import pkgutil
from typing import Callable

import torch
from torch import nn

MODELS: dict[str, Callable[..., "Classifier"]] = {}


class Classifier(nn.Module):
    """Base class: subclasses define `forward_features` and a `head` module."""

    head: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


def register_model(name: str):
    """Decorator: make `builder(num_classes) -> Classifier` available as config `model: name`."""

    def wrap(builder):
        MODELS[name] = builder
        return builder

    return wrap


def build_model(name: str, num_classes: int) -> Classifier:
    """Instantiate a registered model (a ConfigError for unknown names is raised by the config)."""
    return MODELS[name](num_classes)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
