"""Run a seeded grid of training runs on Slurm (one job array) or on this machine, then tabulate.

    python launch/grid.py                                   # the demo grid, on this machine
    python launch/grid.py --grid G.yaml --partition gpu [--nodes N --gpus-per-node G --time 1-00:00 ...]
                          [--out DIR] [--dry-run] [--force] [--wait]

A grid YAML names a base config, axes (dotted config keys -> lists, crossed), fixed overrides,
rules (overrides for the runs matching some values, e.g. lambda=3 on fine-grained sets), seeds and
Slurm resources. Every run gets an identity (a hash of its resolved config) and a readable run dir
`<out>/<dataset>/<model>/<method>[-<hparams>]/seed<k>/`. Re-running the same command skips runs that
are done or whose recorded job is still pending/running, and submits the rest; runs resume from
their checkpoint however they were stopped.

Everything is checked before anything is written or submitted: every run dir must be a distinct
directory under the output root (two runs that would share one are refused, naming both), and no
name that ends up in a path or an sbatch script may hold a control character.
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cskd import rundir
from cskd.config import (
    INT64,
    Config,
    identity_dict,
    nest,
    read_yaml,
    resolve,
    to_dict,
    unprintable,
)
from cskd.errors import ConfigError, CskdError, DataError
from launch import runs, slurm, submit
from launch.collect import make_report

REPO = Path(__file__).resolve().parent.parent
DEMO_GRID = REPO / "grids" / "demo.yaml"
GRID_KEYS = {"name", "base", "axes", "overrides", "rules", "seeds", "resources"}
NAMING_KEYS = ("method", "model", "data.path", "seed")  # already in the run dir's path
LAYOUT_KEYS = {"seed", "out_dir", "label"}  # set by the grid itself
RESOURCE_FLAGS = ("partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "time",
                  "array_parallelism")


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


def _flat(cfg: Config) -> dict:
    flat = {}
    for key, value in to_dict(cfg).items():
        flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return flat


def _matching_rules(rules: list, cfg: Config, where: str) -> list[tuple[dict, str]]:
    """The `set` layers of every rule whose `if` matches the config (a list value = any of)."""
    flat, layers = _flat(cfg), []
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict) or set(rule) != {"if", "set"} or not all(
                isinstance(rule[k], dict) for k in ("if", "set")):
            raise ConfigError(f"{where}: rules[{i}] must have exactly the keys 'if' and 'set', each a mapping")
        for key in rule["if"]:
            if key not in flat:
                raise ConfigError(f"{where}: rules[{i}] tests unknown config key '{key}'")
        _check_layout_keys(rule["set"], f"{where}: rules[{i}].set")
        if all(flat[k] in (v if isinstance(v, list) else [v]) for k, v in rule["if"].items()):
            layers.append((nest(rule["set"]), f"{where} rules[{i}].set"))
    return layers


def _check_layout_keys(keys, where: str) -> None:
    """Seeds, out_dir and label come from the grid's own structure, never from its overrides."""
    taken = sorted(set(keys) & LAYOUT_KEYS)
    if taken:
        raise ConfigError(f"{where} sets {', '.join(taken)}: seeds come from the grid's 'seeds' list, out_dir and "
                          f"label from its layout (use --out for the root)")


