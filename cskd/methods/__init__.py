"""Method registry: every module in this package defines one method and registers it.

A method is a loss plus what it needs from the batch (see `base.Method`; the batch itself is
`cskd.batch.Batch`); the trainer only calls the interface, so adding a method is adding a file here.
"""
import importlib
import pkgutil

from torch import nn

from cskd.methods.base import METHODS, Method, MethodContext, StepOutput, register_method
from cskd.models import build_model

__all__ = ["METHODS", "Method", "MethodContext", "StepOutput", "build_net", "register_method"]


def build_net(cfg, num_classes: int) -> nn.Module:
    """The network a run's config defines, untrained: `cfg.model` prepared by `cfg.method` (a replaced
    head, BYOT's auxiliary heads), as a saved run's weights expect it (`cskd.eval`, a KD teacher)."""
    return METHODS[cfg.method](cfg.method_params, num_classes).prepare_model(build_model(cfg.model, num_classes))

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
