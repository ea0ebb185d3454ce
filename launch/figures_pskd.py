"""The PS-KD paper's figures (Kim et al., ICCV 2021: Figs. 2, 3, 4).

As in launch/figures_cskd.py, each `pskd_fig*` takes a group of runs (launch/figure_runs.py) and returns
its `Drawing`, and each `draw_*` returns the matplotlib Figure (unsaved) with the numbers it plotted.
"""
from __future__ import annotations

import textwrap

import numpy as np

from cskd import analysis
from cskd.ensemble import FILES
from cskd.errors import DataError
from cskd.plots import new_figure, reliability_panels
from launch import figure_runs
from launch.figure_runs import Drawing, Group, Unavailable
from launch.figures_cskd import COLOURS, ece_legend

TRUTH_COLOUR = "tab:green"
TOP_K = 5  # PS-KD Fig. 4 shows each model's five most probable classes


def pskd_fig2(group: Group) -> Drawing | None:
    """PS-KD Fig. 2 from the per-sample records of the ce and pskd runs at their lowest common seed; the samples
    are those hard to learn for the ce run."""
    picked = figure_runs.pair(group, ("ce", "pskd"), " (trained with log_per_sample: true)")
    if picked is None:
        return None
    seed, runs = picked
    records = {m: figure_runs.per_sample(r) for m, r in runs.items()}
    sizes = {m: correct.rows.shape[1] for m, (correct, _) in records.items()}
    if sizes["ce"] != sizes["pskd"]:
        raise DataError(f"{runs['ce'].path.parent} and {runs['pskd'].path.parent} were trained on {sizes['ce']} and "
                        f"{sizes['pskd']} samples; compare runs of one training set")
    base = records["ce"][0]
    hard = analysis.hard_samples(base.rows)
    every = len(analysis.hard_samples(base.rows, cap=sizes["ce"]))
    if not len(hard):
        raise Unavailable(f"no training sample is hard to learn for {runs['ce'].label} seed {seed} (each is "
                          f"correct in at least half of its {len(base.rows)} epochs)")
    curves = {}
    for m, (_, (target, maximum)) in records.items():
        curves[runs[m].label] = {"epochs": target.epochs + 1, "target": analysis.mean_and_iqr(target.rows, hard),
                                 "max": analysis.mean_and_iqr(maximum.rows, hard)}
    title = f"PS-KD Fig. 2: {group.where}, seed {seed}, hard-to-learn samples of {runs['ce'].label}"
    caption = (f"Target (a) and maximum (b) predicted probability over the epochs of "
               f"{figure_runs.runs_text(runs, seed)}, as the training step computed them (train mode, that epoch's "
               f"augmentation), on the training samples hard to learn for {runs['ce'].label}: classified correctly "
               f"in fewer than half of its {len(base.rows)} recorded epochs. {every} samples qualify; the "
               f"{len(hard)} of lowest training-set position are used (the paper plots 100). Lines: mean over the "
               f"samples; shaded: 25th-75th percentile.")
    return Drawing(title, caption, *draw_pskd_fig2(curves, len(hard), title))


def pskd_fig3(group: Group) -> Drawing | None:
    """PS-KD Fig. 3 for a dataset (`group.model` None) that has pskd runs: one panel per model, one curve per
    method."""
    if not any(r.method == "pskd" for r in group.runs):
        return None
    panels = []
    for model in sorted({r.model for r in group.runs}):
        sub = Group(group.dataset, model, [r for r in group.runs if r.model == model], group.epoch)
        chosen = sub.methods(sorted({r.method for r in sub.runs}, key=figure_runs.collect()._label_order))
        curves = {}
        for seeds in chosen.values():
            found = figure_runs.calibration(sub, seeds)
            if found is not None:
                curves[next(iter(seeds.values())).label] = found
        if curves:
            panels.append((model, curves))
    if not panels:
        raise Unavailable("needs runs with reliability bins in summary.json; none has them")
    title = f"PS-KD Fig. 3: {group.dataset}, every architecture, {group.epoch} epoch, seeds pooled"
    caption = (f"Reliability diagrams ({group.epoch} epoch), one per architecture trained on {group.dataset}, one "
               f"curve per method: accuracy against mean confidence of the non-empty equal-width confidence bins, "
               f"bins pooled over the seeds; ECE in the legends is the mean of the seeds' ECE. Dashed: perfect "
               f"calibration.")
    return Drawing(title, caption, *draw_pskd_fig3(panels, title))


