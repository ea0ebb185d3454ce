"""Turn run dirs into the papers' tables: `python launch/collect.py DIR [--metric M] [--epoch final|best] [--status]`.

Runs are found as DIR/**/summary.json, wherever they lie, and grouped by what each summary records
(`cskd.rundir.read_summary`: dataset, model, label, seed), never by their paths. As in the CS-KD
paper's Tables 1-3, each model gets a table with one row per method (cross-entropy first) and one
column per dataset; a cell is mean ± sample std (ddof=1) over the seeds with the relative change
vs. the cross-entropy row in parentheses, and the number of seeds behind it ("21.99±0.13 (-11.0%)
n=3"). Below the tables come the runs that are not done, by state, from the launcher's grid.json
manifests (launch/runs.py).
The report is also written to DIR/results.md, with DIR/results.csv (both epochs) and one
reliability diagram per dataset/model with the methods overlaid (DIR/reliability_<dataset>_<model>.png).
`--status` prints only each grid's run counts and its unfinished runs.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import statistics
import sys
from pathlib import Path

from cskd import rundir
from cskd.errors import CskdError
from cskd.fileio import write_text
from cskd.metrics import METRIC_NAMES
from cskd.plots import reliability_overlay
from cskd.rundir import Summary, read_summary
from launch import runs
from launch.runs import RunStatus

BASELINE = "ce"
EPOCHS = ("final", "best")
# The units of cskd.metrics' conventions, for the table headings.
UNITS = {"top1_err": "%", "top5_err": "%", "ece": "%", "r_at_1": "%", "nll": "nats", "aurc": "×1000",
         "eaurc": "×1000"}
NOT_DONE = ("missing", "pending", "running", "failed", "cancelled", "unknown")
COUNTED = ("done", "pending", "running", "failed", "cancelled", "missing")  # 'unknown' only when it occurs


def find_results(root: str | Path) -> list[Summary]:
    """Every finished run (an atomically written summary.json) under `root`."""
    return [read_summary(path) for path in sorted(Path(root).rglob(rundir.SUMMARY))]


def _label_order(label: str) -> tuple:
    return (label != BASELINE, label)


def aggregate(results: list[Summary], metric: str, epochs=EPOCHS) -> list[dict]:
    """One row per (dataset, model, label, epoch kind): mean, std, n, relative change vs. ce."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        for kind in epochs:
            groups.setdefault((r.dataset, r.model, r.label, kind), []).append(float(getattr(r, kind)[metric]))
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


