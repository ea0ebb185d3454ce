"""Turn run dirs into the papers' tables: `python launch/collect.py DIR [--metric M] [--epoch final|best] [--status]`.

Runs are found as DIR/**/summary.json, wherever they lie, and grouped by what each summary records
(`cskd.rundir.read_summary`: dataset, model, label, seed), never by their paths. As in the CS-KD
paper's Tables 1-3, each model gets a table with one row per method (cross-entropy first) and one
column per dataset; a cell is mean ± sample std (ddof=1) over the seeds with the relative change
vs. the cross-entropy row in parentheses, and the number of seeds behind it ("21.99±0.13 (-11.0%)
n=3"). A grid whose grid.json declares the paper table(s) it reproduces (`"paper": {"paper": "cskd2020",
"table": "1"}`, or a list of such) is reported apart, with the paper's numbers beside ours and the cells
that differ by more than chance marked, for every metric of that table and both epochs (launch/paper.py).

Ensembles: each (dataset, model, label) group of >= 2 finished runs is also scored as an ensemble, the
mean of its runs' softmax probabilities (cskd.ensemble, from the test logits each run dir keeps; each
file is loaded once), at the final epochs and at the runs' best epochs, in a section "Ensembles
(average of the seeds' softmax)" and in results.csv (epoch `final-ensemble` / `best-ensemble`, every
metric but r_at_1, std empty, n = runs). A declared table of ensembles (PS-KD Table 3) is compared with
these. A group that cannot be ensembled (a run finished before test logits were kept, say) is listed
there with the reason; a DIR whose runs keep no test logits at all has no such section.

Below the tables come the runs that are not done, by state, from the launcher's grid.json manifests
(launch/runs.py). The report is also written to DIR/results.md, with DIR/results.csv (both epochs; with
the columns of `launch.paper.COLUMNS` when a grid declares a paper table) and one
reliability diagram per dataset/model with the methods overlaid (DIR/reliability_<dataset>_<model>.png).
DIR/report.html (launch/report_html.py) is the same report as one self-contained page, with the plain tables
at both epochs, each grid's run counts, the machines, and every figure embedded (also the papers' figures of
launch/figures.py, and why those the runs allow only in part were not drawn). `--status` prints only each
grid's run counts and its unfinished runs.

Damaged inputs never hide the table. A summary.json or grid.json that cannot be read or lacks what
a table needs is left out and listed, with its path and what is wrong, under "Unreadable files" at
the end of the report (its run counts as `unknown` in the run lists); a file of the report that
cannot be written (a read-only DIR) is skipped. Either way the command still prints the report and
exits 0, with one `warning: ...` line on stderr for each kind of problem. Exit status 2 is for
errors in the command itself (DIR is not a directory, an unknown --metric).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from cskd import rundir
from cskd.ensemble import METRICS as ENSEMBLE_METRICS
from cskd.ensemble import ensemble_runs
from cskd.errors import CskdError, RunDirError, one_line
from cskd.fileio import write_text
from cskd.metrics import METRIC_NAMES
from cskd.plots import reliability_overlay
from cskd.rundir import Summary, read_summary
from launch import paper, report_html, runs
from launch.figures import make_figures
from launch.report_html import Figure
from launch.runs import RunStatus

BASELINE = "ce"
EPOCHS = ("final", "best")
# The units of cskd.metrics' conventions, for the table headings.
UNITS = {"top1_err": "%", "top5_err": "%", "ece": "%", "r_at_1": "%", "nll": "nats", "aurc": "×1000",
         "eaurc": "×1000"}
NOT_DONE = ("missing", "pending", "running", "failed", "cancelled", "unknown")
COUNTED = ("done", "pending", "running", "failed", "cancelled", "missing")  # 'unknown' only when it occurs
ENSEMBLE_OF = dict(zip(EPOCHS, paper.ENSEMBLE_EPOCHS))  # final -> final-ensemble: the ensemble of the final epochs
ENSEMBLES = "Ensembles (average of the seeds' softmax)"
CELLS = (f"Mean ± sample std (ddof=1) over seeds, n = number of seeds (std 0.00 when n=1); in parentheses the "
         f"relative change of the mean vs. the {BASELINE} row of the same dataset and model.")


@dataclass
class Unreadable:
    """A summary.json or grid.json left out of the report, and why."""
    path: Path
    reason: str


def read_results(root: str | Path) -> tuple[list[Summary], list[Unreadable]]:
    """Every finished run (an atomically written summary.json) under `root`, and the summary.json
    files that cannot be read or lack what the tables need."""
    results, bad = [], []
    for path in sorted(Path(root).rglob(rundir.SUMMARY)):
        try:
            results.append(_usable(read_summary(path)))
        except CskdError as e:
            bad.append(Unreadable(path, _reason(e, path)))
    return results, bad


def find_results(root: str | Path) -> list[Summary]:
    """The readable summaries under `root` (`read_results` also says which were not)."""
    return read_results(root)[0]


def _usable(summary: Summary) -> Summary:
    """`summary` if the report can use all of it (its data record and reliability bins), else a RunDirError."""
    data = summary.raw.get("data")
    if data is not None and not isinstance(data, dict):
        raise RunDirError(f"{summary.path}: 'data' is not a JSON object; delete it to re-run the run")
    bins = summary.reliability
    if bins is not None and not _valid_bins(bins):
        raise RunDirError(f"{summary.path}: 'reliability' lacks equal-length lists edges/count/accuracy/confidence; "
                          f"delete it to re-run the run")
    return summary


def _valid_bins(bins) -> bool:
    if not isinstance(bins, dict) or not all(isinstance(bins.get(k), list) for k in
                                             ("edges", "count", "accuracy", "confidence")):
        return False
    n = len(bins["count"])
    numbers = all(isinstance(c, (int, float)) for c in bins["count"])
    return numbers and len(bins["accuracy"]) == len(bins["confidence"]) == n and len(bins["edges"]) == n + 1


def _reason(error: Exception, path: Path) -> str:
    """The error's message without the path it starts with (the report shows the path already)."""
    return str(error).removeprefix(str(path)).lstrip(" :")


