"""Run a seeded grid of training runs on Slurm (one job array) or on this machine, then tabulate.

    python launch/grid.py                                   # the demo grid, on this machine
    python launch/grid.py --grid G.yaml --partition gpu [--nodes N --gpus-per-node G --time 1-00:00 ...]
                          [--runs-per-gpu K] [--out DIR] [--dry-run] [--force] [--wait]
    python launch/grid.py --grid G.yaml [--gpus 0,1] [--runs-per-gpu K]     # on this machine's GPUs

A grid YAML (read and expanded by `launch/gridspec.py`) names a base config or a `config:` axis of
config files, axes, overrides, rules, seeds, Slurm resources and the paper table it reproduces.
Every run gets an identity (a hash of its resolved config) and a readable run dir
`<out>/<dataset>/<model>/<method>[-<hparams>]/seed<k>/`. Re-running the same command skips runs that
are done or whose recorded job is still pending/running, and submits the rest; runs resume from
their checkpoint however they were stopped. `--dry-run` lists the runs and writes nothing: it needs
neither the datasets nor a writable output root.

GPUs: locally, each run sees one GPU of its own (`--gpus`, default every visible one), K runs per GPU
at a time with `--runs-per-gpu K`; without GPUs, `--parallel` runs share the cores. Under Slurm,
`--runs-per-gpu K` packs K single-process runs per GPU into one array task, each in its own process.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cskd import rundir
from cskd.config import resolve_batch
from cskd.distributed import visible_gpus
from cskd.errors import ConfigError, CskdError, DataError
from cskd.job import assign_gpus
from cskd.methods import METHODS
from launch import runs, slurm, submit
from launch.collect import make_report
from launch.gridspec import REPO, Run, expand, grid_name, grid_paper, load_grid

DEMO_GRID = REPO / "grids" / "demo.yaml"
RESOURCE_FLAGS = ("partition", "nodes", "gpus_per_node", "tasks_per_node", "cpus_per_task", "mem_gb", "time",
                  "array_parallelism", "runs_per_gpu")


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
    todo, replaced, kept = [], [], set()
    for run in all_runs:
        s = status[run.out_dir]
        busy = s.state in ("pending", "running")
        if force and s.detail.startswith(runs.LOCKED):  # --force never deletes files under a live trainer
            print(f"skip   {run.run_id} {run.out_dir} ({s.detail}; stop it first to redo it)")
            kept.add(s.job_id)
        elif force or not (busy or s.state == "done"):
            todo.append(run)
            if busy and s.job_id and s.job_id not in replaced:
                replaced.append(s.job_id)
            note = f" (was {s.state}{': ' + s.detail if s.detail else ''})" if s.state not in ("missing",) else ""
            print(f"todo   {run.run_id} {run.out_dir}{note}")
        else:
            print(f"skip   {run.run_id} {run.out_dir} ({s.state}{', job ' + s.job_id if s.job_id else ''})")
            kept.add(s.job_id)
    # A packed task also trains runs that stay: cancelling it would stop them.
    return todo, [j for j in replaced if j not in kept]


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
    p.add_argument("--runs-per-gpu", dest="runs_per_gpu", type=int, metavar="K",
                   help="K single-process runs share each GPU: locally K at a time per GPU; under Slurm K per GPU "
                        "in one array task, each its own process (default 1)")
    p.add_argument("--local", action="store_true", help="run here even if the grid names a partition")
    p.add_argument("--gpus", help="local runs: the GPUs to use, e.g. 0,1 (default: every visible GPU); each run "
                                  "sees one of them")
    p.add_argument("--parallel", type=int, help="local runs at a time (default: GPUs x runs per GPU, without GPUs "
                                                "half the cores); each gets cores/parallel threads")
    p.add_argument("--force", action="store_true", help="redo finished runs and replace queued ones")
    p.add_argument("--dry-run", action="store_true", help="list the runs and the Slurm request, submit nothing")
    p.add_argument("--wait", action="store_true", help="with Slurm: wait for the jobs, then print the table")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.parallel is not None and args.parallel < 1:  # run_local would wait forever for a free slot
            raise ConfigError(f"--parallel must be >= 1 (local runs at a time), got {args.parallel}")
        root, all_runs = expand(args.grid, args.out)
        resources = resources_of(args.grid, args)
        on_slurm = resources.partition is not None and not args.local
        if on_slurm and args.gpus is not None:
            raise ConfigError("--gpus picks this machine's GPUs for local runs; under Slurm ask for them with "
                              "--gpus-per-node, or add --local")
        if on_slurm:
            return launch_slurm(args, root, all_runs, resources)
        return launch_local(args, root, all_runs, resources)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_runs(args, all_runs: list[Run], world_size: int) -> None:
    """Checks that need no scheduler; they refuse before anything is submitted."""
    for run in all_runs:
        try:
            resolve_batch(run.config.batch, world_size)
        except ConfigError as e:
            raise ConfigError(f"{run.out_dir}: its batch does not fit the {world_size} processes per run of the "
                              f"request (nodes x tasks per node): {e}") from None
        if not args.force:
            rundir.check_same_config(run.config)


def _check_inputs(todo: list[Run]) -> None:
    """What the runs to submit read besides their data (a KD teacher's run dir) must be there now:
    one line, before anything is submitted, rather than one failed job per run."""
    for run in todo:
        METHODS[run.config.method].check_inputs(run.config.method_params)


def _start(args, root: Path, all_runs: list[Run], todo: list[Run]) -> None:
    """Data, --force cleanup and the manifest, just before submission."""
    for path in sorted({r.config.data.path for r in todo}):
        ensure_data(path)
    for run in todo if args.force else ():
        rundir.remove_artifacts(run.out_dir)
        (run.out_dir / rundir.JOB).unlink(missing_ok=True)
    runs.write_manifest(root, grid_name(args.grid), [
        {"run_id": r.run_id, "dir": str(r.out_dir.relative_to(root)), "dataset": Path(r.config.data.path).name,
         "model": r.config.model, "label": r.config.label, "seed": r.config.seed} for r in all_runs],
        paper=grid_paper(args.grid))


def _check_packing(resources: slurm.Resources) -> None:
    """Packing shares one task's GPU between single processes; a DDP run needs its tasks to itself."""
    nproc = resources.nodes * resources.ntasks_per_node
    if resources.runs_per_gpu > 1 and nproc > 1:
        raise ConfigError(f"--runs-per-gpu {resources.runs_per_gpu} packs single-process runs, but these runs have "
                          f"{nproc} processes each (nodes x tasks per node); drop --runs-per-gpu or use "
                          f"--nodes 1 --tasks-per-node 1")


def launch_slurm(args, root: Path, all_runs: list[Run], resources: slurm.Resources) -> int:
    _check_packing(resources)
    per_task = resources.runs_per_task
    packing = f", {per_task} runs per task side by side" if per_task > 1 else ""
    print(f"Slurm request per {'array task' if per_task > 1 else 'run'}: sbatch {' '.join(resources.sbatch_flags())} "
          f"(one job array{packing})")
    _check_runs(args, all_runs, resources.nodes * resources.ntasks_per_node)
    try:
        slurm.check_reachable()
        slurm.validate(resources)  # refused requests fail here, before anything is submitted
    except slurm.SlurmError as e:
        if not args.dry_run:
            raise
        print(f"note: the request was not checked with Slurm: {e}")
    for run in all_runs:  # packed runs split their task's cores
        run.config.threads = run.config.threads or max((resources.cpus_per_task or 0) // per_task,
                                                       1 if resources.cpus_per_task else 0)
    todo, replaced = plan(all_runs, args.force)
    if args.dry_run or not todo:
        print("nothing to submit" if not todo else f"dry run: {len(todo)} run(s) would be submitted")
        return 0 if args.dry_run else _finish(root, args.wait, all_runs)
    _check_inputs(todo)
    if replaced:
        print(f"--force: cancelling {len(replaced)} queued job(s) of these runs: {' '.join(replaced)}")
        slurm.cancel(replaced)
    _start(args, root, all_runs, todo)
    job_ids = submit.submit_slurm(todo, resources, root / "logs", grid_name(args.grid))
    tasks = f" in {len(set(job_ids))} tasks" if per_task > 1 else ""
    print(f"submitted {len(job_ids)} run(s) as job array {job_ids[0].split('_')[0]}{tasks} "
          f"(at most {resources.array_parallelism} tasks at a time); logs in {root / 'logs'}")
    if not args.wait:
        print(f"status: python launch/collect.py {root} --status    table: python launch/collect.py {root}")
        return 0
    return _finish(root, True, all_runs)


def local_gpus(flag: str | None) -> list[str]:
    """The GPUs local runs may use: `--gpus` (e.g. '0,1'), else every visible one; as indices, which is
    how the local executor pins them."""
    gpus = visible_gpus() if flag is None else [g.strip() for g in flag.split(",") if g.strip()]
    for gpu in gpus:
        if not gpu.isdigit():
            where = f"--gpus {flag}" if flag is not None else "CUDA_VISIBLE_DEVICES"
            raise ConfigError(f"{where} names GPU {gpu!r}, not an index; local runs pin GPUs by index: pass "
                              f"--gpus 0,1,...")
    if len(set(gpus)) < len(gpus):
        raise ConfigError(f"--gpus {flag} names a GPU twice; use --runs-per-gpu K to run K runs on each GPU")
    return gpus


def local_slots(gpus: list[str], runs_per_gpu: int, parallel: int | None) -> list[str | None]:
    """What runs at once on this machine: one entry per run slot, the GPU of its runs (None: no GPU).
    With GPUs, runs_per_gpu slots per GPU (at most `parallel` in all); without, `parallel` slots
    (default: half the cores)."""
    if not gpus:
        return [None] * (parallel or max(1, (os.cpu_count() or 2) // 2))
    slots = assign_gpus(gpus, runs_per_gpu, len(gpus) * runs_per_gpu)
    return slots[:parallel] if parallel else slots


def launch_local(args, root: Path, all_runs: list[Run], resources: slurm.Resources) -> int:
    gpus = local_gpus(args.gpus)
    slots = local_slots(gpus, resources.runs_per_gpu, args.parallel)
    if gpus:
        print(f"local: {len(slots)} run(s) at a time on GPU(s) {','.join(gpus)}, at most {resources.runs_per_gpu} "
              f"per GPU")
        if args.parallel and args.parallel > len(slots):
            print(f"note: --parallel {args.parallel} is more than GPUs x runs per GPU; --runs-per-gpu K lets K runs "
                  f"share a GPU")
    elif resources.runs_per_gpu > 1:
        print(f"note: no GPU here, so --runs-per-gpu has no effect: {len(slots)} run(s) at a time (--parallel)")
    threads = max(1, (os.cpu_count() or 1) // len(slots))
    for run in all_runs:
        run.config.threads = run.config.threads or threads
    _check_runs(args, all_runs, 1)
    todo, _ = plan(all_runs, args.force)
    if args.dry_run:
        return 0
    _check_inputs(todo)
    _start(args, root, all_runs, todo)
    submit.run_local(todo, slots, root / "logs")
    return _finish(root, False, all_runs)


def _finish(root: Path, wait: bool, all_runs: list[Run]) -> int:
    """Wait for Slurm jobs (if asked), print the table and every run that did not finish."""
    status = submit.wait([r.out_dir for r in all_runs]) if wait else runs.statuses([r.out_dir for r in all_runs])
    print()
    # Files it cannot write are one warning line: the table is printed anyway. The papers' figures (a
    # t-SNE takes seconds per method) are left to `collect.py`, which the last line points to.
    result = make_report(root, with_figures=False)
    print(result.text, end="")
    tables = [str(p) for p in result.written if p.suffix != ".png"]
    if tables:
        print(f"written: {', '.join(tables)}")
        print(f"the papers' figures in report.html: python launch/collect.py {root}")
    bad = [(d, s) for d, s in status.items() if s.state != "done"]
    for d, s in bad:
        print(f"{s.state}: {d}: {s.detail}" + (f" (log: {s.log})" if s.log else ""), file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
