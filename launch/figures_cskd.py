"""The CS-KD paper's figures (Yun et al., CVPR 2020: Figs. 1(b), 2, 3, 4, 5).

Each `cskd_fig*` takes a group of runs (launch/figure_runs.py) and returns its `Drawing`, None when the
figure is not for the group, or raises `Unavailable`. Each `draw_*` takes what those loaded and
cskd.analysis computed, and returns the matplotlib Figure (unsaved) with the numbers it plotted, so that
tests check the content without reading images. Methods are drawn in the order given (the baseline
first), each in its own colour.
"""
from __future__ import annotations

import numpy as np
import torch

from cskd import analysis
from cskd.ensemble import FILES
from cskd.errors import DataError
from cskd.metrics import hierarchical_accuracy
from cskd.plots import new_figure, reliability_panels
from launch import figure_runs
from launch.figure_runs import Drawing, Group, Unavailable

COLOURS = ("tab:blue", "tab:red", "tab:green", "tab:purple", "tab:orange")
BASELINES = ("ce", "vsoftmax", "adacos", "maxent", "ls")  # CS-KD Fig. 5's panels, in its order
EMBEDDED = ("ce", "vsoftmax", "adacos", "cskd")  # CS-KD Fig. 3's panels


def cskd_fig1b(group: Group) -> Drawing | None:
    """CS-KD Fig. 1(b): the softmax of ce and cskd (lowest common seed) on two commonly misclassified test
    samples (the lowest positions), or on --samples."""
    picked = figure_runs.pair_with_logits(group, ("ce", "cskd"))
    if picked is None:
        return None
    seed, runs, saved = picked
    labels = saved["ce"]["labels"].numpy()
    rule = "the two lowest test positions misclassified by both runs"
    default = analysis.lowest(analysis.commonly_misclassified(labels, *(s["logits"] for s in saved.values())), 2)
    chosen, how = figure_runs.chosen_samples(group, len(labels), default, rule)
    names = figure_runs.class_names(saved["ce"], runs["ce"].path.parent / FILES[group.epoch])
    probs = {m: analysis.probabilities(s["logits"][chosen]) for m, s in saved.items()}
    samples = []
    for k, i in enumerate(chosen):
        shown = analysis.shown_classes(probs["ce"][k], probs["cskd"][k], int(labels[i]))
        samples.append({"index": i, "truth": int(np.flatnonzero(shown == labels[i])[0]),
                        "names": [names[c] for c in shown],
                        "probs": {runs[m].label: p[k][shown] for m, p in probs.items()},
                        "predicted": {runs[m].label: names[int(np.argmax(p[k]))] for m, p in probs.items()}})
    classes = len(names)
    shown_text = ("all classes" if classes <= 20 else "the 10 classes of highest probability under either model, "
                  "and the ground truth if it is not among them")
    title = f"CS-KD Fig. 1(b): {group.where}, seed {seed}, {group.epoch} epoch"
    caption = (f"Softmax probabilities of {figure_runs.runs_text(runs, seed)} ({group.epoch} epoch's logits) on "
               f"test samples {', '.join(map(str, chosen))} ({how}); bars show {shown_text} of the {classes}.")
    return Drawing(title, caption, *draw_cskd_fig1b(samples, title))


