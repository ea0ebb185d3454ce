"""What the papers' figures (launch/figures.py) need from a grid's runs: the runs grouped by dataset and model
(`find_groups`), the runs a figure compares (`Group.methods`, `pair`), their files loaded and checked (test logits,
features, reliability bins, per-sample records, test images), and the `Drawing` a figure function returns or the
`Unavailable` reason it raises.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cskd import rundir
from cskd.ensemble import FILES, load_test_logits
from cskd.errors import CskdError, DataError, RunDirError
from cskd.metrics import reliability_bins
from cskd.rundir import Summary
from cskd.sample_log import read_correct, read_probabilities

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

DEFAULT_BINS = 20  # cskd's default ece_bins, for a run whose summary keeps no bins to count


def collect():
    """launch.collect, imported at call time: collect imports launch.figures (and so this module) for its report,
    and a module-level import either way round would find the other half-initialised."""
    from launch import collect as module

    return module


class Unavailable(CskdError):
    """Why a group's runs do not allow a figure (one line; the figure is skipped, the others are made)."""


@dataclass
class Drawing:
    """A figure drawn but not saved: its title, caption, matplotlib Figure and the numbers it plots."""
    title: str
    caption: str
    figure: MplFigure
    numbers: dict


@dataclass
class Group:
    """The finished runs of one dataset and model (`model` None: of one dataset, all models), with the
    choices of the command (epoch, --samples) and what has been loaded from their run dirs."""
    dataset: str
    model: str | None
    runs: list[Summary]
    epoch: str = "final"
    samples: list[int] | None = None
    loaded: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return self.dataset if self.model is None else f"{self.dataset}/{self.model}"

    def methods(self, wanted) -> dict[str, dict[int, Summary]]:
        """{method: {seed: run}} for each method of `wanted` that the group has, in `wanted`'s order, of one
        label per method: the method's own name if a label has it, else the first in the tables' order."""
        label_order = collect()._label_order
        chosen = {}
        for method in wanted:
            labels = {r.label for r in self.runs if r.method == method}
            if labels:
                label = method if method in labels else min(labels, key=label_order)
                chosen[method] = {}
                for r in sorted(self.runs, key=lambda r: str(r.path)):  # a seed run twice: the first path
                    if r.method == method and r.label == label:
                        chosen[method].setdefault(r.seed, r)
        return chosen

    def logits(self, run: Summary) -> dict:
        """The run's test logits file of the group's epoch, checked (`cskd.ensemble.load_test_logits`), loaded
        once; a file that cannot be used raises its one-line error each time it is asked for."""
        key = run.path.parent
        if not (key / FILES[self.epoch]).is_file():
            raise RunDirError(f"{key} has no {FILES[self.epoch]}: it finished before cskd kept test logits; train it "
                              f"again (--force) to draw this figure")
        if key not in self.loaded:
            try:
                self.loaded[key] = load_test_logits(key, self.epoch, run.raw)
            except CskdError as e:
                self.loaded[key] = e
        if isinstance(self.loaded[key], CskdError):
            raise self.loaded[key]
        return self.loaded[key]


def find_groups(results: list[Summary], scope: str, epoch: str = "final", samples: list[int] | None = None
                ) -> list[Group]:
    """The runs grouped by (dataset, model) (`scope` "model") or by dataset (`scope` "dataset"), sorted."""
    keyed: dict[tuple, list[Summary]] = {}
    for r in results:
        keyed.setdefault((r.dataset, r.model if scope == "model" else None), []).append(r)
    return [Group(d, m, runs, epoch, samples) for (d, m), runs in sorted(keyed.items(), key=lambda kv: str(kv[0]))]


def found(chosen: dict[str, dict[int, Summary]]) -> str:
    """The methods `chosen` and their seeds, for a reason ("ce (seeds 0, 1); cskd (seed 0)"), or "none"."""
    return "; ".join(f"{m} (seed{'s' * (len(s) > 1)} {', '.join(map(str, sorted(s)))})" for m, s in chosen.items()
                     ) or "none"


def common_seed(chosen: dict[str, dict[int, Summary]]) -> int | None:
    """The lowest seed every method of `chosen` has, or None."""
    seeds = set.intersection(*(set(s) for s in chosen.values()))
    return min(seeds) if seeds else None


def runs_text(runs: dict[str, Summary], seed: int) -> str:
    """The runs of a figure for its caption: "seed 0 of ce and cskd"."""
    return f"seed {seed} of {' and '.join(r.label for r in runs.values())}"


def pair(group: Group, methods: tuple[str, str], what: str = "") -> tuple[int, dict[str, Summary]] | None:
    """(lowest common seed, {method: run}) of both `methods`; None if the group has neither (the figure is not
    for this grid), Unavailable if it has one, or no seed in common."""
    chosen = group.methods(methods)
    if not chosen:
        return None
    seed = common_seed(chosen) if len(chosen) == len(methods) else None
    if seed is None:
        raise Unavailable(f"needs runs of {' and '.join(methods)} with a seed in common{what}; found {found(chosen)}")
    return seed, {m: chosen[m][seed] for m in methods}


def pair_with_logits(group: Group, methods: tuple[str, str]) -> tuple[int, dict[str, Summary], dict[str, dict]] | None:
    """`pair`'s (seed, {method: run}) with {method: its checked logits file} (`paired_logits`); None as `pair`."""
    picked = pair(group, methods)
    if picked is None:
        return None
    seed, runs = picked
    return seed, runs, paired_logits(group, runs)


