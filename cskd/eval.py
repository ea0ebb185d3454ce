"""Evaluate a model on a test split: `python -m cskd.eval RUN_DIR [--checkpoint final|best] ...`.

`evaluate` is what the trainer calls after every epoch; the command line re-evaluates a saved run
(its final or best weights) on its own test split or on another prepared dataset with the same
classes, on one process or under `torchrun`, and prints and writes the full metric set.

Evaluation is honest about which model it scores: every rank evaluates its shard with rank 0's
buffers (the checkpoint's BatchNorm statistics), and the forward pass runs in float32 whatever
`amp` says for training, so bf16 rounding cannot tie logits or blur R@1's features.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from cskd import distributed as D
from cskd import rundir
from cskd.batch import Shard
from cskd.checkpoint import load_net_state, load_weights, saved_outputs
from cskd.dataset import DatasetInfo, open_dataset
from cskd.errors import ConfigError, CskdError, DataError
from cskd.fileio import nearest_existing, write_json
from cskd.loaders import EvalBatches, eval_loader, loader_spec
from cskd.metrics import METRIC_NAMES, classification_metrics
from cskd.progress import log


FEATURE_CLASSES, FEATURES_PER_CLASS = 10, 100


def feature_subset(labels: torch.Tensor, num_classes: int, classes: int = FEATURE_CLASSES,
                   per_class: int = FEATURES_PER_CLASS) -> torch.Tensor:
    """The test positions whose penultimate features a run keeps (for t-SNE, CS-KD Fig. 3): the first
    `per_class` samples, in test-set order, of `classes` evenly spaced classes (`i * C // classes`,
    so a hierarchy's domains are all sampled). A rule of the labels alone: every run on a dataset
    keeps the same samples."""
    chosen = sorted({i * num_classes // classes for i in range(min(classes, num_classes))})
    positions = [torch.nonzero(labels == c).flatten()[:per_class] for c in chosen]
    return torch.sort(torch.cat(positions)).values


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: EvalBatches, env: D.DistEnv, ece_bins: int = 20,
             superclass_of_class: list[str] | None = None) -> tuple[dict | None, dict | None, dict | None]:
    """(metrics, reliability bins, outputs) of the whole split on rank 0, (None, None, None) on other ranks;
    outputs = {"logits": (N, C) float32, "labels": (N,)} in dataset order, and the penultimate
    "features" (M, D) of the test positions "feature_index" (`feature_subset`).

    `model` is the bare model (not its DDP wrapper), a `cskd.models.Classifier`. Shards are gathered
    and put back in dataset order, so each sample counts once whatever the number of ranks.
    `superclass_of_class` (meta.json's, where the dataset records a hierarchy) adds the hierarchy
    accuracies (`cskd.metrics.hierarchical_accuracy`)."""
    D.broadcast_buffers(model)
    model.eval()
    logits, features, labels, index = [], [], [], []
    with torch.autocast(env.device.type, enabled=False):
        for images, y, idx in loader:
            f = model.forward_features(images).float()
            logits.append(model.head(f).float())
            features.append(f)
            labels.append(y)
            index.append(idx)
    logits, features, labels, index = (D.all_gather_rows(torch.cat(part)) for part in (logits, features, labels, index))
    if not env.is_main:
        return None, None, None
    order = index.argsort()  # dataset order, whatever the number of ranks
    logits, labels, features = logits[order], labels[order], features[order]
    metrics, bins = classification_metrics(logits, labels, features, ece_bins, superclass_of_class)
    kept = feature_subset(labels, logits.shape[1])
    return metrics | {"samples": len(labels)}, bins, {"logits": logits, "labels": labels, "features": features[kept],
                                                      "feature_index": kept}


def _check_classes(dataset: DatasetInfo, classes: list[str] | None, num_outputs: int) -> None:
    """Refuse a test set whose classes are not the ones the model was trained on."""
    if dataset.num_classes != num_outputs:
        raise DataError(f"{dataset.path} has {dataset.num_classes} classes but the model has {num_outputs} outputs; "
                        f"evaluate on a dataset with the classes of the run's training set")
    names = dataset.meta.get("classes")
    if classes is not None and names is not None and names != classes:
        diff = next((i for i, (a, b) in enumerate(zip(names, classes)) if a != b), None)
        what = (f"names class {diff} '{names[diff]}', the run's training set '{classes[diff]}'" if diff is not None
                else f"lists {len(names)} class names, the run's training set {len(classes)}")
        raise DataError(f"{dataset.path} {what}; the labels would not match: use a dataset converted with the "
                        f"same classes")


def run_eval(run_dir: str, which: str = "final", data: str | None = None, ece_bins: int | None = None,
             device: str = "auto") -> dict | None:
    """Evaluate a run dir's weights on a test split; the result dict on rank 0, None on other ranks."""
    cfg = rundir.read_config(run_dir)
    if which not in ("final", "best"):
        raise ConfigError(f"--checkpoint must be final or best, got {which!r}")
    if ece_bins is not None and ece_bins < 1:
        raise ConfigError(f"--ece-bins must be >= 1, got {ece_bins}")
    with D.session(device) as env:
        D.configure_torch(cfg.threads, cfg.deterministic)
        return _evaluate_run(Path(run_dir), cfg, env, which, data, ece_bins or cfg.ece_bins)


def _evaluate_run(run_dir: Path, cfg, env: D.DistEnv, which: str, data: str | None, ece_bins: int) -> dict | None:
    from cskd.methods import build_net

    saved = load_weights(run_dir, which)
    try:
        dataset = open_dataset(data or cfg.data.path)
    except DataError as e:
        if data:
            raise
        raise DataError(f"{e} (this is the run's data.path; pass --data DIR where the dataset lives here)") from None
    model = build_net(cfg, dataset.num_classes)
    _check_classes(dataset, saved.get("classes"), saved_outputs(model, saved["model"]) or dataset.num_classes)
    load_net_state(model, saved["model"], f"the weights in {run_dir}", cfg)
    spec = loader_spec(cfg, dataset, world_size=env.world_size, device=env.device)
    model = model.to(env.device, memory_format=torch.channels_last if spec.channels_last else torch.contiguous_format)
    metrics, _, _ = evaluate(model, eval_loader(spec, Shard(env.rank, env.world_size)), env, ece_bins,
                             dataset.meta.get("superclass_of_class"))
    if not env.is_main:
        return None
    return {"run_dir": str(run_dir), "checkpoint": which, "epoch": saved["epoch"], "data": str(dataset.path),
            "dataset": dataset.name, "split": "test", "ece_bins": ece_bins, "world_size": env.world_size,
            "device": D.device_name(env), **metrics}


def check_out_path(out: str) -> None:
    """Refuse an --out that cannot become a file: a directory, a device or pipe (an atomic write would
    replace it: /dev/stdout), or a path below something that is not a writable directory."""
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name, e.g. --out {path / 'eval.json'}")
    if (path.exists() or path.is_symlink()) and not path.is_file():
        raise ConfigError(f"--out {out} is not a regular file (a device, pipe or dangling link), and --out "
                          f"replaces its file; give a file name (the result is printed anyway)")
    parent = nearest_existing(path.parent)
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, not a directory; give a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {out}: {parent} is not writable; give a path in a directory you may write")


def _write_result(out: str, result: dict) -> None:
    """Write the result atomically; a failure is one line (the result was already printed)."""
    try:
        write_json(out, result)
    except OSError as e:
        raise ConfigError(f"could not write --out {out} ({e.strerror or type(e).__name__}); the result is printed "
                          f"above; give another --out") from None


def format_result(result: dict) -> str:
    lines = [f"{result['run_dir']} ({result['checkpoint']}, epoch {result['epoch'] + 1}) on {result['data']} "
             f"test: {result['samples']} samples, {result['device']}"]
    lines += [f"  {name:<9} {result[name]:.4f}" for name in METRIC_NAMES]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cskd.eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a run dir (config.yaml plus checkpoint.pt / best.pt)")
    parser.add_argument("--checkpoint", choices=("final", "best"), default="final",
                        help="final: checkpoint.pt (last finished epoch); best: best.pt (lowest test top1_err)")
    parser.add_argument("--data", help="another prepared dataset with the same classes (default: the run's data.path)")
    parser.add_argument("--ece-bins", type=int, help="ECE bins (default: the run's ece_bins)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA if visible (each torchrun rank its local GPU), else CPU")
    parser.add_argument("--out", help="also write the result as JSON (atomically) to this file")
    args = parser.parse_args(argv)
    try:
        if args.out:
            check_out_path(args.out)  # before the evaluation, which takes a while
        result = run_eval(args.run_dir, args.checkpoint, args.data, args.ece_bins, args.device)
        if result is not None:
            log(format_result(result))
            if args.out:
                _write_result(args.out, result)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