def markdown_tables(rows: list[dict], epoch: str = "final") -> str:
    """One table per model, as in the CS-KD paper: a row per method (ce first), a column per dataset."""
    rows = [r for r in rows if r["epoch"] == epoch]
    blocks = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        datasets = sorted({r["dataset"] for r in mine})
        cells = {(r["method"], r["dataset"]): _cell(r) for r in mine}
        metric = mine[0]["metric"]
        lines = [f"**{model}** — {metric} ({UNITS[metric]}), {epoch} epoch", "",
                 "| method | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
        for label in sorted({r["method"] for r in mine}, key=_label_order):
            lines.append(f"| {label} | " + " | ".join(cells.get((label, d), "–") for d in datasets) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def footnote(results: list[Summary]) -> str:
    """What the cells mean, the machine(s) behind them, and any dataset column that pools conversions."""
    devices = sorted({r.device for r in results})
    text = (f"Mean ± sample std (ddof=1) over seeds, n = number of seeds (std 0.00 when n=1); in parentheses the "
            f"relative change of the mean vs. the {BASELINE} row of the same dataset and model. final = last "
            f"epoch; best = epoch of lowest test top1_err, i.e. selected on the test set (optimistic, as the "
            f"reference code reports). Machine(s): {'; '.join(devices)}.\n")
    conversions: dict[str, set[str]] = {}
    for r in results:
        conversions.setdefault(r.dataset, set()).add(r.data_identity)
    for dataset, identities in sorted(conversions.items()):
        if len(identities) > 1:
            text += (f"\nWarning: the {dataset} column pools runs on {len(identities)} different conversions of "
                     f"{dataset} (different .beton sha256s in their summary.json `data`); compare like with like.\n")
    return text


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["dataset", "model", "method", "metric", "epoch", "mean", "std", "n",
                                             "rel_vs_ce_pct"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def find_grids(root: str | Path) -> list[tuple[str, Path, list[Path]]]:
    """(name, grid root, run dirs) per grid.json under `root`; without any, the run dirs found on disk."""
    grids = [(m.get("name", str(g)), g, [g / e["dir"] for e in m["runs"]])
             for g, m in runs.read_manifests(Path(root))]
    if grids:
        return grids
    dirs = sorted({p.parent for name in (rundir.CONFIG, rundir.SUMMARY) for p in Path(root).rglob(name)})
    return [("(no grid.json; run dirs on disk)", Path(root), dirs)] if dirs else []


def run_statuses(grids: list[tuple[str, Path, list[Path]]]) -> dict[Path, RunStatus]:
    """launch.runs' status of every run dir of `grids` (one Slurm query for all)."""
    return runs.statuses(list(dict.fromkeys(d for _, _, ds in grids for d in ds)))


def _run_line(root: Path, run_dir: Path, status: RunStatus) -> str:
    info = ", ".join(p for p in (status.job_id and f"job {status.job_id}", status.detail) if p)
    log = f" (log: {status.log})" if status.log else ""
    return f"- `{os.path.relpath(run_dir, root)}`" + (f": {info}" if info else "") + log


def not_done_text(root: str | Path, states: dict[Path, RunStatus]) -> str:
    """The runs that are not done, a list per state (missing, pending, running, failed, cancelled, unknown)."""
    if not states:
        return ""
    by_state = {s: sorted(d for d, st in states.items() if st.state == s) for s in NOT_DONE}
    n_open = sum(map(len, by_state.values()))
    if not n_open:
        return f"All {len(states)} runs are done.\n"
    lines = [f"**Runs not done**: {n_open} of {len(states)}"]
    for state, dirs in by_state.items():
        if dirs:
            lines += ["", f"{state} ({len(dirs)}):"] + [_run_line(Path(root), d, states[d]) for d in dirs]
    return "\n".join(lines) + "\n"


def pooled_bins(bins: list[dict]) -> dict:
    """Several seeds' reliability bins as one: counts summed, per-bin accuracy and confidence count-weighted."""
    count = [sum(c) for c in zip(*(b["count"] for b in bins), strict=True)]

    def weighted(key: str) -> list[float]:  # empty bins may hold 0, NaN or null: leave them out
        return [sum(b["count"][i] * b[key][i] for b in bins if b["count"][i]) / c if c else 0.0
                for i, c in enumerate(count)]

    return {"edges": bins[0]["edges"], "count": count, "accuracy": weighted("accuracy"),
            "confidence": weighted("confidence")}


def write_reliability(root: str | Path, results: list[Summary]) -> list[Path]:
    """root/reliability_<dataset>_<model>.png per dataset/model: each method's final-epoch bins pooled over seeds."""
    groups: dict[tuple, dict[str, list[Summary]]] = {}
    for r in results:
        if r.reliability:
            groups.setdefault((r.dataset, r.model), {}).setdefault(r.label, []).append(r)
    paths = []
    for (dataset, model), by_label in sorted(groups.items()):
        curves = {}
        for label in sorted(by_label, key=_label_order):
            summaries = by_label[label]
            ece = statistics.fmean(s.final["ece"] for s in summaries)
            curves[f"{label} (mean ECE {ece:.2f}%, n={len(summaries)})"] = pooled_bins(
                [s.reliability for s in summaries])
        path = Path(root) / f"reliability_{dataset}_{model}.png"
        reliability_overlay(curves, path, f"{dataset} / {model}, final epoch, seeds pooled")
        paths.append(path)
    return paths


def report(root: str | Path, metric: str = "top1_err", epoch: str = "final", out_stem: str = "results") -> str:
    """Print-ready tables and not-done runs of `root`; also writes root/<stem>.md, root/<stem>.csv and the PNGs."""
    root = Path(root)
    results, grids = find_results(root), find_grids(root)
    if not results and not grids:
        return f"no runs (summary.json, config.yaml or grid.json) under {root}\n"
    rows = aggregate(results, metric)
    tables = (markdown_tables(rows, epoch) + "\n" + footnote(results) if results
              else f"no finished runs (summary.json) under {root}\n")
    text = "\n".join(t for t in (tables, not_done_text(root, run_statuses(grids))) if t)
    write_text(root / f"{out_stem}.md", text)
    write_text(root / f"{out_stem}.csv", csv_text(rows))
    write_reliability(root, results)
    return text


def status_text(root: str | Path) -> str:
    """Per grid under `root`: how many runs are in each state, then the runs that are not done."""
    root = Path(root)
    grids = find_grids(root)
    if not grids:
        return f"no grid.json and no run dirs under {root}\n"
    states = run_statuses(grids)
    lines = []
    for name, grid_root, dirs in grids:
        counts = {s: sum(states[d].state == s for d in dirs) for s in runs.STATES}
        shown = COUNTED + (("unknown",) if counts["unknown"] else ())
        lines.append(f"{name} ({os.path.relpath(grid_root, root)}): "
                     + ", ".join(f"{s} {counts[s]}" for s in shown) + f" — total {len(dirs)}")
    return "\n".join(lines) + "\n\n" + not_done_text(root, states)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/collect.py", description=__doc__.splitlines()[0])
    parser.add_argument("root", help="directory holding run dirs (e.g. runs/demo)")
    parser.add_argument("--metric", default="top1_err", choices=METRIC_NAMES)
    parser.add_argument("--epoch", default="final", choices=EPOCHS,
                        help="final: the last epoch; best: the epoch of lowest test top1_err (selects on the test set)")
    parser.add_argument("--status", action="store_true", help="only each grid's run counts and unfinished runs")
    args = parser.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    try:
        print(status_text(args.root) if args.status else report(args.root, args.metric, args.epoch), end="")
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
