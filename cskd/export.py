"""Export a run's weights for torchvision: `python -m cskd.export RUN_DIR --to torchvision OUT.pth`.

OUT.pth is a plain state dict that the torchvision model printed with it loads strictly, e.g.
`torchvision.models.resnet152(num_classes=1000).load_state_dict(torch.load("OUT.pth", weights_only=True))`,
so a trained backbone can go into torchvision's detection or segmentation models. Only models built
from torchvision's classes qualify (`resnet*`, `resnext101_32x4d`, `densenet121`); the keys are
ours with `head.` renamed `fc.` (ResNets) or `classifier.` (DenseNet). Runs whose method changed the
network (AdaCos's and Virtual-softmax's bias-free heads, BYOT's wrapper with auxiliary heads) are
refused: their weights do not fit torchvision's model.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from cskd import rundir
from cskd.checkpoint import load_weights, save
from cskd.errors import CskdError, DataError
from cskd.fileio import nearest_existing
from cskd.progress import log


class ExportError(CskdError):
    pass


@dataclass(frozen=True)
class Target:
    build: Callable[..., torch.nn.Module]  # num_classes=C -> the torchvision model
    call: str  # the same call as text, for the user; {C} is the class count
    head: str  # torchvision's name of our `head`


_RESNET = "torchvision.models.resnet"
TARGETS = {
    "resnet10": Target(partial(ResNet, BasicBlock, [1, 1, 1, 1]),  # torchvision has no resnet10 constructor
                       f"{_RESNET}.ResNet({_RESNET}.BasicBlock, [1, 1, 1, 1], num_classes={{C}})", "fc"),
    "resnet18": Target(torchvision.models.resnet18, "torchvision.models.resnet18(num_classes={C})", "fc"),
    "resnet50": Target(torchvision.models.resnet50, "torchvision.models.resnet50(num_classes={C})", "fc"),
    "resnet101": Target(torchvision.models.resnet101, "torchvision.models.resnet101(num_classes={C})", "fc"),
    "resnet152": Target(torchvision.models.resnet152, "torchvision.models.resnet152(num_classes={C})", "fc"),
    # torchvision has resnext50_32x4d and resnext101_32x8d/64x4d, not 32x4d: the class, as cskd builds it.
    "resnext101_32x4d": Target(partial(ResNet, Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=4),
                               f"{_RESNET}.ResNet({_RESNET}.Bottleneck, [3, 4, 23, 3], groups=32, "
                               f"width_per_group=4, num_classes={{C}})", "fc"),
    "densenet121": Target(torchvision.models.densenet121, "torchvision.models.densenet121(num_classes={C})",
                          "classifier"),
}


def _shapes(state: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _difference(got: dict[str, tuple], want: dict[str, tuple]) -> str:
    """How the weights `got` differ from `want` (names -> shapes), in a few words."""
    def some(keys: list[str]) -> str:
        return f"{keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")

    extra, missing = [k for k in got if k not in want], [k for k in want if k not in got]
    parts = ([f"unexpected {some(extra)}"] if extra else []) + ([f"missing {some(missing)}"] if missing else [])
    if parts:
        return ", ".join(parts)
    k = next(k for k in want if got[k] != want[k])
    return f"{k!r} is {list(got[k])}, not {list(want[k])}"


def _check_method_keeps_model(cfg) -> None:
    """Refuse a method whose `prepare_model` changes the model's weights (names or shapes): its
    run's weights cannot be torchvision's. Built on the meta device: shapes only, no memory."""
    from cskd.methods import build_net
    from cskd.models import build_model

    with torch.device("meta"):
        net, plain = _shapes(build_net(cfg, 3).state_dict()), _shapes(build_model(cfg.model, 3).state_dict())
    if net != plain:
        raise ExportError(f"method '{cfg.method}' changes {cfg.model}'s weights ({_difference(net, plain)}), so "
                          f"they do not fit torchvision's {cfg.model}; only runs of methods that keep the model as "
                          f"it is (e.g. ce, cskd) can be exported")


def check_out_path(out: str) -> None:
    """Refuse an OUT that cannot become a file (a directory, a device) or would replace a run's file."""
    path = Path(out)
    if path.is_dir():
        raise ExportError(f"OUT {out} is a directory; give a file name, e.g. {path / 'model.pth'}")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise ExportError(f"OUT {out} is not a regular file (a device, pipe or dangling link); give a file name")
    if path.resolve().name in rundir.ARTIFACTS and (path.resolve().parent / rundir.CONFIG).is_file():
        raise ExportError(f"OUT {out} is a run dir's own {path.name}; give another file name")
    parent = nearest_existing(path.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"OUT {out}: {parent} is not a writable directory; give a path in a directory you may write")


def export_torchvision(run_dir: str, which: str, out: str) -> dict:
    """Write the run's `which` (final/best) weights to `out` as torchvision's state dict; what was written."""
    cfg = rundir.read_config(run_dir)
    target = TARGETS.get(cfg.model)
    if target is None:
        raise ExportError(f"model '{cfg.model}' is not a torchvision architecture (exportable: "
                          f"{', '.join(TARGETS)}); its weights load into cskd.models.build_model('{cfg.model}', C)")
    _check_method_keeps_model(cfg)
    check_out_path(out)
    saved = load_weights(run_dir, which)
    state = saved["model"]
    head = state.get("head.weight")
    if not (isinstance(head, torch.Tensor) and head.dim() == 2):
        raise DataError(f"the weights in {run_dir} have no 2-D head.weight: they are not {cfg.model}'s")
    num_classes = head.shape[0]
    exported = {(target.head + k[4:] if k.startswith("head.") else k): v.contiguous() for k, v in state.items()}
    with torch.device("meta"):
        want = _shapes(target.build(num_classes=num_classes).state_dict())
    if (got := _shapes(exported)) != want:
        raise DataError(f"the weights in {run_dir} do not fit {cfg.model} for {num_classes} classes "
                        f"({_difference(got, want)} in torchvision's names)")
    save(out, exported)
    return {"run_dir": str(run_dir), "checkpoint": which, "epoch": saved["epoch"], "arch": cfg.model,
            "num_classes": num_classes, "out": str(out), "torchvision": target.call.format(C=num_classes)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cskd.export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run dir (config.yaml plus checkpoint.pt / best.pt)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="final: checkpoint.pt (last finished epoch); best: best.pt (lowest test top1_err)")
    parser.add_argument("--to", choices=("torchvision",), required=True, help="the format to write")
    parser.add_argument("out", metavar="OUT", help="the state dict file to write (atomically; replaces OUT)")
    args = parser.parse_args(argv)
    try:
        info = export_torchvision(args.run_dir, args.checkpoint, args.out)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    log(f"wrote {info['out']}: {info['arch']}, {info['num_classes']} classes, {info['checkpoint']} weights of "
        f"{info['run_dir']} (epoch {info['epoch'] + 1})")
    log(f"load with: model = {info['torchvision']}; model.load_state_dict(torch.load({info['out']!r}, "
        f"weights_only=True))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