def cskd_fig2(group: Group) -> Drawing | None:
    """CS-KD Fig. 2 from the ce and cskd runs' test logits at their lowest common seed."""
    picked = figure_runs.pair_with_logits(group, ("ce", "cskd"))
    if picked is None:
        return None
    seed, runs, saved = picked
    labels = saved["ce"]["labels"]
    wrong = analysis.commonly_misclassified(labels, *(s["logits"] for s in saved.values()))
    if not len(wrong):
        raise Unavailable(f"no test sample is misclassified by both runs ({figure_runs.runs_text(runs, seed)}, "
                          f"{group.epoch} epoch)")
    pred, true = {}, {}
    for m, s in saved.items():
        pred[runs[m].label], true[runs[m].label] = analysis.predicted_and_true_log_probs(s["logits"], labels, wrong)
    title = f"CS-KD Fig. 2: {group.where}, seed {seed}, {group.epoch} epoch"
    caption = (f"Histograms of the log-probability of (a) the predicted label (top-1 softmax score) and (b) the "
               f"ground-truth label, over the {len(wrong)} of {len(labels)} test samples misclassified by both "
               f"{figure_runs.runs_text(runs, seed)} ({group.epoch} epoch's logits); both histograms of a panel "
               f"share 20 equal-width bins over the range of both.")
    return Drawing(title, caption, *draw_cskd_fig2(pred, true, title))


def cskd_fig3(group: Group) -> Drawing | None:
    """CS-KD Fig. 3: t-SNE of the test features kept by each of ce, vsoftmax, adacos, cskd at their lowest
    common seed (a run without features is left out; two are needed)."""
    chosen = group.methods(EMBEDDED)
    if not chosen:
        return None
    need = f"needs runs of at least two of {', '.join(EMBEDDED)} with test features"
    seed = figure_runs.common_seed(chosen) if len(chosen) > 1 else None
    if seed is None:
        raise Unavailable(f"{need} and a seed in common; found {figure_runs.found(chosen)}")
    kept, names = [], {}  # (run, features, labels) of the runs whose logits file keeps features
    for method, seeds in chosen.items():
        run = seeds[seed]
        path = run.path.parent / FILES[group.epoch]
        if not path.is_file():  # a run without test logits has no features either: its panel is left out
            continue
        saved = group.logits(run)
        found = figure_runs.features(saved, path)
        if found is not None:
            labels = saved["labels"].numpy()[found[1]]
            class_names = figure_runs.class_names(saved, path)
            names |= {int(c): class_names[c] for c in np.unique(labels)}
            kept.append((run, found[0], labels))
    if len(kept) < 2:
        with_features = ", ".join(run.label for run, _, _ in kept) or "none"
        raise Unavailable(f"{need}; found {figure_runs.found(chosen)}, with features at seed {seed}: {with_features} "
                          f"(runs trained before cskd kept test features have none: train them again)")
    panels = []
    for run, features, labels in kept:
        if len(features) < 2:
            raise Unavailable(f"{run.path.parent / FILES[group.epoch]} keeps the features of {len(features)} test "
                              f"sample(s); t-SNE needs 2 or more")
        try:
            points, perplexity = analysis.tsne_embedding(features)
        except ImportError:
            raise Unavailable("needs scikit-learn for t-SNE: pip install scikit-learn") from None
        panels.append({"name": run.label, "points": points, "labels": labels,
                       "r_at_1": float(getattr(run, group.epoch)["r_at_1"])})
    title = f"CS-KD Fig. 3: {group.where}, seed {seed}, {group.epoch} epoch"
    caption = (f"t-SNE (scikit-learn; perplexity {perplexity:g}, init pca, random_state 0) of the penultimate-layer "
               f"features of seed {seed} of {', '.join(p['name'] for p in panels)} ({group.epoch} epoch) on the test "
               f"subset the runs keep: the first 100 test samples (in test order) of each of up to 10 evenly spaced "
               f"classes, {len(kept[0][1])} samples; colours are classes. R@1 in the panel titles is the summary's, "
               f"computed on the whole test set.")
    return Drawing(title, caption, *draw_cskd_fig3(panels, names, title))