def _label_order(label: str) -> tuple:
    return (label != BASELINE, label)


def aggregate(results: list[Summary], metric: str, epochs=EPOCHS) -> list[dict]:
    """One row per (dataset, model, label, epoch kind): mean, std, n, relative change vs. ce. Runs that do
    not record `metric` (one newer than them) are not counted: a group of only such runs has mean None, n 0."""
    groups: dict[tuple, list[float]] = {}
    for r in results:
        for kind in epochs:
            value = getattr(r, kind).get(metric)
            values = groups.setdefault((r.dataset, r.model, r.label, kind), [])
            if isinstance(value, (int, float)):
                values.append(float(value))
    rows = []
    for (dataset, model, label, kind), values in sorted(groups.items(), key=_row_order):
        mean = statistics.fmean(values) if values else None
        std = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
        base = groups.get((dataset, model, BASELINE, kind))
        rel = None
        if base and values and label != BASELINE and statistics.fmean(base) != 0:
            rel = 100.0 * (mean - statistics.fmean(base)) / statistics.fmean(base)
        rows.append({"dataset": dataset, "model": model, "method": label, "epoch": kind, "metric": metric,
                     "mean": mean, "std": std, "n": len(values), "rel_vs_ce_pct": rel})
    return rows


def _row_order(item: tuple) -> tuple:
    """Rows by dataset, model, label (ce first) and epoch kind; `item` is ((dataset, model, label, kind), ...)."""
    (dataset, model, label, kind), _ = item
    return dataset, model, _label_order(label), kind


def _cell(row: dict) -> str:
    if row["mean"] is None:
        return "–"
    rel = f" ({row['rel_vs_ce_pct']:+.1f}%)" if row["rel_vs_ce_pct"] is not None else ""
    std = "" if row["std"] is None else f"±{row['std']:.2f}"  # an ensemble has none
    return f"{row['mean']:.2f}{std}{rel} n={row['n']}"


