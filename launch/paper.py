"""The papers' numbers beside ours, for the grids that reproduce a paper table.

A grid whose grid.json declares `"paper": {"paper": "cskd2020", "table": "1"}` (or several tables, as
a list of such mappings: `[{"paper": "pskd2021", "table": "1"}, {"paper": "pskd2021", "table": "3"}]`)
is reported, per model and per metric of each table, for the final and the best epoch: a row per
method, a column per dataset, each cell ours vs the paper's (launch/paper_numbers.yaml), the cells
that differ by more than chance marked ⚠ (`compare`). A run matches a paper record by (dataset,
model, method, metric), its method being the run's label where the table has that name and else the
summary's method: a label such as `cskd-lam3` names a hyperparameter variant of cskd, compared with
cskd. A table of ensembles (PS-KD Table 3, agg `ensemble_3models`) is compared with the ensemble of
our seeds (launch/collect.py, cskd.ensemble), not with their mean.
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from cskd.errors import one_line
from cskd.rundir import Summary

NUMBERS = Path(__file__).with_name("paper_numbers.yaml")
EPOCHS = ("final", "best")
# The epoch kinds of an ensemble's rows (launch/collect.py): the ensemble of the runs' final / best epochs.
ENSEMBLE_EPOCHS = ("final-ensemble", "best-ensemble")
ENSEMBLE_AGG = "ensemble_3models"
MARK = "⚠"
# Seeds behind a printed mean ± std; an ensemble or an unstated count gives no n, hence no standard error.
RUNS = {"mean_std_3seeds": 3, "mean_3runs": 3}
# How far ours may be from a paper number when there is no standard error to test against, per unit: about
# the seed-to-seed std the CS-KD tables print for the % metrics (0.03-2.5 points, most under 1).
TOLERANCE = {"%": 1.0, "nats": 0.05, "×1000": 3.0, "BLEU": 0.5}
UNIT_NAMES = {"%": "percentage points (% metrics)", "nats": "nats (NLL)", "×1000": "×10⁻³ (AURC)", "BLEU": "BLEU"}
COLUMNS = ["paper", "paper_mean", "paper_std", "paper_n", "diff", "threshold", "flag"]


@dataclass(frozen=True)
class Record:
    """One printed number: mean, std (None if not printed), n (seeds behind it), the recipe's epochs
    (None if unknown) and whether it is the score of an ensemble of models (not a mean over seeds)."""
    mean: float
    std: float | None
    n: int | None
    epochs: int | None
    ensemble: bool = False


@dataclass
class PaperTable:
    """A paper table's numbers, keyed (dataset, model, method, metric), in the paper's order."""
    paper: str
    table: str
    citation: str
    units: dict[str, str]
    records: dict[tuple[str, str, str, str], Record]

    @property
    def title(self) -> str:
        """How the report names the table: "cskd2020 Table 1"."""
        return f"{self.paper} Table {self.table}"

    def order(self, field: int) -> list[str]:
        """The datasets (0), models (1), methods (2) or metrics (3) in the order the paper prints them."""
        return list(dict.fromkeys(key[field] for key in self.records))

    @property
    def ensemble(self) -> bool:
        """A table of ensembles' scores (PS-KD Table 3): compared with the ensemble of our seeds."""
        return bool(self.records) and all(r.ensemble for r in self.records.values())

    @property
    def epochs(self) -> tuple[str, ...]:
        """The epoch kinds of our rows this table is compared with."""
        return ENSEMBLE_EPOCHS if self.ensemble else EPOCHS

    def find(self, dataset: str, model: str, names: tuple[str, ...], metric: str) -> Record | None:
        """The record of this cell for the first of `names` (label, then method) that has one."""
        return next((self.records[key] for key in ((dataset, model, name, metric) for name in names)
                     if key in self.records), None)


