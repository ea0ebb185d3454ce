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
        filled = [i for i, c in enumerate(bins["count"]) if c > 0]  # an empty bin has no accuracy to show
        ax.plot([bins["confidence"][i] for i in filled], [bins["accuracy"][i] for i in filled], marker="o",
                markersize=4, label=label)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=title)
    ax.legend(loc="best", fontsize="small")  # curves can lie on either side of the diagonal
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