def pskd_fig4(group: Group) -> Drawing | None:
    """PS-KD Fig. 4: top-5 probabilities of ce and pskd (lowest common seed) on one test sample both misclassify
    and one both classify correctly (the lowest positions), or on --samples, with the images where reachable."""
    picked = figure_runs.pair_with_logits(group, ("ce", "pskd"))
    if picked is None:
        return None
    seed, runs, saved = picked
    labels = saved["ce"]["labels"].numpy()
    logits = [s["logits"] for s in saved.values()]
    default = (analysis.lowest(analysis.commonly_misclassified(labels, *logits), 1)
               + analysis.lowest(analysis.commonly_correct(labels, *logits), 1))
    rule = "the lowest test position misclassified by both runs and the lowest classified correctly by both"
    chosen, how = figure_runs.chosen_samples(group, len(labels), default, rule)
    names = figure_runs.class_names(saved["ce"], runs["ce"].path.parent / FILES[group.epoch])
    images, why = figure_runs.test_images(runs["ce"], chosen, labels)
    samples = []
    for i in chosen:
        top = {}
        for m, s in saved.items():
            classes, probs = analysis.top_k(analysis.probabilities(s["logits"][i:i + 1])[0], TOP_K)
            top[runs[m].label] = ([names[c] for c in classes], probs)
        samples.append({"index": i, "truth": names[labels[i]], "image": images.get(i), "why": why, "top": top})
    title = f"PS-KD Fig. 4: {group.where}, seed {seed}, {group.epoch} epoch"
    caption = (f"Top-{TOP_K} predicted probabilities of {figure_runs.runs_text(runs, seed)} ({group.epoch} epoch's "
               f"logits) on test samples {', '.join(map(str, chosen))} ({how}); the ground truth's bar is green. "
               f"Images from "
               f"the dataset the ce run was trained on" + (f" (not available: {why})." if why else "."))
    return Drawing(title, caption, *draw_pskd_fig4(samples, title))


def draw_pskd_fig2(curves: dict[str, dict], n_samples: int, title: str):
    """Fig. 2: the (a) target and (b) maximum probability of the chosen hard-to-learn training samples over
    the epochs, per method the mean over the samples with the interquartile range shaded. `curves[method]` is
    {"epochs" (1-based), "target": (mean, q25, q75), "max": (mean, q25, q75)}. Returns (figure, {"mean":
    {"target" | "max": {method: mean curve}}})."""
    fig = new_figure(10, 4.2)
    axes = fig.subplots(1, 2)
    numbers: dict = {"mean": {"target": {}, "max": {}}}
    for ax, key, letter, name in zip(axes, ("target", "max"), "ab", ("target probability", "maximum probability")):
        for colour, (method, curve) in zip(COLOURS, curves.items()):
            mean, q25, q75 = curve[key]
            ax.plot(curve["epochs"], mean, color=colour, label=f"{method} (mean)")
            ax.fill_between(curve["epochs"], q25, q75, color=colour, alpha=0.2, label=f"{method} (25-75th pct.)")
            numbers["mean"][key][method] = mean
        ax.set(xlabel="epoch", ylabel=f"{name} (training step)", ylim=(0, 1),
               title=f"({letter}) {name}, {n_samples} hard-to-learn samples")
        ax.legend(fontsize="small", ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.suptitle(title)
    return fig, numbers


def draw_pskd_fig3(panels: list[tuple[str, dict[str, tuple[dict, float, int]]]], title: str):
    """Fig. 3: one reliability diagram per architecture with every method's curve. `panels` is [(model, {label:
    (pooled bins, mean ECE %, seeds)})]. Returns (figure, {"ece": {model: {label: ECE}}})."""
    shown = [(model, {ece_legend(label, ece, n): bins for label, (bins, ece, n) in curves.items()})
             for model, curves in panels]
    numbers = {"ece": {model: {label: ece for label, (_, ece, _) in curves.items()} for model, curves in panels}}
    return reliability_panels(shown, title), numbers


def draw_pskd_fig4(samples: list[dict], title: str):
    """Fig. 4: per test sample a row: the image, then per method its top-k predicted probabilities as
    horizontal bars with the class names (the ground truth in green). Each sample is {"index", "truth" (name),
    "image": (H, W, 3) uint8 or None, "why" (why there is no image), "top": {method: (names, probabilities)}}.
    Returns (figure, {"bars": [{method: bar lengths} per sample], "image_text": [text shown instead of the
    image, or None]})."""
    methods = len(samples[0]["top"])
    fig = new_figure(2.6 + 4.0 * methods, 2.7 * len(samples))
    axes = fig.subplots(len(samples), 1 + methods, squeeze=False, width_ratios=[2.6] + [4.0] * methods)
    numbers: dict = {"bars": [], "image_text": []}
    for row, sample in zip(axes, samples):
        picture = row[0]
        picture.set(xticks=[], yticks=[], title=f"test sample {sample['index']}\ntruth: {sample['truth']}")
        if sample["image"] is not None:
            picture.imshow(sample["image"])
            numbers["image_text"].append(None)
        else:
            text = "\n".join(textwrap.wrap(f"image not available: {sample['why']}", 28))
            picture.text(0.5, 0.5, text, ha="center", va="center", fontsize="x-small", transform=picture.transAxes)
            numbers["image_text"].append(f"image not available: {sample['why']}")
        lengths = {}
        for ax, (method, (names, probs)) in zip(row[1:], sample["top"].items()):
            y = np.arange(len(names))
            colours = [TRUTH_COLOUR if n == sample["truth"] else "tab:gray" for n in names]
            bars = ax.barh(y, probs, color=colours)
            lengths[method] = np.array([b.get_width() for b in bars])
            ax.set_yticks(y, names, fontsize="small")
            ax.invert_yaxis()  # the most probable class on top
            ax.set(xlim=(0, 1), xlabel="predicted probability", title=method)
            for k, p in enumerate(probs):
                ax.text(min(p + 0.02, 0.8), k, f"{p:.3f}", va="center", fontsize="x-small")
        numbers["bars"].append(lengths)
    fig.suptitle(title)
    return fig, numbers