def markdown_tables(rows: list[dict], epoch: str = "final") -> str:
    """One table per model, as in the CS-KD paper: a row per method (ce first), a column per dataset."""
    rows = [r for r in rows if r["epoch"] == epoch]
    blocks = []
    for model in sorted({r["model"] for r in rows}):
        mine = [r for r in rows if r["model"] == model]
        datasets = sorted({r["dataset"] for r in mine})
        cells = {(r["method"], r["dataset"]): _cell(r) for r in mine}
        metric = mine[0]["metric"]
        lines = [f"**{model}** — {metric} ({UNITS[metric]}), {paper.epoch_text(epoch)}", "",
                 "| method | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
        for label in sorted({r["method"] for r in mine}, key=_label_order):
            lines.append(f"| {label} | " + " | ".join(cells.get((label, d), "–") for d in datasets) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


class Ensembles:
    """The ensembles (`cskd.ensemble.ensemble_runs`) of groups of finished runs, each computed once per epoch kind,
    so that a report loads each test logits file once; a group that cannot be ensembled keeps the reason."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[tuple, dict | str] = {}
        self.names: dict[tuple, str] = {}

    def of(self, runs: list[Summary], epoch: str) -> dict | str:
        """The ensemble of `runs` at their `epoch` (final/best): ensemble_runs' dict, or why there is none."""
        dirs = tuple(sorted(r.path.parent for r in runs))
        if (dirs, epoch) not in self.results:
            self.names[dirs] = f"{runs[0].dataset} / {runs[0].model} / {runs[0].label}"
            try:
                self.results[(dirs, epoch)] = ensemble_runs(list(dirs), epoch)
            except CskdError as e:
                self.results[(dirs, epoch)] = str(e).replace(f"{self.root}{os.sep}", "")
        return self.results[(dirs, epoch)]

    def failed(self) -> list[str]:
        """One line per group not ensembled at some epoch kind: the group, its runs, the kinds and the reason."""
        lines = []
        for dirs, name in sorted(self.names.items(), key=lambda kv: kv[1]):
            why = {e: self.results[(dirs, e)] for e in EPOCHS if isinstance(self.results.get((dirs, e)), str)}
            if why:
                lines.append(f"- {one_line(name)} ({len(dirs)} runs), {' and '.join(why)}: {next(iter(why.values()))}")
        return lines


def ensemble_rows(results: list[Summary], metric: str, ensembles: Ensembles, single: bool = False) -> list[dict]:
    """`aggregate`'s rows for the ensembles of the (dataset, model, label) groups of >= 2 runs (`single`: also
    of one run, without a value), epoch `final-ensemble`/`best-ensemble`: mean = the ensemble's `metric`
    (None where the group cannot be ensembled), std None, n = runs ensembled, relative change vs. the ce
    ensemble."""
    groups: dict[tuple, list[Summary]] = {}
    for r in results:
        groups.setdefault((r.dataset, r.model, r.label), []).append(r)
    values: dict[tuple, tuple[float | None, int]] = {}
    for key, runs in groups.items():
        if len(runs) < 2 and not single:
            continue
        for epoch in EPOCHS:
            result = ensembles.of(runs, epoch) if len(runs) > 1 else None
            value = result.get(metric) if isinstance(result, dict) else None
            values[(*key, ENSEMBLE_OF[epoch])] = (value, len(runs)) if isinstance(value, (int, float)) else (None, 0)
    rows = []
    for (dataset, model, label, kind), (value, n) in sorted(values.items(), key=_row_order):
        base = values.get((dataset, model, BASELINE, kind), (None, 0))[0]
        rel = 100.0 * (value - base) / base if label != BASELINE and value is not None and base else None
        rows.append({"dataset": dataset, "model": model, "method": label, "epoch": kind, "metric": metric,
                     "mean": value, "std": None, "n": n, "rel_vs_ce_pct": rel})
    return rows


def ensemble_text(rows: list[dict], metric: str, epoch: str, failed: list[str]) -> str:
    """The report's ensemble section: `markdown_tables` of the ensembles' `metric` at `epoch`, what the cells
    are, and the groups not ensembled."""
    mine = [r for r in rows if r["metric"] == metric and r["epoch"] == ENSEMBLE_OF[epoch]]
    if metric not in ENSEMBLE_METRICS:
        body = (f"{metric} is not defined for an ensemble: it needs one model's test features (the ensembles' other "
                f"metrics: --metric {', '.join(ENSEMBLE_METRICS)}).\n")
    else:
        body = markdown_tables(mine, ENSEMBLE_OF[epoch]) if mine else "No group could be ensembled.\n"
    text = (f"**{ENSEMBLES}** — each (dataset, model, method) group of ≥ 2 finished runs as one model predicting "
            f"the mean of the runs' softmax probabilities (python -m cskd.ensemble); at the final epoch = of the "
            f"runs' final epochs, at the best epoch = of each run's own best epoch.\n\n{body}\nCells: the ensemble's "
            f"value, in parentheses its relative change vs. the {BASELINE} ensemble of the same dataset and model, "
            f"n = runs ensembled (no std: one ensemble per group). results.csv has every metric but r_at_1 of every "
            f"ensemble at both epochs (epoch final-ensemble / best-ensemble).\n")
    if failed:
        text += f"\nNot ensembled ({len(failed)} group(s)):\n" + "\n".join(failed) + "\n"
    return text


def _keeps_logits(results: list[Summary]) -> bool:
    """Whether any run dir of `results` keeps test logits (runs from before they were kept have none)."""
    return any((r.path.parent / name).is_file() for r in results for name in (rundir.TEST_LOGITS,
                                                                               rundir.BEST_TEST_LOGITS))


def footnote(results: list[Summary], cells: str = CELLS) -> str:
    """What the cells mean, the machine(s) behind them, and any dataset column that pools conversions."""
    devices = sorted({r.device for r in results})
    text = (f"{cells} final = last epoch; best = epoch of lowest test top1_err, i.e. selected on the test set "
            f"(optimistic, as the reference code reports). Machine(s): {'; '.join(devices)}.\n")
    conversions: dict[str, set[str]] = {}
    for r in results:
        conversions.setdefault(r.dataset, set()).add(r.data_identity)
    for dataset, identities in sorted(conversions.items()):
        if len(identities) > 1:
            text += (f"\nWarning: the {dataset} column pools runs on {len(identities)} different conversions of "
                     f"{dataset} (different .beton sha256s in their summary.json `data`); compare like with like.\n")
    return text


def csv_text(rows: list[dict], with_paper: bool = False) -> str:
    """One line per row of `aggregate`; `with_paper`: also the columns `launch.paper.annotate` adds."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=["dataset", "model", "method", "metric", "epoch", "mean", "std", "n",
                                             "rel_vs_ce_pct"] + (paper.COLUMNS if with_paper else []),
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_grids(root: str | Path, manifests: tuple[list[tuple[Path, dict]], list[Unreadable]] | None = None
               ) -> tuple[list[tuple[str, Path, list[Path]]], list[Unreadable]]:
    """(name, grid root, run dirs) per readable grid.json under `root` (without any: the run dirs found on
    disk), and the grid.json files that cannot be read; `manifests`: `read_manifests(root)`, if read already."""
    manifests, bad = manifests or read_manifests(root)
    grids = [(str(manifest.get("name", path.parent)), path.parent, [path.parent / e["dir"] for e in manifest["runs"]])
             for path, manifest in manifests]
    if grids:
        return grids, bad
    dirs = sorted({p.parent for name in (rundir.CONFIG, rundir.SUMMARY) for p in Path(root).rglob(name)})
    return ([("(no grid.json; run dirs on disk)", Path(root), dirs)] if dirs else []), bad


def read_manifests(root: str | Path) -> tuple[list[tuple[Path, dict]], list[Unreadable]]:
    """(path, manifest) per readable grid.json under `root`, and the grid.json files that cannot be read."""
    manifests, bad = [], []
    for path in sorted(Path(root).rglob(runs.MANIFEST)):
        try:
            manifests.append((path, _read_manifest(path)))
        except (OSError, ValueError) as e:
            bad.append(Unreadable(path, f"{e}; re-run the grid's launch command to write it again"))
    return manifests, bad


def _read_manifest(path: Path) -> dict:
    """A grid.json as launch/runs.py writes it, or a ValueError saying what is wrong with it."""
    try:
        manifest = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"is not valid JSON ({e})") from None
    entries = manifest.get("runs") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("dir"), str)
                                                for e in entries):
        raise ValueError("is not a grid manifest (an object with 'runs', each with a 'dir')")
    return manifest


def find_grids(root: str | Path) -> list[tuple[str, Path, list[Path]]]:
    """(name, grid root, run dirs) per readable grid.json under `root`; without any, the run dirs found on disk."""
    return read_grids(root)[0]


def run_statuses(grids: list[tuple[str, Path, list[Path]]], unreadable: list[Unreadable] = ()
                 ) -> dict[Path, RunStatus]:
    """launch.runs' status of every run dir of `grids` (one Slurm query for all); a run whose
    summary.json is unreadable is `unknown`, not done."""
    states = runs.statuses(list(dict.fromkeys(d for _, _, ds in grids for d in ds)))
    for bad in unreadable:
        if bad.path.name == rundir.SUMMARY and bad.path.parent in states:
            states[bad.path.parent] = RunStatus("unknown", f"{rundir.SUMMARY} is unreadable: {bad.reason}")
    return states


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
        path = Path(root) / f"reliability_{_file_part(dataset)}_{_file_part(model)}.png"
        reliability_overlay(curves, path, f"{dataset} / {model}, final epoch, seeds pooled")
        paths.append(path)
    return paths


def _file_part(name: str) -> str:
    """A summary's dataset or model name as part of a file name: a '/' or '..' in it must not lead elsewhere."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name).replace("..", "_") or "_"


@dataclass
class Report:
    """A report's text (what results.md holds), the files it was written to and the inputs it left out."""
    text: str
    written: list[Path] = field(default_factory=list)
    unreadable: list[Unreadable] = field(default_factory=list)


def report(root: str | Path, metric: str = "top1_err", epoch: str = "final", out_stem: str = "results") -> str:
    """Print-ready tables and not-done runs of `root`; also writes root/<stem>.md, root/<stem>.csv and the PNGs."""
    return make_report(root, metric, epoch, out_stem).text


def make_report(root: str | Path, metric: str = "top1_err", epoch: str = "final", out_stem: str = "results",
                with_figures: bool = True) -> Report:
    """`report`, also saying which files were written. Unreadable inputs are listed in the text and
    files that cannot be written are skipped, each kind with one `warning:` line on stderr.
    `with_figures=False` leaves the papers' figures (`paper_figures`) out of report.html."""
    root = Path(root)
    manifests = read_manifests(root)
    (results, bad_summaries), (grids, bad_grids) = read_results(root), read_grids(root, manifests)
    unreadable = bad_summaries + bad_grids
    if not results and not grids and not unreadable:
        return Report(f"no runs (summary.json, config.yaml or grid.json) under {root}\n")
    declared, bad_declarations = paper.read_declarations(root, manifests[0])
    plain, by_table = paper.split_by_paper(results, declared)
    rows = aggregate(plain, metric)
    ensemble_tables = any(paper.load_tables()[key].ensemble for key in by_table)
    ensembles = Ensembles(root)
    ensembled = []
    if ensemble_tables or _keeps_logits(results):
        ensembled = [row for m in ENSEMBLE_METRICS for row in ensemble_rows(results, m, ensembles)]
    paper_blocks, paper_rows = paper.tables(by_table, aggregate, lambda group, m: ensemble_rows(group, m, ensembles,
                                                                                                single=True))
    blocks = [markdown_tables(rows, epoch) + "\n" + footnote(plain)] if plain else []
    if paper_blocks:
        reproduced = [s for _, group in by_table.values() for s in group]
        blocks.append("\n".join(paper_blocks) + "\n" + footnote(reproduced, paper.legend(ensemble_tables)))
    ensembled = [r for r in ensembled if r["mean"] is not None]
    if ensembles.results:
        blocks.append(ensemble_text(ensembled, metric, epoch, ensembles.failed()))
    tables = "\n".join(blocks) or f"no finished runs (summary.json) under {root}\n"
    states = run_statuses(grids, unreadable)
    parts = (tables, paper.declarations_text(bad_declarations), not_done_text(root, states),
             unreadable_text(root, unreadable))
    text = "\n".join(t for t in parts if t)
    if bad_declarations:
        _warn(f"{len(bad_declarations)} grid.json paper declaration(s) under {root} cannot be used "
              f"({'; '.join(bad_declarations)}); their runs are reported without the paper's numbers")
    if unreadable:
        _warn(f"{len(unreadable)} summary.json/grid.json file(s) under {root} could not be read; they are listed "
              f"under 'Unreadable files' in the report")
    csv_rows = csv_text(rows + ensembled + paper_rows, with_paper=bool(paper_rows))
    other = "best" if epoch == "final" else "final"  # results.md's plain tables are at `epoch` only; the page has both
    page = partial(report_html.write_report_html, root, results, text, other_epoch=other,
                   other_tables=(markdown_tables(rows, other) + "\n" + footnote(plain)) if plain else "",
                   grids=grid_counts(root, grids, states))
    return Report(text, _write_files(root, out_stem, text, csv_rows, results, page, with_figures), unreadable)


def unreadable_text(root: Path, unreadable: list[Unreadable]) -> str:
    if not unreadable:
        return ""
    lines = [f"**Unreadable files** ({len(unreadable)}), left out of the tables above:"]
    lines += [f"- `{one_line(os.path.relpath(u.path, root))}`: {one_line(u.reason)}" for u in unreadable]
    return "\n".join(lines) + "\n"


def _write_files(root: Path, out_stem: str, text: str, csv_rows: str, results: list[Summary],
                 page: Callable[..., Path], with_figures: bool) -> list[Path]:
    """Write the report's files, report.html last (`page(figures=..., not_drawn=...)`, the figures written first);
    those that cannot be written (a read-only root) are named in one warning."""
    written, failed = [], []
    for path, write in ((root / f"{out_stem}.md", lambda p: write_text(p, text)),
                        (root / f"{out_stem}.csv", lambda p: write_text(p, csv_rows))):
        try:
            write(path)
            written.append(path)
        except OSError as e:
            failed.append((path, e))
    reliability = []
    try:
        reliability = write_reliability(root, results)
        written += reliability
    except OSError as e:
        failed.append((Path(e.filename or root / "reliability_*.png"), e))
    except ValueError as e:  # seeds with different numbers of bins (ece_bins) cannot be pooled into one curve
        failed.append((root / "reliability_*.png", e))
    try:
        figures, not_drawn = paper_figures(root) if with_figures else ([], [])
        written.append(page(figures=figures + report_html.reliability_figures(reliability), not_drawn=not_drawn))
    except OSError as e:
        failed.append((root / report_html.NAME, e))
    if failed:
        why = getattr(failed[0][1], "strerror", None) or failed[0][1]
        _warn(f"could not write {', '.join(str(p) for p, _ in failed)} ({why}); the report is printed only")
    return written


def paper_figures(root: Path) -> tuple[list[Figure], list[str]]:
    """The papers' figures of the runs under `root` as PNGs (`launch.figures.make_figures`), and the reasons of
    the figures the runs allow only in part; figures that cannot be made at all are one warning, and report.html
    goes without them."""
    skipped: list[str] = []
    try:
        return make_figures(root, fmt="png", skipped=skipped), skipped
    except (CskdError, OSError, ValueError) as e:
        _warn(f"the papers' figures are left out of {report_html.NAME}: {e}")
        return [], []


def _warn(message: str) -> None:
    print(f"warning: {one_line(message)}", file=sys.stderr, flush=True)


def grid_counts(root: Path, grids: list[tuple[str, Path, list[Path]]], states: dict[Path, RunStatus]
                ) -> list[tuple[str, dict[str, int]]]:
    """Per grid: "name (its path under root)" and its number of runs in each state (COUNTED, then unknown where
    there are any); the counts add up to the grid's runs."""
    counted = []
    for name, grid_root, dirs in grids:
        counts = {s: sum(states[d].state == s for d in dirs) for s in runs.STATES}
        shown = COUNTED + (("unknown",) if counts["unknown"] else ())
        counted.append((f"{name} ({os.path.relpath(grid_root, root)})", {s: counts[s] for s in shown}))
    return counted


def status_text(root: str | Path) -> str:
    """Per grid under `root`: how many runs are in each state, then the runs that are not done."""
    root = Path(root)
    (grids, bad_grids), (_, bad_summaries) = read_grids(root), read_results(root)
    unreadable = bad_summaries + bad_grids
    if not grids and not unreadable:
        return f"no grid.json and no run dirs under {root}\n"
    states = run_statuses(grids, unreadable)
    lines = [f"{grid}: " + ", ".join(f"{s} {n}" for s, n in counts.items()) + f" — total {sum(counts.values())}"
             for grid, counts in grid_counts(root, grids, states)]
    return "\n".join(lines) + "\n\n" + "\n".join(t for t in (not_done_text(root, states),
                                                             unreadable_text(root, unreadable)) if t)


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