def paired_logits(group: Group, runs: dict[str, Summary]) -> dict[str, dict]:
    """Each run's logits file, checked to be of the same test set (same labels in the same order)."""
    saved = {m: group.logits(r) for m, r in runs.items()}
    (a, first), *others = saved.items()
    for b, other in others:
        if not torch.equal(first["labels"], other["labels"]):
            raise DataError(f"{runs[a].path.parent} and {runs[b].path.parent} were tested on different test sets "
                            f"(their test labels differ); compare runs of one conversion of {group.dataset}")
    return saved


def listed(saved: dict, key: str, count: int, path: Path) -> list[str] | None:
    """saved[key], a list of `count` names, or None if the file records none; RunDirError if malformed."""
    value = saved.get(key)
    if value is not None and not (isinstance(value, list) and len(value) == count
                                  and all(isinstance(v, str) for v in value)):
        raise RunDirError(f"{path}: '{key}' is not a list of {count} names; train the run again (--force)")
    return value


def class_names(saved: dict, path: Path) -> list[str]:
    """The class names the logits file records, else "class <c>" for each class; RunDirError if malformed."""
    count = saved["logits"].shape[1]
    return listed(saved, "classes", count, path) or [f"class {c}" for c in range(count)]


def chosen_samples(group: Group, count: int, default: list[int], rule: str) -> tuple[list[int], str]:
    """The test positions to show (--samples, else `default`), and the rule that chose them for the caption."""
    if group.samples is None:
        if not default:
            raise Unavailable(f"no test sample fits the rule ({rule})")
        return default, f"chosen by rule: {rule}"
    beyond = [i for i in group.samples if i >= count]
    if beyond:
        raise Unavailable(f"--samples {beyond[0]} is beyond the {count} test samples (positions 0..{count - 1})")
    return group.samples, "chosen with --samples"


def features(saved: dict, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(features (M, D) float32, their test positions (M,)) if the logits file keeps them; RunDirError if
    malformed."""
    kept, index = saved.get("features"), saved.get("feature_index")
    if kept is None:
        return None
    n = len(saved["labels"])
    if not (isinstance(kept, torch.Tensor) and kept.dim() == 2 and kept.is_floating_point()
            and isinstance(index, torch.Tensor) and index.dim() == 1 and len(index) == len(kept)
            and not index.is_floating_point() and (not len(index) or 0 <= index.min() <= index.max() < n)):
        raise RunDirError(f"{path}: 'features'/'feature_index' are not (M, D) features of M test positions; train "
                          f"the run again (--force)")
    return kept.float().numpy(), index.long().numpy()


def calibration(group: Group, seeds: dict[int, Summary]) -> tuple[dict, float, int] | None:
    """(bins pooled over the seeds, mean ECE % over them, number of seeds) at the group's epoch; None if no seed
    has bins. Final: summary.json's bins; best: binned from best_test_logits.pt as the trainer bins (same count)."""
    runs = [r for r in seeds.values() if r.reliability or group.epoch == "best"]
    if not runs:
        return None
    bins = []
    for r in runs:
        if group.epoch == "final":
            bins.append(r.reliability)
            continue
        saved = group.logits(r)
        confidence, predicted = torch.softmax(saved["logits"].double(), dim=1).max(dim=1)
        n_bins = len(r.reliability["count"]) if r.reliability else DEFAULT_BINS
        bins.append(reliability_bins(confidence, predicted == saved["labels"], n_bins))
    try:
        pooled = collect().pooled_bins(bins)
    except ValueError:
        raise Unavailable(f"the seeds of {runs[0].label} have different numbers of ECE bins (ece_bins); they "
                          f"cannot be pooled into one curve") from None
    return pooled, statistics.fmean(getattr(r, group.epoch)["ece"] for r in runs), len(runs)


def per_sample(run: Summary) -> tuple:
    """(correctness rows, (target, max) probability rows) of a run, or Unavailable saying which file is missing."""
    run_dir = run.path.parent
    correct, probs = read_correct(run_dir), read_probabilities(run_dir)
    if correct is None:
        raise Unavailable(f"{run_dir} has no {rundir.TRAIN_CORRECT}: it was trained before cskd kept per-sample "
                          f"records; train it again")
    if probs is None:
        raise Unavailable(f"{run_dir} has {rundir.TRAIN_CORRECT} but no {rundir.TRAIN_PROBS}: train it again with "
                          f"log_per_sample: true")
    return correct, probs


def test_images(run: Summary, positions: list[int], labels: np.ndarray) -> tuple[dict[int, np.ndarray], str]:
    """({test position: (H, W, 3) uint8 image}, "") from the run's dataset, or ({}, why not). The logits are in
    the order of the test samples' `index` field (cskd.eval), so position i is the sample of the i-th index."""
    from cskd.dataset import open_dataset
    from cskd.jpeg_loader import BetonImages

    try:
        data = open_dataset(rundir.read_config(run.path.parent).data.path)
        store = BetonImages(data.beton("test"))
        if len(store.index) != len(labels):
            return {}, f"{data.beton('test')} has {len(store.index)} samples, the logits {len(labels)}"
        order = np.arange(len(labels)) if np.array_equal(store.index, np.arange(len(labels))) else np.argsort(
            store.index, kind="stable")
        if not np.array_equal(data.labels["test"][order], labels):
            return {}, f"the labels of {data.beton('test')} differ from the logits' (another conversion?)"
        return {i: store.decode(int(order[i])).permute(1, 2, 0).numpy() for i in positions}, ""
    except (CskdError, OSError) as e:
        return {}, str(e)