def cskd_fig4(group: Group) -> Drawing | None:
    """CS-KD Fig. 4 from the ce and cskd test logits (lowest common seed) of a dataset whose logits files record
    `superclass_of_class`; None when they record that the dataset has none."""
    picked = figure_runs.pair_with_logits(group, ("ce", "cskd"))
    if picked is None:
        return None
    seed, runs, saved = picked
    count = saved["ce"]["logits"].shape[1]
    hierarchy = {}
    for m, s in saved.items():
        path = runs[m].path.parent / FILES[group.epoch]
        if "superclass_of_class" not in s:
            raise Unavailable(f"needs the superclass of each class in the test logits (a dataset with a hierarchy, "
                              f"e.g. mixed); {path} was written before cskd kept it: train the run again")
        hierarchy[m] = figure_runs.listed(s, "superclass_of_class", count, path)
    if all(h is None for h in hierarchy.values()):
        return None  # the files record that the dataset has no hierarchy: the figure is not for it
    if hierarchy["ce"] != hierarchy["cskd"]:
        raise DataError(f"{runs['ce'].path.parent} and {runs['cskd'].path.parent} record different superclasses; "
                        f"compare runs of one conversion of {group.dataset}")
    superclass_of_class = hierarchy["ce"]
    labels = saved["ce"]["labels"]
    matrices, accuracy, errors = {}, {}, {}
    for m, s in saved.items():
        predicted = analysis.predictions(s["logits"])
        names, matrices[runs[m].label] = analysis.superclass_confusion(predicted, labels.numpy(), superclass_of_class)
        accuracy[runs[m].label] = hierarchical_accuracy(torch.from_numpy(predicted), labels,
                                                        superclass_of_class)["hier_acc"]
        errors[runs[m].label] = analysis.error_per_superclass(predicted, labels.numpy(), superclass_of_class)
    title = f"CS-KD Fig. 4: {group.where}, seed {seed}, {group.epoch} epoch"
    caption = (f"{figure_runs.runs_text(runs, seed)}, {group.epoch} epoch's logits, all {len(labels)} test samples. "
               f"(a), (b): superclass confusion in % (row = true superclass, column = superclass of the predicted fine "
               f"label; each row sums to 100; hierarchy accuracy = % of samples on the diagonal). (c): fine-grained "
               f"top-1 error per true superclass.")
    return Drawing(title, caption, *draw_cskd_fig4(names, matrices, accuracy, errors, title))


def cskd_fig5(group: Group) -> Drawing | None:
    """CS-KD Fig. 5: each baseline present against cskd, from the summaries' bins pooled over seeds."""
    chosen = group.methods(BASELINES + ("cskd",))
    if not chosen:
        return None
    curves = {m: c for m, seeds in chosen.items() if (c := figure_runs.calibration(group, seeds)) is not None}
    baselines = [m for m in BASELINES if m in curves]
    if "cskd" not in curves or not baselines:
        raise Unavailable(f"needs runs of cskd and of at least one of {', '.join(BASELINES)} with reliability bins; "
                          f"found {figure_runs.found(chosen)}")
    label = {m: next(iter(chosen[m].values())).label for m in curves}
    panels = [(label[b], {label[b]: curves[b], label["cskd"]: curves["cskd"]}) for b in baselines]
    title = f"CS-KD Fig. 5: {group.where}, {group.epoch} epoch, seeds pooled"
    caption = (f"Reliability diagrams ({group.epoch} epoch): per baseline ({', '.join(label[b] for b in baselines)}) "
               f"its curve and {label['cskd']}'s, each the accuracy against the mean confidence of the non-empty "
               f"equal-width confidence bins, bins pooled over the seeds (counts summed); ECE in the legends is the "
               f"mean of the seeds' ECE. Dashed: perfect calibration.")
    return Drawing(title, caption, *draw_cskd_fig5(panels, title))


def ece_legend(label: str, ece: float, n: int) -> str:
    """A reliability curve's legend entry: the method, its ECE (mean over seeds) and the seeds pooled."""
    return f"{label}: ECE {ece:.2f}% (mean of n={n})"


