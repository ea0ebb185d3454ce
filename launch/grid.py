"""Run a seeded grid of training runs and print the results table.

    python launch/grid.py                      # the demo grid (grids/demo.yaml) on this machine
    python launch/grid.py --grid G.yaml [--out DIR] [--parallel N] [--force] [--dry-run]

A grid YAML names a base config, axes (dotted config keys -> lists, crossed), fixed overrides and
seeds. Every run gets a readable dir `<out>/<dataset>/<model>/<method>[-<hparams>]/seed<k>/`
and an identity (a hash of its resolved config). Finished runs are skipped; unfinished ones resume
from their checkpoint. Jobs go through a submitit executor (the local one here), so a Slurm
executor slots in without changing how runs are described.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from cskd import rundir
from cskd.config import Config, identity_dict, load_config, to_dict
from cskd.errors import ConfigError, CskdError, DataError
from cskd.job import TrainJob
from launch.collect import report

REPO = Path(__file__).resolve().parent.parent
DEMO_GRID = REPO / "grids" / "demo.yaml"
GRID_KEYS = {"name", "base", "axes", "overrides", "seeds"}
NAMING_KEYS = ("method", "model", "data.path", "seed")  # already in the run dir's path


@dataclass
class Run:
    config: Config
    run_id: str

    @property
    def out_dir(self) -> Path:
        return Path(self.config.out_dir)


def _label(method: str, combo: dict) -> str:
    """`cskd`, or `cskd-lam3-temperature1` when the grid varies hyperparameters."""
    return "".join([method, *(f"-{k.split('.')[-1]}{v}" for k, v in combo.items() if k not in NAMING_KEYS)])


def expand(grid_path: Path, out: Path | None) -> tuple[Path, list[Run]]:
    """The output root and the runs of a grid YAML, each with a resolved config and its run dir set."""
    grid = yaml.safe_load(grid_path.read_text()) or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"grid {grid_path} must hold a mapping (name, base, axes, overrides, seeds)")
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ConfigError(f"grid {grid_path}: unknown key(s) {', '.join(sorted(unknown))}; valid: "
                          f"{', '.join(sorted(GRID_KEYS))}")
    name = grid.get("name", grid_path.stem)
    base = grid.get("base")
    base_path = None if base is None else str((grid_path.parent / base) if not Path(base).is_absolute() else base)
    if base_path and not Path(base_path).exists() and (REPO / base).exists():
        base_path = str(REPO / base)  # grids name their base relative to the repo root
    axes = grid.get("axes") or {}
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid {grid_path}: axis '{key}' must be a non-empty list, got {values!r}")
    seeds = grid.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"grid {grid_path}: 'seeds' must be a non-empty list of integers")
    fixed = [f"{k}={json.dumps(v)}" for k, v in (grid.get("overrides") or {}).items()]
    out = out or REPO / "runs" / name
    runs = []
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        for seed in seeds:
            overrides = fixed + [f"{k}={json.dumps(v)}" for k, v in combo.items()] + [f"seed={seed}"]
            cfg = load_config(base_path, overrides)
            label = _label(cfg.method, combo)
            cfg.out_dir = str(out / Path(cfg.data.path).name / cfg.model / label / f"seed{seed}")
            digest = hashlib.sha1(json.dumps(identity_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]
            runs.append(Run(cfg, digest))
    return out, runs


def ensure_data(path: str) -> None:
    """Prepare a dataset that needs no download (mnist5k) if it is missing; otherwise name the fix."""
    from cskd.data import open_dataset

    try:
        open_dataset(path)
    except DataError:
        if Path(path).name != "mnist5k":
            raise
        from datasets_prep.__main__ import main as prep

        print(f"preparing {path} (python -m datasets_prep mnist5k --out {path})", flush=True)
        if prep(["mnist5k", "--out", path]) != 0:
            raise DataError(f"could not prepare {path}; run python -m datasets_prep mnist5k --out {path}") from None
        open_dataset(path)


def _failure_reason(job, error: Exception) -> str:
    """The exception line a failed job printed last (e.g. 'ConfigError: ...'), else submitit's message."""
    try:
        lines = [l for l in job.paths.stderr.read_text().splitlines() if l.strip()]
    except OSError:
        lines = []
    last = lines[-1] if lines else (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return last.removeprefix("cskd.errors.")


def run_local(runs: list[Run], parallel: int, log_dir: Path) -> list[tuple[Run, str]]:
    """Run jobs through submitit's local executor, at most `parallel` at a time; return failures."""
    import submitit

    executor = submitit.LocalExecutor(folder=log_dir / "%j")
    executor.update_parameters(timeout_min=7 * 24 * 60)  # local default is 2 minutes
    waiting, running, failures = list(runs), [], []
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                run = waiting.pop(0)
                running.append((run, executor.submit(TrainJob(to_dict(run.config)))))
            time.sleep(0.5)
            for run, job in [r for r in running if r[1].done()]:
                running.remove((run, job))
                try:
                    job.result()
                    print(f"done    {run.out_dir}", flush=True)
                except Exception as e:  # a failed run is reported and does not stop the others
                    failures.append((run, f"{_failure_reason(job, e)} (log: {job.paths.stderr})"))
                    print(f"FAILED  {run.out_dir}: {failures[-1][1]}", flush=True)
    except KeyboardInterrupt:
        for _, job in running:
            job.cancel(check=False)
        print("\ninterrupted: running jobs cancelled; re-run the same command to resume them", flush=True)
        raise SystemExit(130)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python launch/grid.py", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=Path, default=DEMO_GRID, help="grid YAML (default: the demo grid)")
    parser.add_argument("--out", type=Path, help="output root (default: runs/<grid name>)")
    parser.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="local runs at a time (default: half the cores); each gets cores/parallel threads")
    parser.add_argument("--force", action="store_true", help="redo finished runs too")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, run nothing")
    args = parser.parse_args(argv)
    try:
        if not args.grid.is_file():
            raise ConfigError(f"grid file {args.grid} does not exist")
        root, runs = expand(args.grid, args.out)
        threads = max(1, (os.cpu_count() or 1) // max(args.parallel, 1))
        for run in runs:
            run.config.threads = run.config.threads or threads
        todo = []
        for run in runs:
            done = (run.out_dir / rundir.SUMMARY).exists()
            print(f"{'skip  ' if done and not args.force else 'todo  '} {run.run_id} {run.out_dir}")
            if args.force or not done:
                todo.append(run)
        if args.dry_run:
            return 0
        for path in sorted({r.config.data.path for r in todo}):
            ensure_data(path)
        for run in todo if args.force else ():
            for artifact in rundir.ARTIFACTS:
                (run.out_dir / artifact).unlink(missing_ok=True)
        failures = run_local(todo, args.parallel, root / "logs") if todo else []
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(report(root), end="")
    print(f"written: {root / 'results.md'}, {root / 'results.csv'}")
    for run, why in failures:
        print(f"failed: {run.out_dir}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
