"""Every figure of the CS-KD and PS-KD papers from a grid's run dirs: `python launch/figures.py GRID_OUT [--only NAME]
[--format png|pdf] [--epoch final|best] [--samples I,J]`.

Runs are found as GRID_OUT/**/summary.json, wherever they lie (launch/collect.py's `read_results`), and
grouped by the dataset and model their summaries record, never by their paths. Each figure is drawn
for every group whose runs allow it, from the run-dir files alone (summary.json, test_logits.pt or
best_test_logits.pt, train_correct.bits, train_probs.f16; no dataset, no GPU), into
GRID_OUT/figures/<name>_<dataset>_<model>.<fmt> (pskd_fig3: <name>_<dataset>.<fmt>), each written
atomically. Only pskd_fig4 reads the dataset, for its images, and draws its bars without them when
the dataset is not reachable.

Runs are picked by their summary's method; where several labels (variants) share a method in a group,
the label equal to the method's name is used, else the first in the tables' order. A figure of single
runs uses the lowest seed every method it compares has, and says which. Logits are the final epoch's
(test_logits.pt) unless --epoch best (best_test_logits.pt); titles say which.

`make_figures` is the same as a function (launch/collect.py embeds its PNGs in report.html): it returns
the figures written, puts the reasons in its `skipped` list and prints nothing.

The command prints one line per figure written and one line per figure a group partly allows but that
cannot be made, with the reason (a method missing, a file without what the figure needs, a damaged
file); it says nothing of figures none of whose methods the group has. Exit status 2 is for errors in
the command itself (GRID_OUT is not a directory, an unknown --only).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cskd.ensemble import FILES
from cskd.errors import ConfigError, CskdError, one_line
from cskd.plots import save_figure
from launch.figure_runs import Drawing, Group, collect, find_groups
from launch.figures_cskd import cskd_fig1b, cskd_fig2, cskd_fig3, cskd_fig4, cskd_fig5
from launch.figures_pskd import pskd_fig2, pskd_fig3, pskd_fig4
from launch.report_html import Figure

FORMATS = ("png", "pdf")
EPOCHS = tuple(FILES)  # final, best
OUT_DIR = "figures"


@dataclass(frozen=True)
class Spec:
    """A figure of the registry: the function that draws it for a group, what it shows, and its grouping."""
    make: Callable[[Group], Drawing | None]
    description: str
    scope: str = "model"  # "model": one file per (dataset, model); "dataset": one per dataset


FIGURES: dict[str, Spec] = {
    "cskd_fig1b": Spec(cskd_fig1b, "CS-KD Fig. 1(b): softmax of ce and cskd on two commonly misclassified samples"),
    "cskd_fig2": Spec(cskd_fig2, "CS-KD Fig. 2: log p(predicted), log p(truth) on samples ce and cskd both miss"),
    "cskd_fig3": Spec(cskd_fig3, "CS-KD Fig. 3: t-SNE of test features of ce, vsoftmax, adacos, cskd"),
    "cskd_fig4": Spec(cskd_fig4, "CS-KD Fig. 4: superclass confusion and error per superclass (mixed dataset)"),
    "cskd_fig5": Spec(cskd_fig5, "CS-KD Fig. 5: reliability of each baseline against cskd"),
    "pskd_fig2": Spec(pskd_fig2, "PS-KD Fig. 2: target/max probability of hard-to-learn samples, ce vs pskd"),
    "pskd_fig3": Spec(pskd_fig3, "PS-KD Fig. 3: calibration of every architecture of a dataset", "dataset"),
    "pskd_fig4": Spec(pskd_fig4, "PS-KD Fig. 4: top-5 probabilities of ce and pskd on two test images"),
}


def _draw(name: str, group: Group, path: Path, fmt: str) -> Figure | str | None:
    """Figure `name` of `group` written to `path`; the reason if it cannot be made; None if not for this group."""
    try:
        drawing = FIGURES[name].make(group)
    except CskdError as e:
        return str(e)
    except OSError as e:  # a run file that exists but cannot be read
        return f"cannot read {e.filename} ({e.strerror or e}); check its permissions"
    if drawing is None:
        return None
    try:
        save_figure(drawing.figure, path, fmt, drawing.caption)
    except OSError as e:
        return f"cannot write {path} ({e.strerror or e}); check the permissions of {path.parent}"
    return Figure(name, drawing.title, path, drawing.caption)


def make_figures(root: str | Path, only: str | None = None, fmt: str = "png", epoch: str = "final",
                 samples: list[int] | None = None, skipped: list[str] | None = None,
                 echo: Callable[[str], None] | None = None) -> list[Figure]:
    """Draw every figure the finished runs under `root` allow into root/figures/ and return them.

    `only`: one figure name of FIGURES; `fmt`: png or pdf; `epoch`: final or best logits; `samples`: the test
    positions for cskd_fig1b and pskd_fig4 instead of their rule. A figure a group partly allows but cannot be
    made is appended to `skipped` as "<name> <dataset>/<model>: <reason>" (nothing is printed); `echo`, if
    given, is called with each line as it happens ("<name> <dataset>/<model>: wrote <path>" or the reason).
    Raises ConfigError only for bad arguments; damaged run files are reasons, not errors."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory; give the output directory of a grid (its runs' summary.json "
                          f"lie below it)")
    if only is not None and only not in FIGURES:
        raise ConfigError(f"unknown figure {only!r}; the figures are: {', '.join(FIGURES)}")
    if fmt not in FORMATS or epoch not in EPOCHS:
        raise ConfigError(f"format must be one of {', '.join(FORMATS)} and epoch one of {', '.join(EPOCHS)}; got "
                          f"{fmt!r}, {epoch!r}")
    results = collect().read_results(root)[0]
    file_part = collect()._file_part
    written: list[Figure] = []
    for scope in ("model", "dataset"):
        for group in find_groups(results, scope, epoch, samples):
            for name, spec in FIGURES.items():
                if spec.scope != scope or only not in (None, name):
                    continue
                parts = [file_part(group.dataset)] + ([file_part(group.model)] if group.model is not None else [])
                drawn = _draw(name, group, root / OUT_DIR / f"{'_'.join([name, *parts])}.{fmt}", fmt)
                if drawn is None:
                    continue
                if isinstance(drawn, Figure):
                    written.append(drawn)
                    line = f"{name} {group.where}: wrote {drawn.path}"
                else:
                    line = f"{name} {group.where}: {drawn}"
                    if skipped is not None:
                        skipped.append(one_line(line))
                if echo:
                    echo(one_line(line))
            group.loaded.clear()  # one group's logits in memory at a time
    return written


