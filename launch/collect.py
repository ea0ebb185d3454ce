"""Turn run dirs into the papers' tables: `python launch/collect.py DIR [--metric top1_err] [--epoch final]`.

Runs are found as DIR/**/summary.json and grouped by the launcher's layout
`<dataset>/<model>/<method label>/seed<k>/`. Each cell is mean ± sample std (ddof=1) over the
seeds, with the relative change vs. the cross-entropy row in parentheses, as in the CS-KD paper
("21.99±0.13 (-11.0%)"), and the number of seeds behind it.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from cskd.fileio import write_text
from cskd.metrics import METRIC_NAMES

BASELINE = "ce"


@dataclass
class RunResult:
    dataset: str
    model: str
    label: str
    seed: int
    summary: dict


def find_results(root: str | Path) -> list[RunResult]:
    """Every finished run (an atomically written summary.json) under `root`."""
    results = []
    for path in sorted(Path(root).rglob("summary.json")):
        summary = json.loads(path.read_text())
        parts = path.parent.relative_to(root).parts
        if len(parts) >= 4:  # <dataset>/<model>/<label>/seed<k>
            dataset, model, label = parts[-4], parts[-3], parts[-2]
        else:
            dataset, model, label = summary["dataset"], summary["model"], summary["method"]
        results.append(RunResult(dataset, model, label, int(summary["seed"]), summary))
    return results


def _label_order(label: str) -> tuple:
    return (label != BASELINE, label)


def aggregate(results: list[RunResult], metric: str, epochs=("final", "best")) -> list[dict]:
    """One row per (dataset, model, label, epoch kind): mean, std, n, relative change vs. ce."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        for kind in epochs:
            groups.setdefault((r.dataset, r.model, r.label, kind), []).append(float(r.summary[kind][metric]))
    rows = []
    for (dataset, model, label, kind), values in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                        _label_order(kv[0][2]),
                                                                                        kv[0][3])):
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        base = groups.get((dataset, model, BASELINE, kind))
        rel = None
        if base and label != BASELINE and statistics.fmean(base) != 0:
            rel = 100.0 * (mean - statistics.fmean(base)) / statistics.fmean(base)
        rows.append({"dataset": dataset, "model": model, "method": label, "epoch": kind, "metric": metric,
                     "mean": mean, "std": std, "n": len(values), "rel_vs_ce_pct": rel})
    return rows


def _cell(row: dict) -> str:
    rel = f" ({row['rel_vs_ce_pct']:+.1f}%)" if row["rel_vs_ce_pct"] is not None else ""
    return f"{row['mean']:.2f}±{row['std']:.2f}{rel} n={row['n']}"


def markdown_table(rows: list[dict], results: list[RunResult]) -> str:
    """Methods as rows, one column per (dataset/model, epoch kind)."""
    columns = sorted({(r["dataset"], r["model"], r["epoch"]) for r in rows}, key=lambda c: (c[0], c[1], c[2] != "final"))
    labels = sorted({r["method"] for r in rows}, key=_label_order)
    cells = {(r["dataset"], r["model"], r["epoch"], r["method"]): _cell(r) for r in rows}
    metric = rows[0]["metric"] if rows else ""
    head = "| method | " + " | ".join(f"{d}/{m} {metric} ({k})" for d, m, k in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(cells.get((*c, label), "–") for c in columns) + " |")
    devices = sorted({r.summary.get("device", "?") for r in results})
    lines.append("")
    lines.append(f"mean ± sample std over seeds; final = last epoch, best = epoch of lowest test top-1 error "
                 f"(selected on the test set). Machine: {'; '.join(devices)}")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["dataset", "model", "method", "metric", "epoch", "mean", "std", "n",
                                             "rel_vs_ce_pct"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def report(root: str | Path, metric: str = "top1_err", out_stem: str = "results") -> str:
    """Print-ready Markdown table of `root`; also writes `root/<stem>.md` and `root/<stem>.csv`."""
    results = find_results(root)
    if not results:
        return f"no finished runs (summary.json) under {root}\n"
    rows = aggregate(results, metric)
    table = markdown_table(rows, results)
    write_text(Path(root) / f"{out_stem}.md", table)
    write_text(Path(root) / f"{out_stem}.csv", csv_text(rows))
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/collect.py", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="directory holding run dirs (e.g. runs/demo)")
    parser.add_argument("--metric", default="top1_err", choices=METRIC_NAMES)
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    print(report(args.root, args.metric), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