def load_grid(grid_path: Path) -> dict:
    grid = read_yaml(grid_path, "grid")
    where = f"grid {grid_path}"
    unknown = set(grid) - GRID_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(map(str, unknown)))}; valid: "
                          f"{', '.join(sorted(GRID_KEYS))}")
    for key in ("axes", "overrides"):
        if not isinstance(grid.get(key) if grid.get(key) is not None else {}, dict):
            raise ConfigError(f"{where}: '{key}' must map dotted config keys to values, e.g. {key}: {{lr: ...}}, "
                              f"not a {type(grid[key]).__name__}")
        _check_layout_keys(grid.get(key) or {}, f"{where}: '{key}'")
    for key, values in (grid.get("axes") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: axis '{key}' must be a non-empty list, got {values!r}")
        _check_distinct(values, f"{where}: axis '{key}'")
    _check_seeds(grid.get("seeds", [0]), where)
    if not isinstance(grid.get("rules") or [], list):
        raise ConfigError(f"{where}: 'rules' must be a list of {{if: {{...}}, set: {{...}}}}")
    if not isinstance(grid.get("resources") or {}, dict):
        raise ConfigError(f"{where}: 'resources' must map resource names to values, e.g. resources: {{nodes: 1}}")
    if not isinstance(grid.get("base", ""), str):
        raise ConfigError(f"{where}: 'base' must be the path of a config YAML, got {grid['base']!r}")
    _grid_name(grid, grid_path)
    return grid


def _check_seeds(seeds, where: str) -> None:
    """Seeds are distinct ints in 0 .. 2**63 - 1 (YAML's `true` is not a seed, nor is a value torch cannot take)."""
    if not isinstance(seeds, list) or not seeds or not all(
            type(s) is int and 0 <= s < INT64[1] for s in seeds):
        raise ConfigError(f"{where}: 'seeds' must be a non-empty list of integers from 0 to 2**63 - 1, "
                          f"got {seeds!r}")
    _check_distinct(seeds, f"{where}: 'seeds'")


def _check_distinct(values: list, what: str) -> None:
    """A value listed twice would give two runs of one config, in one run dir."""
    for i, value in enumerate(values):
        if any(v == value and isinstance(v, bool) == isinstance(value, bool) for v in values[:i]):  # 1 is not true
            raise ConfigError(f"{what} lists {value!r} twice; each value is one run: remove the duplicate")


def _grid_name(grid: dict, grid_path: Path) -> str:
    """The grid's name (default: the file's stem), which names the default output root and the Slurm jobs."""
    name = grid.get("name", grid_path.stem)
    if isinstance(name, bool) or not isinstance(name, (str, int)):
        raise ConfigError(f"grid {grid_path}: 'name' must be a plain name, got {name!r}")
    return _plain_name(str(name), f"grid {grid_path}: 'name'", "e.g. name: cifar_lambda_sweep")


def _plain_name(text: str, what: str, example: str) -> str:
    """`text` as one path component: not empty, '.' or '..', no '/' and no control character."""
    bad = unprintable(text)
    if bad is not None:
        raise ConfigError(f"{what} {text!r} holds the control character {bad!r}; remove it ({example})")
    if text.strip() in ("", ".", "..") or "/" in text:
        raise ConfigError(f"{what} {text!r} is not a plain name (it must not be empty, '.' or '..', nor hold a "
                          f"'/'): it names a directory under the output root ({example})")
    return text


def grid_name(grid_path: Path) -> str:
    return _grid_name(load_grid(grid_path), grid_path)


def _base_path(grid_path: Path, base: str | None) -> Path | None:
    """The grid's base config: relative to the grid file, else to the repository root."""
    if base is None:
        return None
    path = Path(base) if Path(base).is_absolute() else grid_path.parent / base
    return REPO / base if not path.exists() and (REPO / base).exists() else path


def expand(grid_path: Path, out: Path | None) -> tuple[Path, list[Run]]:
    """The output root and the runs of a grid YAML, each with a resolved config and its run dir set.

    A run's config is built from nested dicts, defaults <- base YAML <- overrides <- axes <- rules
    <- seed; rules are matched against the config the other layers give. Every run dir is a
    distinct directory under the root, or the grid is refused."""
    grid = load_grid(grid_path)
    where = f"grid {grid_path}"
    base_path = _base_path(grid_path, grid.get("base"))
    base = [(read_yaml(base_path), f"config file {base_path}")] if base_path else []
    fixed = [(nest(grid.get("overrides") or {}), f"{where} overrides")]
    axes = grid.get("axes") or {}
    out = _output_root(Path(out or REPO / "runs" / _grid_name(grid, grid_path)))
    result, values_of = [], {}
    for values in itertools.product(*axes.values()):
        combo = dict(zip(axes, values))
        layers = base + fixed + [(nest(combo), f"{where} axes")]
        for seed in grid.get("seeds", [0]):
            seeded = [({"seed": seed}, f"{where} seeds")]
            cfg = resolve(layers + seeded)
            ruled = _matching_rules(grid.get("rules") or [], cfg, where)
            cfg = resolve(layers + ruled + seeded) if ruled else cfg  # no rule: the same layers, resolved
            cfg.label = _label(cfg.method, combo)
            cfg.out_dir = str(_run_dir(out, cfg, seed, where))
            digest = hashlib.sha1(json.dumps(identity_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]
            run = Run(cfg, digest)
            _check_own_dir(run, {**combo, "data.path": cfg.data.path, "seed": seed}, values_of, where)
            result.append(run)
    return out, result


def _output_root(out: Path) -> Path:
    out = out.absolute()  # jobs may start in another directory
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory (it is created if missing)")
    bad = unprintable(str(out))
    if bad is not None:
        raise ConfigError(f"--out {str(out)!r} holds the control character {bad!r}; remove it")
    return out


def _run_dir(out: Path, cfg: Config, seed: int, where: str) -> Path:
    """<out>/<dataset folder>/<model>/<label>/seed<k>, each a plain name: a run dir never leaves `out`."""
    dataset = _plain_name(Path(cfg.data.path).name, f"{where}: the folder name of data.path {cfg.data.path!r},",
                          "give the dataset's own directory, e.g. data/mnist5k")
    label = _plain_name(cfg.label, f"{where}: the run label built from its axes' values,",
                        "use axis values without '/', e.g. numbers")
    run_dir = out / dataset / cfg.model / label / f"seed{seed}"
    if os.path.commonpath([out, os.path.normpath(run_dir)]) != str(out):  # the names above already ensure it
        raise ConfigError(f"{where}: the run dir {run_dir} would lie outside the output root {out}")
    return run_dir


def _check_own_dir(run: Run, values: dict, values_of: dict, where: str) -> None:
    """Refuse a run whose run dir an earlier run of the grid already has; name both and the dir."""
    other = values_of.setdefault(run.out_dir, values)
    if other is values:
        return
    differ = [k for k in dict.fromkeys([*other, *values]) if other.get(k) != values.get(k)]
    if not differ:
        raise ConfigError(f"{where}: the run {_show(values)} is listed twice (run dir {run.out_dir}); remove the "
                          f"duplicate value")
    raise ConfigError(f"{where}: the runs {_show(other, differ)} and {_show(values, differ)} would share the run dir "
                      f"{run.out_dir} (named <data.path folder>/<model>/<label>/seed<k>); give the datasets "
                      f"distinct folder names or the values distinct spellings, or run them as separate grids "
                      f"with their own --out")


def _show(values: dict, keys=None) -> str:
    return "{" + ", ".join(f"{k}={values[k]!r}" for k in (keys or values) if k in values) + "}"


def resources_of(grid_path: Path, args: argparse.Namespace) -> slurm.Resources:
    """The grid's `resources:` with the command line's flags on top."""
    section = dict(load_grid(grid_path).get("resources") or {})
    if "time" in section:
        section["time_min"] = section.pop("time")
    for flag in RESOURCE_FLAGS:
        if getattr(args, flag) is not None:
            section["time_min" if flag == "time" else flag] = getattr(args, flag)
    if args.sbatch:
        section["sbatch"] = {**(section.get("sbatch") or {}), **dict(_key_value(s) for s in args.sbatch)}
    return slurm.make_resources(section, str(grid_path))


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not key or key.startswith("-"):
        raise ConfigError(f"--sbatch {text!r}: write sbatch flags as name=value without dashes, e.g. account=abc")
    return key, (value if sep else True)


def ensure_data(path: str) -> None:
    """Prepare a dataset that needs no download (mnist5k) if it is missing; otherwise name the fix."""
    from cskd.dataset import open_dataset

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


def plan(all_runs: list[Run], force: bool) -> tuple[list[Run], list[str]]:
    """Print one line per run; return the runs to submit and the active jobs that --force replaces."""
    status = runs.statuses([r.out_dir for r in all_runs])
    todo, replaced = [], []
    for run in all_runs:
        s = status[run.out_dir]
        busy = s.state in ("pending", "running")
        if force and s.detail.startswith(runs.LOCKED):  # --force never deletes files under a live trainer
            print(f"skip   {run.run_id} {run.out_dir} ({s.detail}; stop it first to redo it)")
        elif force or not (busy or s.state == "done"):
            todo.append(run)
            if busy and s.job_id:
                replaced.append(s.job_id)
            note = f" (was {s.state}{': ' + s.detail if s.detail else ''})" if s.state not in ("missing",) else ""
            print(f"todo   {run.run_id} {run.out_dir}{note}")
        else:
            print(f"skip   {run.run_id} {run.out_dir} ({s.state}{', job ' + s.job_id if s.job_id else ''})")
    return todo, replaced


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python launch/grid.py", description=__doc__.splitlines()[0])
    p.add_argument("--grid", type=Path, default=DEMO_GRID, help="grid YAML (default: the demo grid)")
    p.add_argument("--out", type=Path, help="output root (default: runs/<grid name>)")
    slurm_group = p.add_argument_group("Slurm (overrides the grid's resources:)")
    slurm_group.add_argument("--partition", help="submit to this Slurm partition (no partition: run locally)")
    for flag, kind in (("nodes", int), ("gpus_per_node", int), ("tasks_per_node", int), ("cpus_per_task", int),
                       ("mem_gb", float), ("array_parallelism", int)):
        slurm_group.add_argument("--" + flag.replace("_", "-"), dest=flag, type=kind)
    slurm_group.add_argument("--time", help="time limit per job: minutes or D-HH:MM:SS")
    slurm_group.add_argument("--sbatch", action="append", metavar="NAME=VALUE",
                             help="extra sbatch flag, e.g. --sbatch account=abc --sbatch qos=high (repeatable)")
    p.add_argument("--local", action="store_true", help="run here even if the grid names a partition")
    p.add_argument("--parallel", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="local runs at a time (default: half the cores); each gets cores/parallel threads")
    p.add_argument("--force", action="store_true", help="redo finished runs and replace queued ones")
    p.add_argument("--dry-run", action="store_true", help="list the runs and the Slurm request, submit nothing")
    p.add_argument("--wait", action="store_true", help="with Slurm: wait for the jobs, then print the table")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.parallel < 1:  # run_local would wait forever for a free slot
            raise ConfigError(f"--parallel must be >= 1 (local runs at a time), got {args.parallel}")
        root, all_runs = expand(args.grid, args.out)
        resources = resources_of(args.grid, args)
        on_slurm = resources.partition is not None and not args.local
        if on_slurm:
            return launch_slurm(args, root, all_runs, resources)
        return launch_local(args, root, all_runs)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_runs(args, all_runs: list[Run], world_size: int) -> None:
    """Checks that need no scheduler; they refuse before anything is submitted."""
    for run in all_runs:
        if run.config.batch_size % world_size:
            raise ConfigError(f"{run.out_dir}: batch_size={run.config.batch_size} does not divide by the "
                              f"{world_size} processes of the request (nodes x tasks per node)")
        if not args.force:
            rundir.check_same_config(run.config)


def _start(args, root: Path, all_runs: list[Run], todo: list[Run]) -> None:
    """Data, --force cleanup and the manifest, just before submission."""
    for path in sorted({r.config.data.path for r in todo}):
        ensure_data(path)
    for run in todo if args.force else ():
        rundir.remove_artifacts(run.out_dir)
        (run.out_dir / rundir.JOB).unlink(missing_ok=True)
    runs.write_manifest(root, grid_name(args.grid), [
        {"run_id": r.run_id, "dir": str(r.out_dir.relative_to(root)), "dataset": Path(r.config.data.path).name,
         "model": r.config.model, "label": r.config.label, "seed": r.config.seed} for r in all_runs])


def launch_slurm(args, root: Path, all_runs: list[Run], resources: slurm.Resources) -> int:
    print(f"Slurm request per run: sbatch {' '.join(resources.sbatch_flags())} (one job array)")
    _check_runs(args, all_runs, resources.nodes * resources.ntasks_per_node)
    try:
        slurm.check_reachable()
        slurm.validate(resources)  # refused requests fail here, before anything is submitted
    except slurm.SlurmError as e:
        if not args.dry_run:
            raise
        print(f"note: the request was not checked with Slurm: {e}")
    for run in all_runs:
        run.config.threads = run.config.threads or (resources.cpus_per_task or 0)
    todo, replaced = plan(all_runs, args.force)
    if args.dry_run or not todo:
        print("nothing to submit" if not todo else f"dry run: {len(todo)} run(s) would be submitted")
        return 0 if args.dry_run else _finish(root, args.wait, all_runs)
    if replaced:
        print(f"--force: cancelling {len(replaced)} queued job(s) of these runs: {' '.join(replaced)}")
        slurm.cancel(replaced)
    _start(args, root, all_runs, todo)
    job_ids = submit.submit_slurm(todo, resources, root / "logs", grid_name(args.grid))
    print(f"submitted {len(job_ids)} run(s) as job array {job_ids[0].split('_')[0]} "
          f"(at most {resources.array_parallelism} at a time); logs in {root / 'logs'}")
    if not args.wait:
        print(f"status: python launch/collect.py {root} --status    table: python launch/collect.py {root}")
        return 0
    return _finish(root, True, all_runs)


def launch_local(args, root: Path, all_runs: list[Run]) -> int:
    threads = max(1, (os.cpu_count() or 1) // max(args.parallel, 1))
    for run in all_runs:
        run.config.threads = run.config.threads or threads
    _check_runs(args, all_runs, 1)
    todo, _ = plan(all_runs, args.force)
    if args.dry_run:
        return 0
    _start(args, root, all_runs, todo)
    submit.run_local(todo, args.parallel, root / "logs")
    return _finish(root, False, all_runs)


def _finish(root: Path, wait: bool, all_runs: list[Run]) -> int:
    """Wait for Slurm jobs (if asked), print the table and every run that did not finish."""
    status = submit.wait([r.out_dir for r in all_runs]) if wait else runs.statuses([r.out_dir for r in all_runs])
    print()
    result = make_report(root)  # files it cannot write are one warning line: the table is printed anyway
    print(result.text, end="")
    tables = [str(p) for p in result.written if p.suffix != ".png"]
    if tables:
        print(f"written: {', '.join(tables)}")
    bad = [(d, s) for d, s in status.items() if s.state != "done"]
    for d, s in bad:
        print(f"{s.state}: {d}: {s.detail}" + (f" (log: {s.log})" if s.log else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