def parse_samples(text: str) -> list[int]:
    """--samples "I,J": test positions (integers >= 0) separated by commas."""
    try:
        samples = [int(part) for part in text.split(",")]
    except ValueError:
        samples = []
    if not samples or min(samples) < 0:
        raise ConfigError(f"--samples must be test positions (integers >= 0) separated by commas, like 3,17; got "
                          f"{text!r}")
    return samples


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/figures.py", description=__doc__.splitlines()[0],
                                     epilog="figures: " + "; ".join(f"{n}: {s.description}" for n, s in
                                                                    FIGURES.items()))
    parser.add_argument("root", metavar="GRID_OUT", help="directory holding run dirs (e.g. runs/demo)")
    parser.add_argument("--only", metavar="NAME", help="make only this figure (names below)")
    parser.add_argument("--format", default="png", choices=FORMATS)
    parser.add_argument("--epoch", default="final", choices=EPOCHS,
                        help=f"final: {FILES['final']}; best: {FILES['best']} (the epoch of lowest test top1_err)")
    parser.add_argument("--samples", metavar="I,J", help="test positions for cskd_fig1b and pskd_fig4 instead of "
                                                         "their rule")
    args = parser.parse_args(argv)
    try:
        samples = parse_samples(args.samples) if args.samples is not None else None
        make_figures(args.root, args.only, args.format, args.epoch, samples, echo=lambda line: print(line, flush=True))
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