@cache
def load_tables(path: Path = NUMBERS) -> dict[tuple[str, str], PaperTable]:
    """Every table of the paper numbers file, keyed (paper, table)."""
    # libyaml's loader where PyYAML has it: the pure-Python one takes most of a second over 571 records
    data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    tables: dict[tuple[str, str], PaperTable] = {}
    for r in data["records"]:
        paper, table = str(r["paper"]), str(r["table"])
        if (paper, table) not in tables:
            ref = data["papers"][paper]
            tables[(paper, table)] = PaperTable(paper, table, f"\"{ref['title']}\", {ref['venue']}", data["units"], {})
        tables[(paper, table)].records[(r["dataset"], r["model"], r["method"], r["metric"])] = Record(
            float(r["mean"]), None if r["std"] is None else float(r["std"]), RUNS.get(r["agg"]), r["epochs"],
            r["agg"] == ENSEMBLE_AGG)
    return tables


def declaration(manifest: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """A grid.json's `paper` declaration: the (paper, table)s it names that have numbers, in its order, and what
    is wrong with the rest. It is one {paper, table} mapping, a list of them, or null (no table: ([], []))."""
    declared = manifest.get("paper")
    if declared is None:
        return [], []
    entries = declared if isinstance(declared, list) else [declared]
    if not entries or not all(isinstance(d, dict) and all(isinstance(d.get(k), (str, int)) for k in ("paper", "table"))
                              for d in entries):
        return [], [f"'paper' is {str(declared)[:60]}, not {{paper, table}} or a list of them"]
    keys, problems = [], []
    for key in dict.fromkeys((str(d["paper"]), str(d["table"])) for d in entries):
        if key in load_tables():
            keys.append(key)
        else:
            problems.append(f"{key[0]} table {key[1]} has no numbers in {NUMBERS.name}")
    return keys, problems


def read_declarations(root: Path, manifests: list[tuple[Path, dict]]
                      ) -> tuple[dict[Path, list[tuple[tuple[str, str], str]]], list[str]]:
    """{run dir (resolved): [((paper, table), grid name), ...]} for the runs of each grid.json (of `manifests`,
    launch.collect's) that declares paper tables, and what is wrong with each declared table that names none."""
    declared: dict[Path, list[tuple[tuple[str, str], str]]] = {}
    problems = []
    for path, manifest in manifests:
        keys, wrong = declaration(manifest)
        problems += [f"{os.path.relpath(path, root)}: {w}" for w in wrong]
        grid = str(manifest.get("name", path.parent))
        for key in keys:
            for e in manifest["runs"]:
                hits = declared.setdefault((path.parent / e["dir"]).resolve(), [])
                if (key, grid) not in hits:
                    hits.append((key, grid))
    return declared, problems


def split_by_paper(results: list[Summary], declared: dict[Path, list[tuple[tuple[str, str], str]]]
                   ) -> tuple[list[Summary], dict[tuple[str, str], tuple[list[str], list[Summary]]]]:
    """The runs of no paper grid, and per declared (paper, table) its grids' names and runs (a run of a grid that
    declares several tables is in each)."""
    plain, by_table = [], {}
    for r in results:
        hits = declared.get(r.path.parent.resolve())
        if not hits:
            plain.append(r)
            continue
        for key in dict.fromkeys(key for key, _ in hits):
            by_table.setdefault(key, ([], []))[1].append(r)
        for key, grid in hits:
            grids = by_table[key][0]
            if grid not in grids:
                grids.append(grid)
    return plain, by_table


def declarations_text(problems: list[str]) -> str:
    """The report's list of the paper declarations that could not be used."""
    if not problems:
        return ""
    head = (f"**Paper declarations not used** ({len(problems)}); their runs are in the tables without the paper's "
            f"numbers:")
    return "\n".join([head] + [f"- {one_line(p)}" for p in problems]) + "\n"


def compare(mean: float | None, std: float | None, n: int, metric: str, table: PaperTable,
            record: Record | None) -> tuple[float | None, float | None, bool | None]:
    """(ours - paper, the threshold, whether |ours - paper| exceeds it); Nones where a side has no number.

    With a std on both sides (ours over n >= 2 seeds, the paper's over its n) the threshold is two
    standard errors of the difference, 2 * sqrt(s_ours^2/n_ours + s_paper^2/n_paper); otherwise the
    unit's fixed TOLERANCE, since one side's scatter is unknown (as for an ensemble, which has no std)."""
    if record is None or mean is None:
        return None, None, None
    diff = mean - record.mean
    if record.std is not None and record.n and n > 1 and std is not None:
        threshold = 2.0 * math.sqrt(std ** 2 / n + record.std ** 2 / record.n)
    else:
        threshold = TOLERANCE.get(table.units.get(metric, ""))
    return diff, threshold, None if threshold is None else abs(diff) > threshold


def annotate(rows: list[dict], table: PaperTable, methods_of: dict[str, set[str]]) -> list[dict]:
    """`rows` (launch.collect.aggregate's, method = the run label) with the paper's number and the comparison;
    `methods_of` maps each label to the summaries' methods behind it."""
    for row in rows:
        names = (row["method"], *sorted(methods_of.get(row["method"], ())))
        record = table.find(row["dataset"], row["model"], names, row["metric"])
        diff, threshold, flag = compare(row["mean"], row["std"], row["n"], row["metric"], table, record)
        row.update(paper=table.title, paper_mean=record and record.mean, paper_std=record and record.std,
                   paper_n=record and record.n, diff=diff, threshold=threshold,
                   flag=None if flag is None else int(flag))
    return rows


def tables(by_table: dict[tuple[str, str], tuple[list[str], list[Summary]]],
           aggregate: Callable[[list[Summary], str], list[dict]],
           ensembles: Callable[[list[Summary], str], list[dict]] | None = None) -> tuple[list[str], list[dict]]:
    """A `section` per declared paper table, and its rows (every metric of the table, both epochs, with the
    paper's numbers) for the CSV. `aggregate` and `ensembles` are launch.collect's (which imports this module):
    the rows of the seeds' means, and those of their ensembles (epochs `ENSEMBLE_EPOCHS`), which a table of
    ensembles is compared with."""
    blocks, all_rows = [], []
    for key, (grids, group) in sorted(by_table.items()):
        table = load_tables()[key]
        methods_of: dict[str, set[str]] = {}
        for s in group:
            methods_of.setdefault(s.label, set()).add(s.method)
        rows_of = ensembles if table.ensemble and ensembles is not None else aggregate
        rows = annotate([row for metric in table.order(3) for row in rows_of(group, metric)], table, methods_of)
        epochs = {s.raw["epochs"] for s in group if isinstance(s.raw.get("epochs"), int)}
        blocks.append(section(table, grids, rows, methods_of, epochs))
        all_rows += rows
    return blocks, all_rows


def epoch_text(kind: str) -> str:
    """How a heading names an epoch kind: "final epoch", or "final epoch (ensemble)" for an ensemble's."""
    return f"{kind.removesuffix('-ensemble')} epoch" + (" (ensemble)" if kind.endswith("-ensemble") else "")


def _cell(row: dict) -> str:
    std = "" if row["std"] is None else f"±{row['std']:.2f}"  # an ensemble has none
    ours = "–" if row["mean"] is None else f"{row['mean']:.2f}{std} n={row['n']}"
    if row["paper_mean"] is None:
        return ours
    paper = f"{row['paper_mean']:.2f}" + ("" if row["paper_std"] is None else f"±{row['paper_std']:.2f}")
    diff = "" if row["diff"] is None else f" ({row['diff']:+.2f})"
    return f"{ours} vs {paper}{diff}" + (f" {MARK}" if row["flag"] else "")


def _ordered(names, preferred: list[str]) -> list[str]:
    """`names` in the paper's order, those the paper lacks after them, alphabetically."""
    rank = {name: i for i, name in enumerate(preferred)}
    return sorted(set(names), key=lambda name: (rank.get(name, len(rank)), name))


def section(table: PaperTable, grids: list[str], rows: list[dict], methods_of: dict[str, set[str]],
            our_epochs: set[int]) -> str:
    """The report of the runs of the grids that reproduce `table` (`annotate`d rows): a headline with the
    number of flagged cells per epoch, then per model and metric one table per epoch."""
    compared = {e: [r for r in rows if r["epoch"] == e and r["flag"] is not None] for e in table.epochs}
    counts = ", ".join(f"{sum(r['flag'] for r in compared[e])} of {len(compared[e])} at the {epoch_text(e)}"
                       for e in table.epochs)
    paper_epochs = sorted({r.epochs for r in table.records.values() if r.epochs is not None})
    ours = (" Ours: the ensemble of each method's seeds (the mean of their softmax probabilities), n = runs."
            if table.ensemble else "")
    headline = (f"**{table.title}** — {table.citation}. Grid(s): {', '.join(grids)}. Training epochs: paper "
                f"{'/'.join(map(str, paper_epochs)) or '?'}, ours {'/'.join(map(str, sorted(our_epochs))) or '?'}."
                f"{ours} Cells marked {MARK} of those with a paper number: {counts}.")
    blocks = [headline]
    rank = {name: i for i, name in enumerate(table.order(2))}

    def row_order(label: str) -> tuple:  # the paper's row of the label's method; variants next to it
        return min(rank.get(name, len(rank)) for name in (label, *methods_of.get(label, ()))), label

    for model in _ordered({r["model"] for r in rows}, table.order(1)):
        mine = [r for r in rows if r["model"] == model]
        datasets = _ordered({r["dataset"] for r in mine}, table.order(0))
        labels = sorted({r["method"] for r in mine}, key=row_order)
        for metric in _ordered({r["metric"] for r in mine}, table.order(3)):
            for epoch in table.epochs:
                cells = {(r["method"], r["dataset"]): _cell(r) for r in mine
                         if r["metric"] == metric and r["epoch"] == epoch}
                heading = (f"**{model}** — {metric} ({table.units.get(metric, '?')}), {epoch_text(epoch)}: ours vs "
                           f"{table.title}")
                lines = [heading, "", "| method | " + " | ".join(datasets) + " |", "|---" * (len(datasets) + 1) + "|"]
                lines += [f"| {label} | " + " | ".join(cells.get((label, d), "–") for d in datasets) + " |"
                          for label in labels]
                blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def legend(ensembles: bool = False) -> str:
    """What the cells of the paper tables mean and when one is marked; `ensembles`: also those of a table of
    ensembles."""
    tolerances = ", ".join(f"{value:g} {UNIT_NAMES[unit]}" for unit, value in TOLERANCE.items())
    ensemble = (f" In a table of ensembles (agg {ENSEMBLE_AGG}), ours is the ensemble of our n seeds (the mean of "
                f"their softmax probabilities; (ensemble) = of each seed's final or best epoch), without a std, so "
                f"{MARK} uses the fixed tolerance." if ensembles else "")
    return (f"Paper tables: each cell is ours (mean ± sample std over n seeds; – where the runs lack the metric) vs "
            f"the paper's mean ± std as printed (no std where the paper prints none), with ours − paper in "
            f"parentheses; no paper number where the table has none for that dataset, model and method. A row whose "
            f"label is not a method of the paper (a hyperparameter variant) is compared with its runs' method. "
            f"{MARK} = |ours − paper| > 2 SE, SE = sqrt(s_ours²/n_ours + s_paper²/n_paper) with n_paper = 3 (the "
            f"papers' means over three runs); where either side has no std (the paper prints none, or ours has "
            f"n=1), |ours − paper| > a fixed tolerance: {tolerances}.{ensemble} Neither paper says which epoch it "
            f"reports.")
