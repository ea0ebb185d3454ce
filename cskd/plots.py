"""Reliability diagrams (matplotlib, headless)."""
from __future__ import annotations

from pathlib import Path

from cskd.fileio import atomic_path


def reliability_diagram(bins: dict, path: str | Path, title: str) -> None:
    """Accuracy per confidence bin against the diagonal, with the confidence gap shaded; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = bins["edges"]
    width = edges[1] - edges[0]
    left = edges[:-1]
    filled = [c > 0 for c in bins["count"]]
    acc = [a if f else 0.0 for a, f in zip(bins["accuracy"], filled)]
    conf = [c if f else 0.0 for c, f in zip(bins["confidence"], filled)]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.bar(left, acc, width=width, align="edge", edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(left, [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, align="edge", edgecolor="tab:red",
           color="tab:red", alpha=0.3, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def reliability_overlay(curves: dict[str, dict], path: str | Path, title: str) -> None:
    """Several reliability curves on one diagram, against the diagonal; written atomically.

    `curves` maps a legend label to reliability bins (`cskd.metrics.reliability_bins` output); each
    curve joins (mean confidence, accuracy) of the non-empty bins.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for label, bins in curves.items():
        reliability_curve(ax, bins, label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="best", fontsize="small")  # curves can lie on either side of the diagonal
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def new_figure(width: float, height: float):
    """A matplotlib Figure outside pyplot's global state (nothing to close, no backend to choose), laid out
    by matplotlib's constrained layout so that titles and legends are not cut."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def save_figure(fig, path: str | Path, fmt: str = "png", caption: str = "") -> None:
    """Write `fig` as `fmt` (png or pdf) atomically; the caption goes into the file's metadata (PNG
    Description, PDF Subject), so a figure copied out of its report still says what it shows."""
    metadata = {"Description" if fmt == "png" else "Subject": caption} if caption else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=100, metadata=metadata)


def reliability_curve(ax, bins: dict, label: str, **style) -> None:
    """One reliability curve on `ax`: (mean confidence, accuracy) of the non-empty bins."""
    filled = [i for i, c in enumerate(bins["count"]) if c > 0]  # an empty bin has no accuracy to show
    ax.plot([bins["confidence"][i] for i in filled], [bins["accuracy"][i] for i in filled], marker="o",
            markersize=4, label=label, **style)


def reliability_panels(panels: list[tuple[str, dict[str, dict]]], title: str):
    """A row of reliability diagrams, one per (panel title, {legend label: bins}), each with the dashed
    diagonal of perfect calibration and its legend in a row of its own below it (curves can lie anywhere
    in the panel, so a legend inside would hide some); returns the matplotlib Figure (unsaved)."""
    lines = 1 + max(len(curves) for _, curves in panels)
    legend_height = 0.22 * lines
    fig = new_figure(max(6.0, 4.2 * len(panels)), 4.6 + legend_height)
    axes = fig.subplots(2, len(panels), squeeze=False, height_ratios=[4.2, legend_height])
    for ax, below, (name, curves) in zip(axes[0], axes[1], panels):
        ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
        for label, bins in curves.items():
            reliability_curve(ax, bins, label)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
        ax.set_box_aspect(1)
        below.axis("off")
        below.legend(*ax.get_legend_handles_labels(), loc="upper center", fontsize="small", frameon=False)
    fig.suptitle(title)
    return fig
