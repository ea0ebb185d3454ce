"""A frozen teacher for knowledge distillation, loaded from the run dir of a finished cskd run.

The teacher is rebuilt exactly as `cskd.eval` rebuilds a run's model (its saved config's model and
method, weights from `checkpoint.load_weights`, which unpickles tensors only) and is scored the
way evaluation scores it (`head(forward_features(x))`, eval mode). It belongs to the method, not
to the student: it is never saved into the student's checkpoint, never optimised, never wrapped
in DDP. Its identity is the sha256 of its weights file, so a resumed student can refuse a teacher
that changed under it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cskd import rundir
from cskd.checkpoint import load_net_state, load_weights, saved_outputs
from cskd.errors import CskdError, DataError, RunDirError
from cskd.fileio import sha256

FIX = "give the run dir of a finished run, {key}=runs/..."


@dataclass
class Teacher:
    model: nn.Module
    path: str
    which: str  # "final" (checkpoint.pt) or "best" (best.pt)
    sha256: str  # of the weights file
    description: str  # one line for the log

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits, computed as evaluation computes them (eval mode, no gradient)."""
        return self.model.head(self.model.forward_features(x))


def _check_classes(where: str, classes: list[str] | None, outputs: int | None, num_classes: int,
                   names: list[str] | None) -> None:
    """The teacher must predict the student's classes, in the same order."""
    count = len(classes) if classes is not None else outputs
    if count is not None and count != num_classes:
        raise DataError(f"{where} predicts {count} classes but the student's dataset has {num_classes}; give a "
                        f"teacher trained on the student's classes")
    if classes is not None and names is not None and classes != names:
        i = next(i for i, (a, b) in enumerate(zip(classes, names)) if a != b)
        raise DataError(f"{where} names class {i} '{classes[i]}', the student's dataset '{names[i]}'; give a "
                        f"teacher trained on a dataset converted with the same classes")


def check_teacher(run_dir: str, key: str):
    """The saved config and summary of the finished run `run_dir`, or a one-line RunDirError.

    `key` is the config key that named it (e.g. 'kd.teacher'), quoted with the fix in every error."""
    where = f"the teacher {key}={run_dir}"
    if not run_dir.strip():
        raise RunDirError(f"config key '{key}' is empty; {FIX.format(key=key)}")
    path = Path(run_dir)
    if not path.is_dir():
        raise RunDirError(f"{where} is not a directory; {FIX.format(key=key)}")
    try:
        cfg = rundir.read_config(path)
        if not (path / rundir.SUMMARY).is_file():
            raise RunDirError(f"{path} has no {rundir.SUMMARY}: its training has not finished; finish it "
                              f"(python -m cskd.train with out_dir={path}) or {FIX.format(key=key)}")
        return cfg, rundir.read_summary(path)
    except CskdError as e:
        raise type(e)(f"{where}: {e}") from None


def load_teacher(run_dir: str, which: str, key: str, device: torch.device, num_classes: int,
                 classes: list[str] | None) -> Teacher:
    """The teacher of run dir `run_dir` (`which` weights) on `device`, frozen and in eval mode.

    `key` is the config key that named it (e.g. 'kd.teacher'), quoted with the fix in every error;
    `num_classes` and `classes` are the student's (classes: None where its dataset records none)."""
    from cskd.methods import build_net

    where = f"the teacher {key}={run_dir}"
    cfg, summary = check_teacher(run_dir, key)
    path = Path(run_dir)
    try:
        saved = load_weights(path, which)
    except CskdError as e:
        raise type(e)(f"{where}: {e}") from None
    model = build_net(cfg, num_classes)
    _check_classes(where, saved.get("classes"), saved_outputs(model, saved["model"]), num_classes, classes)
    try:
        load_net_state(model, saved["model"], f"{where}: its weights", cfg)
    except DataError as e:
        raise DataError(f"{e}; {FIX.format(key=key)}") from None
    model.to(device).eval().requires_grad_(False)
    sha = sha256(path / (rundir.CHECKPOINT if which == "final" else rundir.BEST))
    err = summary.final["top1_err"] if which == "final" else summary.best["top1_err"]
    description = (f"teacher {path}: {cfg.method} / {cfg.model}, {which} weights (epoch {saved['epoch'] + 1}, "
                   f"test err {err:.2f}%), sha256 {sha[:12]}")
    return Teacher(model, str(path), which, sha, description)
