"""Method registry: every module in this package defines one method and registers it.

A method is a loss plus what it needs from the batch (see `base.Method`; the batch itself is
`cskd.batch.Batch`); the trainer only calls the interface, so adding a method is adding a file here.
"""
import importlib
import pkgutil

from cskd.methods.base import METHODS, Method, MethodContext, StepOutput, register_method

__all__ = ["METHODS", "Method", "MethodContext", "StepOutput", "register_method"]

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")