def draw_cskd_fig2(log_pred: dict[str, np.ndarray], log_true: dict[str, np.ndarray], title: str, bins: int = 20):
    """Fig. 2: histograms of log p(predicted label) (a) and log p(ground-truth label) (b) over the commonly
    misclassified samples, one overlaid histogram per method with the same bins. Returns (figure,
    {"edges": {panel: edges}, "counts": {panel: {method: counts}}}), panels "predicted" and "true"."""
    from matplotlib.ticker import MaxNLocator

    fig = new_figure(10, 4.2)
    axes = fig.subplots(1, 2)
    numbers: dict = {"edges": {}, "counts": {}}
    for ax, (panel, values, letter, what) in zip(axes, (("predicted", log_pred, "a", "predicted label"),
                                                        ("true", log_true, "b", "ground-truth label"))):
        edges = analysis.shared_edges(list(values.values()), bins)
        numbers["edges"][panel], numbers["counts"][panel] = edges, {}
        for colour, (method, v) in zip(COLOURS, values.items()):
            counts, _, _ = ax.hist(v, bins=edges, alpha=0.5, color=colour, edgecolor=colour,
                                   label=f"{method} ({len(v)} samples)")
            numbers["counts"][panel][method] = counts
        ax.set(xlabel=f"log p({what})", ylabel="test samples", title=f"({letter}) {what}")
        ax.set_ylim(0, 1.3 * max(c.max() for c in numbers["counts"][panel].values()))  # room for the legend
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize="small", loc="upper left")
    fig.suptitle(title)
    return fig, numbers


def draw_cskd_fig1b(samples: list[dict], title: str):
    """Fig. 1(b): one row per sample, the softmax of each method over the shown classes as grouped bars.
    Each sample is {"index", "truth" (the ground truth's position among the shown classes), "names" (the
    shown classes' names), "probs": {method: probabilities of the shown classes}, "predicted": {method:
    name}}. Returns (figure, {"bars": [{method: bar heights} per sample]})."""
    widest = max(len(s["names"]) for s in samples)
    fig = new_figure(max(7.0, 0.55 * widest + 2), 3.4 * len(samples))
    axes = fig.subplots(len(samples), 1, squeeze=False)[:, 0]
    numbers: dict = {"bars": []}
    for ax, sample in zip(axes, samples):
        x = np.arange(len(sample["names"]))
        width = 0.8 / len(sample["probs"])
        heights = {}
        for k, (colour, (method, probs)) in enumerate(zip(COLOURS, sample["probs"].items())):
            bars = ax.bar(x + (k - (len(sample["probs"]) - 1) / 2) * width, probs, width=width, color=colour,
                          label=f"{method} (predicts {sample['predicted'][method]})")
            heights[method] = np.array([b.get_height() for b in bars])
        numbers["bars"].append(heights)
        names = [f"{n}\n(truth)" if i == sample["truth"] else n for i, n in enumerate(sample["names"])]
        ax.set_xticks(x, names, rotation=30 if widest > 8 else 0, ha="right" if widest > 8 else "center",
                      fontsize="small")
        ax.set(ylim=(0, 1.05), ylabel="softmax probability",
               title=f"test sample {sample['index']}, ground truth: {sample['names'][sample['truth']]}")
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))  # beside: bars reach the top
    fig.suptitle(title)
    return fig, numbers


