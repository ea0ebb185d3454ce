"""Ensembles of finished runs from their saved test logits: `python -m cskd.ensemble RUN_DIR RUN_DIR... [--checkpoint
final|best] [--ece-bins N] [--out FILE.json]`.

The ensemble's prediction for a test sample is the mean of the runs' softmax probabilities (each run
weighs the same), as in PS-KD's Table 3 (the ensemble of the three seeds of its Table 1; the paper
does not state its rule, softmax averaging is the usual one). Its metrics are those of
`cskd.metrics`, with the averaged probabilities in place of one model's softmax: top-1/top-5 error
of their ranking, NLL = mean of -log(mean probability of the true label), ECE over equal-width bins
(l, u] of the max averaged probability, AURC/E-AURC with that max as the confidence. R@1 is left
out: it is a nearest-neighbour score on one model's features, which an ensemble does not have (and
runs do not keep).

The runs are read from their run dirs (`cskd.rundir`): `test_logits.pt` (the final epoch's) or
`best_test_logits.pt` (each run's own best epoch), loaded once each. They must be finished
(summary.json), on the same dataset (and the same conversion of its test split, where summary.json
records it), with the same classes and the same test labels in the same order; anything else is one
line saying which run and what to do.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F

from cskd import rundir
from cskd.checkpoint import load
from cskd.errors import ConfigError, CskdError, DataError, RunDirError
from cskd.metrics import classification_metrics

# cskd.metrics.METRIC_NAMES without r_at_1, which needs features
METRICS = ("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc")
RULE = "mean of the runs' softmax probabilities"
R_AT_1_NOTE = "r_at_1 is not defined for an ensemble: it needs one model's test features, which runs do not keep"
FILES = {"final": rundir.TEST_LOGITS, "best": rundir.BEST_TEST_LOGITS}


def mean_log_probs(logits_list: Iterable[torch.Tensor]) -> torch.Tensor:
    """log of the mean of the runs' softmax probabilities, (N, C) float64, computed as a log-sum-exp of the
    log-softmaxes (finite where a probability underflows). `logits_list` may be a generator: one run's
    logits are held at a time."""
    total, n = None, 0
    for logits in logits_list:
        log_p = F.log_softmax(logits.double(), dim=1)
        total = log_p if total is None else torch.logaddexp(total, log_p)
        n += 1
    if total is None:
        raise ValueError("an ensemble needs at least one run's logits")
    return total - math.log(n)


def ensemble_metrics(logits_list: list[torch.Tensor], labels: torch.Tensor, n_bins: int = 20
                     ) -> tuple[dict[str, float], dict[str, list]]:
    """The metrics (`METRICS`, cskd.metrics' units) of the ensemble of runs whose test logits are `logits_list`
    (each (N, C), same samples in the same order as `labels`), and its reliability bins. The ensemble predicts
    the mean of the runs' softmax probabilities; an ensemble of one run scores as that run
    (`cskd.metrics.classification_metrics` less r_at_1)."""
    return log_prob_metrics(mean_log_probs(logits_list), labels, n_bins)


def log_prob_metrics(log_p: torch.Tensor, labels: torch.Tensor, n_bins: int = 20
                     ) -> tuple[dict[str, float], dict[str, list]]:
    """`ensemble_metrics` of the ensemble whose log mean probabilities (`mean_log_probs`) are `log_p`: scored
    as logits by `classification_metrics` (softmax(log_p) is the mean probability), without features."""
    return classification_metrics(log_p, labels, None, n_bins)


def _finished_run(run_dir: Path, which: str) -> tuple[dict, int]:
    """(summary.json, the config's ece_bins) of a finished run, or one line saying what the run dir lacks."""
    cfg = rundir.read_config(run_dir)
    path = run_dir / rundir.SUMMARY
    if not path.is_file():
        logits = run_dir / FILES[which]
        has = f" (its {FILES[which]} is of the last epoch it finished)" if logits.is_file() else ""
        raise RunDirError(f"{run_dir} is not finished (no {rundir.SUMMARY}){has}; let it finish (python "
                          f"launch/collect.py ROOT --status shows its state), or leave it out of the ensemble")
    return rundir.read_summary(path).raw, cfg.ece_bins


def _no_logits(run_dir: Path, which: str) -> RunDirError:
    return RunDirError(f"{run_dir} has no {FILES[which]}: it finished before cskd kept test logits; train it again "
                       f"(--force) to ensemble it, or leave it out")


def load_test_logits(run_dir: str | Path, which: str = "final", summary: dict | None = None) -> dict:
    """A finished run's test logits file (`FILES[which]`), checked: {"epoch", "logits" (N, C) float, "labels" (N,)
    int64}; with `summary` (its summary.json), also that the file is of the epoch summary.json reports."""
    run_dir = Path(run_dir)
    path = run_dir / FILES[which]
    if not path.is_file():
        raise _no_logits(run_dir, which)
    saved = load(path)
    logits, labels = (saved.get(k) if isinstance(saved, dict) else None for k in ("logits", "labels"))
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_floating_point()
            and isinstance(labels, torch.Tensor) and labels.dim() == 1 and labels.dtype == torch.int64
            and len(labels) == len(logits) and isinstance(saved.get("epoch"), int)):
        raise RunDirError(f"{path} is not a test logits file ({{epoch, logits (N, C), labels (N,) int64}}); "
                          f"train the run again (--force) to re-create it")
    if len(labels) and (labels.min() < 0 or labels.max() >= logits.shape[1]):
        raise RunDirError(f"{path} has labels outside 0..{logits.shape[1] - 1} (its {logits.shape[1]} classes); "
                          f"train the run again (--force) to re-create it")
    if not logits.sum(dtype=torch.float32).isfinite():  # a NaN or inf anywhere (float16 sums cannot overflow it)
        raise RunDirError(f"{path} holds non-finite logits (NaN, or beyond float16's range); its softmax is undefined, "
                          f"leave the run out of the ensemble")
    recorded = ((summary or {}).get(which) or {}).get("epoch")
    if isinstance(recorded, int) and recorded != saved["epoch"]:
        raise RunDirError(f"{path} holds epoch {saved['epoch'] + 1}'s logits but {rundir.SUMMARY} reports epoch "
                          f"{recorded + 1} as the {which} one; the file is stale: train the run again (--force)")
    return saved


def _test_split(summary: dict) -> str | None:
    """The sha256 of the test split's file as summary.json records it (which conversion), or None."""
    sha = (summary.get("data") or {}).get("sha256") if isinstance(summary.get("data"), dict) else None
    test = sha.get("test.beton") if isinstance(sha, dict) else None
    return test if isinstance(test, str) else None


def _check_same(run_dirs: list[Path], values: list, what: str, remedy: str) -> None:
    """Refuse runs whose `values` differ: name the first run and the first that differs from it."""
    other = next((i for i, v in enumerate(values) if v != values[0]), None)
    if other is not None:
        raise DataError(f"{run_dirs[0]} and {run_dirs[other]} have different {what} ({values[0]} vs "
                        f"{values[other]}); {remedy}")


def ensemble_runs(run_dirs: list[str | Path], which: str = "final", ece_bins: int | None = None) -> dict:
    """The ensemble of finished runs (mean of their softmax probabilities) at their final or best epochs:
    {"runs", "checkpoint", "epochs", "dataset", "samples", "classes", "ece_bins", "rule", <METRICS>, "reliability",
    "note"}. Each run's logits file is loaded once; a CskdError (one line) names a run that cannot take part
    and why. `ece_bins`: default the runs' own (they must agree)."""
    if which not in FILES:
        raise ConfigError(f"--checkpoint must be final or best, got {which!r}")
    if ece_bins is not None and ece_bins < 1:
        raise ConfigError(f"--ece-bins must be >= 1, got {ece_bins}")
    dirs = [Path(d) for d in run_dirs]
    if len(dirs) < 2:
        raise ConfigError(f"an ensemble needs at least 2 run dirs, got {len(dirs)}")
    resolved = [d.resolve() for d in dirs]
    for i, d in enumerate(dirs):
        if resolved[i] in resolved[:i]:
            raise ConfigError(f"{d} is listed twice (as {dirs[resolved.index(resolved[i])]} and {d}); list each run "
                              f"once, or it would weigh twice in the ensemble")
    runs = [_finished_run(d, which) for d in dirs]
    for d in dirs:  # before loading any: a missing file is found without reading the others
        if not (d / FILES[which]).is_file():
            raise _no_logits(d, which)
    summaries = [s for s, _ in runs]
    _check_same(dirs, [s["dataset"] for s in summaries], "datasets", "an ensemble needs runs on one test set")
    splits = [_test_split(s) for s in summaries]
    if None not in splits:
        _check_same(dirs, [s[:12] + "..." for s in splits], "test.beton sha256s in summary.json",
                    "they were tested on different conversions of the dataset: ensemble runs of one conversion")
    if ece_bins is None:
        bins_of = [b for _, b in runs]
        if len(set(bins_of)) > 1:
            shown = ", ".join(f"{d}: {b}" for d, b in zip(dirs, bins_of))
            raise ConfigError(f"the runs were evaluated with different ece_bins ({shown}); choose the ECE bins "
                              f"of the ensemble with --ece-bins N (python -m cskd.ensemble)")
        ece_bins = bins_of[0]
    first: dict = {}
    epochs: list[int] = []

    def logits():  # each run's logits, checked against the first run's, loaded one at a time
        for d, summary in zip(dirs, summaries):
            saved = load_test_logits(d, which, summary)
            if not first:
                first.update(labels=saved["labels"], classes=saved["logits"].shape[1])
            else:
                _check_same([dirs[0], d], [first["classes"], saved["logits"].shape[1]], "class counts",
                            "an ensemble needs runs of one classification task")
                _check_labels(dirs[0], d, first["labels"], saved["labels"])
            epochs.append(saved["epoch"])
            yield saved.pop("logits")

    log_p = mean_log_probs(logits())
    labels, classes = first["labels"], first["classes"]
    metrics, bins = log_prob_metrics(log_p, labels, ece_bins)
    return {"runs": [str(d) for d in dirs], "checkpoint": which, "epochs": epochs, "dataset": summaries[0]["dataset"],
            "samples": len(labels), "classes": classes, "ece_bins": ece_bins, "rule": RULE, **metrics,
            "reliability": bins, "note": R_AT_1_NOTE}


def _check_labels(first: Path, other: Path, a: torch.Tensor, b: torch.Tensor) -> None:
    if len(a) != len(b):
        raise DataError(f"{first} and {other} were tested on {len(a)} and {len(b)} samples; an ensemble needs one "
                        f"test set: ensemble runs of one dataset")
    if not torch.equal(a, b):
        i = int((a != b).nonzero()[0])
        raise DataError(f"{first} and {other} have different test labels (first at sample {i}: {int(a[i])} vs "
                        f"{int(b[i])}): not the same test set in the same order; ensemble runs of one dataset")


def format_ensemble(result: dict) -> str:
    """The printed result, in `cskd.eval.format_result`'s layout."""
    epochs = ", ".join(str(e + 1) for e in result["epochs"])
    lines = [f"ensemble of {len(result['runs'])} runs ({result['checkpoint']}, epochs {epochs}) on {result['dataset']} "
             f"test: {result['samples']} samples, {result['classes']} classes, {result['ece_bins']} ECE bins; "
             f"{result['rule']}"]
    lines += [f"  {run}" for run in result["runs"]]
    lines += [f"  {name:<9} {result[name]:.4f}" for name in METRICS]
    lines.append(f"  ({result['note']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    from cskd.eval import _write_result, check_out_path  # --out as cskd.eval has it; here, not for launch/collect
    from cskd.progress import log

    parser = argparse.ArgumentParser(prog="python -m cskd.ensemble", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished run dirs (with test logits)")
    parser.add_argument("--checkpoint", choices=tuple(FILES), default="final",
                        help=f"final: {rundir.TEST_LOGITS} (the final epoch); best: {rundir.BEST_TEST_LOGITS} (each "
                             f"run's epoch of lowest test top1_err)")
    parser.add_argument("--ece-bins", type=int, help="ECE bins (default: the runs' ece_bins, which must agree)")
    parser.add_argument("--out", help="also write the result as JSON (atomically) to this file")
    args = parser.parse_args(argv)
    try:
        if args.out:
            check_out_path(args.out)
        result = ensemble_runs(args.run_dirs, args.checkpoint, args.ece_bins)
        log(format_ensemble(result))
        if args.out:
            _write_result(args.out, result)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
