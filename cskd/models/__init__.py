"""Model registry. A model module registers a builder with `@register_model("name")`.

Every model is a `Classifier`: `forward_features(x)` gives the pooled penultimate features
(used by R@1 and by methods that need embeddings) and `head` maps them to logits, so a method
can replace the classifier (AdaCos, Virtual-softmax) or add heads without touching the trainer.
"""
import importlib
import pkgutil
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

MODELS: dict[str, Callable[..., "Classifier"]] = {}


class Classifier(nn.Module):
    """Base class of every model: a body of stages, global pooling, and a `head` on the features.

    Subclasses define `stage_outputs(x)` (the feature map after each stage, first to last) and set
    `stage_channels` / `stage_reductions` (each map's channels, and its downsampling relative to the
    first stage's map), which is what BYOT's auxiliary heads read; `pool` turns the last map into
    the penultimate features. A method may replace `head` (AdaCos, Virtual-softmax) or wrap the
    model; evaluation only ever calls `forward_features` and `head`.
    """

    head: nn.Module
    stage_channels: tuple[int, ...] = ()
    stage_reductions: tuple[int, ...] = ()

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def pool(self, last_map: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(last_map, 1).flatten(1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage_outputs(x)[-1])

    def forward(self, x: torch.Tensor, with_features: bool = False, with_stages: bool = False):
        """Logits; or (logits, features[, stage maps]) for methods whose loss needs them.

        One call returns all of it, so under DDP everything a loss uses comes from one forward of
        the wrapped module."""
        if not (with_features or with_stages):
            return self.head(self.forward_features(x))
        maps = self.stage_outputs(x)
        features = self.pool(maps[-1])
        logits = self.head(features)
        return (logits, features, maps) if with_stages else (logits, features)


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