def draw_cskd_fig3(panels: list[dict], class_names: dict[int, str], title: str):
    """Fig. 3: one t-SNE panel per method, points coloured by class. Each panel is {"name", "points" (M, 2),
    "labels" (M,), "r_at_1"}; `class_names` names the labels present. Returns (figure, {"points": {name: M},
    "titles": [panel titles]})."""
    import matplotlib

    colours = matplotlib.colormaps["tab10" if len(class_names) <= 10 else "tab20"]
    fig = new_figure(4.2 * len(panels), 4.9)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    numbers: dict = {"points": {}, "titles": []}
    handles = {}
    for ax, panel in zip(axes, panels):
        for k, (label, name) in enumerate(sorted(class_names.items())):
            mine = panel["labels"] == label
            handles[name] = ax.scatter(panel["points"][mine, 0], panel["points"][mine, 1], s=6,
                                       color=colours(k % colours.N), label=name)
        numbers["points"][panel["name"]] = len(panel["points"])
        panel_title = f"{panel['name']}\nR@1 {panel['r_at_1']:.2f}% (whole test set)"
        numbers["titles"].append(panel_title)
        ax.set(title=panel_title, xticks=[], yticks=[])
    fig.legend(list(handles.values()), list(handles), loc="outside lower center", ncol=min(10, len(handles)),
               fontsize="small", markerscale=2)
    fig.suptitle(title)
    return fig, numbers


def draw_cskd_fig4(names: list[str], matrices: dict[str, np.ndarray], hierarchy_acc: dict[str, float],
                   errors: dict[str, dict[str, float]], title: str):
    """Fig. 4: (a), (b) the superclass confusion matrix of each method in % (row = true superclass, column =
    superclass of the predicted fine label; rows sum to 100), (c) the fine-grained top-1 error per superclass
    as grouped bars. Returns (figure, {"matrices": {method: %}, "errors": {method: [% per name]}})."""
    size = max(3.6, 0.75 * len(names) + 1.8)
    fig = new_figure(2 * size + max(4.5, 0.9 * len(names) + 1.5), size + 0.6)
    axes = fig.subplots(1, 3, width_ratios=[size, size, max(4.5, 0.9 * len(names) + 1.5)])
    numbers: dict = {"matrices": {}, "errors": {}}
    for ax, letter, (method, matrix) in zip(axes, "ab", matrices.items()):
        percent = 100.0 * matrix
        numbers["matrices"][method] = percent
        ax.imshow(percent, vmin=0, vmax=100, cmap="Blues")
        for (i, j), value in np.ndenumerate(percent):
            text = "–" if np.isnan(value) else f"{value:.1f}"
            ax.text(j, i, text, ha="center", va="center", fontsize="small",
                    color="white" if value > 60 else "black")
        ticks = np.arange(len(names))
        ax.set_xticks(ticks, names, rotation=45, ha="right")
        ax.set_yticks(ticks, names)
        ax.set(xlabel="superclass of the predicted label", ylabel="true superclass",
               title=f"({letter}) {method}: hierarchy acc. {hierarchy_acc[method]:.1f}%")
    x = np.arange(len(names))
    width = 0.8 / len(errors)
    for k, (colour, (method, per_name)) in enumerate(zip(COLOURS, errors.items())):
        values = [per_name.get(n, np.nan) for n in names]
        numbers["errors"][method] = values
        axes[2].bar(x + (k - (len(errors) - 1) / 2) * width, values, width=width, color=colour, label=method)
    axes[2].set_xticks(x, names, rotation=45, ha="right")
    axes[2].set(ylabel="top-1 error (%)", title="(c) fine-grained top-1 error per superclass")
    axes[2].legend(fontsize="small")
    fig.suptitle(title)
    return fig, numbers


def draw_cskd_fig5(panels: list[tuple[str, dict[str, tuple[dict, float, int]]]], title: str):
    """Fig. 5: one reliability diagram per baseline, each with the baseline's and CS-KD's curves. `panels` is
    [(baseline, {label: (pooled bins, mean ECE %, seeds)})]. Returns (figure, {"ece": {baseline: {label:
    ECE}}})."""
    shown = [(f"({chr(97 + k)}) {baseline}", {ece_legend(label, ece, n): bins for label, (bins, ece, n)
                                               in curves.items()}) for k, (baseline, curves) in enumerate(panels)]
    numbers = {"ece": {baseline: {label: ece for label, (_, ece, _) in curves.items()} for baseline, curves in panels}}
    return reliability_panels(shown, title), numbers
