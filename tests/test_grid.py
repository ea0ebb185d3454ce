import csv
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import REPO, run_cli


def write_grid(path, **grid):
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_demo_grid_cskd_beats_ce_on_every_paired_seed(tmp_path):
    """`make demo`: the real MNIST sample, prepared on the fly, 2 methods x 3 seeds, then the table."""
    res = run_cli([str(REPO / "launch" / "grid.py"), "--out", str(tmp_path / "runs")], timeout=1500, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (tmp_path / "data" / "mnist5k" / "meta.json").exists()  # prepared because it was missing
    root = tmp_path / "runs" / "mnist5k" / "small_cnn"
    final = {(m, s): json.loads((root / m / f"seed{s}" / "summary.json").read_text())["final"]["top1_err"]
             for m in ("ce", "cskd") for s in range(3)}
    for seed in range(3):  # same seed = same initial weights and anchor order: a paired comparison
        assert final[("cskd", seed)] < final[("ce", seed)], final
    table = (tmp_path / "runs" / "results.md").read_text()
    assert table in res.stdout
    assert (tmp_path / "runs" / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert f"the papers' figures in report.html: python launch/collect.py {tmp_path / 'runs'}" in res.stdout
    rows = {r["method"] + "/" + r["epoch"]: r for r in csv.DictReader(open(tmp_path / "runs" / "results.csv"))}
    # the seeds' means, and their 3-model ensembles (the runs keep their test logits)
    assert set(rows) == {f"{m}/{e}" for m in ("ce", "cskd") for e in ("final", "best", "final-ensemble",
                                                                     "best-ensemble")}
    assert all(r["n"] == "3" for r in rows.values())
    assert float(rows["cskd/final"]["rel_vs_ce_pct"]) < 0
    assert float(rows["ce/final"]["mean"]) == pytest.approx(sum(final[("ce", s)] for s in range(3)) / 3)

    again = run_cli([str(REPO / "launch" / "grid.py"), "--out", str(tmp_path / "runs")], timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skip") == 6 and table in again.stdout


def test_failed_run_is_reported_and_others_finish(mnist_dir, tmp_path):
    """A rule sends CS-KD's learning rate through the roof: that run fails, CE finishes, both are reported.
    With `--gpus 0,1` the two runs go at once, each on a GPU of its own (here none exists: they train on
    the CPU, but the assignment is recorded)."""
    grid = write_grid(tmp_path / "g.yaml", name="g", base=str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                      overrides={"data.path": str(mnist_dir), "epochs": 1}, axes={"method": ["ce", "cskd"]},
                      rules=[{"if": {"method": "cskd"}, "set": {"lr": 1e30}}], seeds=[0])
    out = tmp_path / "out"
    res = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(grid), "--out", str(out), "--gpus", "0,1"],
                  timeout=600)
    assert res.returncode == 1
    assert "local: 2 run(s) at a time on GPU(s) 0,1, at most 1 per GPU" in res.stdout
    assert [json.loads((out / "mnist5k" / "small_cnn" / m / "seed0" / "job.json").read_text())["gpu"]
            for m in ("ce", "cskd")] == ["0", "1"]
    assert "FAILED" in res.stdout and "NonFiniteLossError" in res.stdout and "log:" in res.stdout
    assert (out / "mnist5k" / "small_cnn" / "ce" / "seed0" / "summary.json").exists()
    failed = yaml.safe_load((out / "mnist5k" / "small_cnn" / "cskd" / "seed0" / "config.yaml").read_text())
    assert failed["lr"] == 1e30
    assert "failed" in res.stderr and "cskd/seed0" in res.stderr
    assert "ce" in (out / "results.md").read_text()
    status = run_cli([str(REPO / "launch" / "collect.py"), str(out), "--status"], timeout=120)
    assert status.returncode == 0 and "NonFiniteLossError" in status.stdout, status.stdout + status.stderr

    again = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(grid), "--out", str(out), "--dry-run"],
                    timeout=120)
    lines = again.stdout.splitlines()
    assert any(l.startswith("skip") and "/ce/seed0" in l for l in lines)
    assert any(l.startswith("todo") and "/cskd/seed0 (was failed: NonFiniteLossError" in l for l in lines), lines


def test_run_dir_of_another_config_is_refused_before_anything_runs(mnist_dir, tmp_path, capsys):
    from launch.grid import main  # in this process: the bad-grid cases below keep real processes

    grid = write_grid(tmp_path / "g.yaml", name="g", base=str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                      overrides={"data.path": str(mnist_dir), "epochs": 1}, axes={"method": ["ce", "cskd"]},
                      seeds=[0])
    blocked = tmp_path / "out" / "mnist5k" / "small_cnn" / "cskd" / "seed0"
    blocked.mkdir(parents=True)
    (blocked / "config.yaml").write_text("method: cskd\nepochs: 99\n")  # someone else's run
    args = ["--grid", str(grid), "--out", str(tmp_path / "out")]
    res = subprocess.CompletedProcess(args, main(args), *capsys.readouterr())
    assert res.returncode == 2, res.stdout + res.stderr
    assert "holds a run with a different config (differs in: " in res.stderr and "epochs" in res.stderr
    assert "--force" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "mnist5k" / "small_cnn" / "ce").exists()  # nothing started
    assert not (tmp_path / "out" / "grid.json").exists()


def test_dry_run_lists_runs_with_identities(tmp_path, capsys, monkeypatch):
    from launch.grid import main

    monkeypatch.chdir(REPO)  # the demo grid, as `python launch/grid.py` finds it from the repository
    res = subprocess.CompletedProcess([], main(["--dry-run", "--out", str(tmp_path)]), *capsys.readouterr())
    assert res.returncode == 0
    lines = [l.split() for l in res.stdout.splitlines() if l.startswith("todo")]
    assert len(lines) == 6 and len({l[1] for l in lines}) == 6  # six distinct run identities
    assert lines[0][2].endswith("mnist5k/small_cnn/ce/seed0") and not (tmp_path / "mnist5k").exists()


BASE = "configs/mnist5k_small_cnn.yaml"


REAL_PROCESS = ("unknown key(s) axis", "does not fit the 3 processes per run")


@pytest.mark.parametrize("grid, message", [
    ({"base": BASE, "axis": {"method": ["ce"]}}, "unknown key(s) axis"),
    ({"base": BASE, "axes": {"method": []}}, "axis 'method' must be a non-empty list"),
    ({"base": BASE, "axes": {"lrr": [0.1]}}, "unknown config key 'lrr'"),
    ({"base": BASE, "seeds": []}, "'seeds' must be a non-empty list of integers"),
    ({"base": BASE, "rules": [{"if": {"methd": "cskd"}, "set": {"cskd.lam": 3}}]}, "tests unknown config key 'methd'"),
    ({"base": BASE, "rules": [{"when": {"method": "cskd"}}]}, "rules[0] must have exactly the keys 'if' and 'set'"),
    ({"base": BASE, "resources": {"gpus": 1}}, "unknown resources key(s) gpus"),
    ({"base": BASE, "resources": {"partition": "gpu", "nodes": 0}}, "resources.nodes must be an integer >= 1"),
    ({"base": BASE, "resources": {"partition": "gpu", "time": "1:2:3:4"}}, "time limit '1:2:3:4' is not"),
    ({"base": BASE, "resources": {"partition": "gpu", "tasks_per_node": 3}}, "does not fit the 3 processes per run"),
])
def test_bad_grids(tmp_path, capsys, monkeypatch, grid, message):
    args = ["--grid", str(write_grid(tmp_path / "g.yaml", **grid)), "--out", str(tmp_path)]
    if message in REAL_PROCESS:  # as users run it: the exit status and stderr of the real command
        res = run_cli([str(REPO / "launch" / "grid.py"), *args], timeout=120)
        code, err = res.returncode, res.stderr
    else:  # the same main() in this process: 5 s of interpreter and torch start-up less per case
        from launch.grid import main

        monkeypatch.chdir(REPO)
        code, err = main(args), capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_rules_set_per_dataset_hyperparameters_and_identities_differ(tmp_path):
    grid = write_grid(tmp_path / "g.yaml", name="g", base=BASE, axes={"method": ["ce", "cskd"]}, seeds=[0, 1],
                      rules=[{"if": {"method": "cskd", "data.path": ["data/mnist5k", "data/cub200"]},
                              "set": {"cskd.lam": 3}}])
    from launch.grid import expand

    root, runs = expand(grid, tmp_path / "out")
    assert root == tmp_path / "out" and len(runs) == 4 and len({r.run_id for r in runs}) == 4
    lam = {(r.config.method, r.config.seed): getattr(r.config.method_params, "lam", None) for r in runs}
    assert lam[("cskd", 0)] == lam[("cskd", 1)] == 3 and lam[("ce", 0)] is None
    assert runs[2].out_dir == tmp_path / "out" / "mnist5k" / "small_cnn" / "cskd" / "seed0"


def test_partition_without_slurm_names_what_to_check(tmp_path, capsys, monkeypatch):
    """--partition on a machine where Slurm's commands are not found: a one-line error, nothing written."""
    from launch.grid import main

    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))
    monkeypatch.chdir(REPO)
    code = main(["--partition", "gpu", "--out", str(tmp_path / "out")])
    res = subprocess.CompletedProcess([], code, *capsys.readouterr())
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "'scontrol' is not on PATH" in res.stderr and "leave out --partition" in res.stderr
    assert not (tmp_path / "out").exists()


TRICKY = {
    "name": "tricky grid", "base": BASE,
    "axes": {"method": ["ce", "cskd"], "data.path": ["data/my mnist", "/abs/path with spaces/set-2"],
             "lr": [0.1, 5.0e-2, "1e-4"], "nesterov": [True, False]},  # '1e-4': YAML 1.1 reads it as a string
    "overrides": {"weight_decay": "5e-4", "epochs": 3, "data.pipeline": "none"},
    "rules": [{"if": {"method": "cskd", "data.path": ["data/my mnist"]},
               "set": {"cskd.lam": 3, "cskd.temperature": 2.5}},
              {"if": {"lr": ["1e-4", 0.0001], "nesterov": False}, "set": {"momentum": 0.5}}],
    "seeds": [0, 7],
}


def string_round_trip(grid: dict) -> list[dict]:
    """The configs as the expansion used to build them: every value written as `key=<json>` and parsed back."""
    import itertools
    import json

    from cskd.config import load_config, to_dict
    from launch.gridspec import _flat

    base, configs = str(REPO / grid["base"]), []
    fixed = [f"{k}={json.dumps(v)}" for k, v in grid["overrides"].items()]
    for values in itertools.product(*grid["axes"].values()):
        for seed in grid["seeds"]:
            overrides = fixed + [f"{k}={json.dumps(v)}" for k, v in zip(grid["axes"], values)] + [f"seed={seed}"]
            flat = _flat(load_config(base, overrides))
            for rule in grid["rules"]:
                if all(flat[k] in (v if isinstance(v, list) else [v]) for k, v in rule["if"].items()):
                    overrides += [f"{k}={json.dumps(v)}" for k, v in rule["set"].items()]
            configs.append(to_dict(load_config(base, overrides)))
    return configs


def test_expansion_from_nested_dicts_equals_the_string_round_trip(tmp_path):
    from cskd.config import to_dict
    from launch.grid import expand

    path = write_grid(tmp_path / "g.yaml", **TRICKY)
    _, runs = expand(path, tmp_path / "out")
    got = [to_dict(r.config) for r in runs]
    for config in got:
        assert config.pop("out_dir").startswith(str(tmp_path / "out")) and config.pop("label")
    expected = string_round_trip(yaml.safe_load(path.read_text()))  # as read back: the axes in file order
    for config in expected:
        del config["out_dir"], config["label"]
    assert got == expected and len(got) == 48
    paths = {r.config.data.path for r in runs}
    assert paths == {"data/my mnist", "/abs/path with spaces/set-2"}
    assert {r.config.lr for r in runs} == {0.1, 0.05, 1e-4} and {r.config.weight_decay for r in runs} == {5e-4}
    ruled = [r for r in runs if r.config.method == "cskd" and r.config.data.path == "data/my mnist"]
    assert len(ruled) == 12 and all((r.config.method_params.lam, r.config.method_params.temperature) == (3, 2.5)
                                    for r in ruled)
    assert {r.config.momentum for r in runs if r.config.lr == 1e-4 and not r.config.nesterov} == {0.5}
    assert runs[0].out_dir == tmp_path / "out" / "my mnist" / "small_cnn" / "ce-lr0.1-nesterovTrue" / "seed0"
    # identities as the string-based expansion computed them: relaunches recognise earlier runs
    assert [r.run_id for r in runs[:3]] == ["b4c619001d", "bbb92fc1fc", "d43a91cd57"]


@pytest.mark.parametrize("where, grid", [
    ("'overrides'", {"overrides": {"seed": 3}}),
    ("'axes'", {"axes": {"out_dir": ["x"]}}),
    ("rules[0].set", {"rules": [{"if": {"method": "ce"}, "set": {"label": "x"}}]}),
])
def test_grid_cannot_set_its_layout_keys(tmp_path, where, grid):
    from cskd.errors import ConfigError
    from launch.grid import expand

    with pytest.raises(ConfigError, match=rf"{re.escape(where)} sets (seed|out_dir|label): seeds come from the grid's"):
        expand(write_grid(tmp_path / "g.yaml", base=BASE, **grid), tmp_path / "out")


# --- GPUs: one per local run, K runs per GPU, packed Slurm tasks --------------------------------------


@pytest.mark.parametrize("gpus, per_gpu, runs, expected", [
    (["0", "1"], 1, 2, ["0", "1"]),
    (["0", "1"], 2, 4, ["0", "1", "0", "1"]),  # every GPU gets one before any gets a second
    (["0", "1"], 2, 3, ["0", "1", "0"]),
    (["3"], 3, 3, ["3", "3", "3"]),
    ([], 4, 3, [None, None, None]),  # no GPUs: every run keeps what it inherits
])
def test_assign_gpus(gpus, per_gpu, runs, expected):
    from cskd.job import assign_gpus

    assert assign_gpus(gpus, per_gpu, runs) == expected


@pytest.mark.parametrize("gpus, per_gpu, runs, message", [
    (["0", "1"], 1, 3, "3 runs at once do not fit 2 GPU(s) x 1 run(s) per GPU"),
    (["0"], 0, 1, "--runs-per-gpu must be >= 1, got 0"),
])
def test_assign_gpus_refuses(gpus, per_gpu, runs, message):
    from cskd.errors import ConfigError
    from cskd.job import assign_gpus

    with pytest.raises(ConfigError, match=re.escape(message)):
        assign_gpus(gpus, per_gpu, runs)


def test_local_slots_and_gpu_names():
    from cskd.errors import ConfigError
    from launch.grid import local_gpus, local_slots

    assert local_slots(["0", "1"], 2, None) == ["0", "1", "0", "1"]
    assert local_slots(["0", "1"], 2, 3) == ["0", "1", "0"]  # --parallel caps the slots
    assert local_slots([], 2, 3) == [None] * 3  # no GPUs: today's --parallel runs
    assert local_gpus(" 2,0 ") == ["2", "0"]
    with pytest.raises(ConfigError, match="--gpus 0,GPU-1 names GPU 'GPU-1', not an index"):
        local_gpus("0,GPU-1")
    with pytest.raises(ConfigError, match="names a GPU twice; use --runs-per-gpu"):
        local_gpus("1,1")


class FakeLocalJob:
    """Ends after `polls` done() calls; remembers the GPU it was started on."""

    def __init__(self, n: int, gpu, tmp_path):
        self.job_id, self.gpu, self.polls = str(1000 + n), gpu, 2 + n
        self.paths = type("Paths", (), {"stderr": tmp_path / f"{n}.err"})()
        self._process = type("Proc", (), {"pid": os.getpid()})()

    def done(self) -> bool:
        self.polls -= 1
        return self.polls <= 0

    def result(self):
        return None


def test_run_local_gives_each_run_its_slot_gpu_and_reuses_freed_slots(tmp_path, monkeypatch):
    import submitit

    from launch import submit

    started = []

    class FakeExecutor:
        def __init__(self, folder):
            self.params = {}

        def update_parameters(self, **params):
            self.params.update(params)

        def submit(self, job):
            gpus = self.params["visible_gpus"][:self.params["gpus_per_node"]]
            started.append((job.config["out_dir"], gpus, job.env))
            return FakeLocalJob(len(started), gpus, tmp_path)

    monkeypatch.setattr(submitit, "LocalExecutor", FakeExecutor)
    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    todo = [type("Run", (), {"config": type("C", (), {})(), "out_dir": tmp_path / f"r{i}"})() for i in range(3)]
    monkeypatch.setattr(submit, "to_dict", lambda config: {"out_dir": str(config.out_dir)})
    for run in todo:
        run.config.out_dir = run.out_dir
    submit.run_local(todo, ["0", "1"], tmp_path / "logs")
    # runs 0 and 1 start on GPUs 0 and 1; run 0 ends first, and run 2 takes its GPU
    assert [(Path(d).name, g) for d, g, _ in started] == [("r0", (0,)), ("r1", (1,)), ("r2", (0,))]
    assert all(env == {"CSKD_CONCURRENT_RUNS": "2"} for *_, env in started)
    assert [json.loads((r.out_dir / "job.json").read_text())["gpu"] for r in todo] == ["0", "1", "0"]


def test_local_executor_shows_a_run_only_its_gpu(tmp_path):
    """What run_local asks of submitit's local executor reaches the job's environment."""
    import submitit

    from launch.submit import local_parameters

    executor = submitit.LocalExecutor(folder=tmp_path / "%j")
    executor.update_parameters(timeout_min=5, **local_parameters("1"))
    on_gpu = executor.submit(os.getenv, "CUDA_VISIBLE_DEVICES")  # importable in the job, unlike a test's function
    executor.update_parameters(**local_parameters(None))
    without = executor.submit(os.getenv, "CUDA_VISIBLE_DEVICES")
    assert (on_gpu.result(), without.result()) == ("1", "")


def _packed_grid(tmp_path, data_dir, seeds=4, **resources) -> Path:
    return write_grid(tmp_path / "packed.yaml", name="packed", base=BASE_ABS, seeds=list(range(seeds)),
                      overrides={"data.path": str(data_dir), "epochs": 1}, axes={"method": ["ce"]},
                      resources={"partition": "gpu", "gpus_per_node": 1, "cpus_per_task": 4, "time": 60,
                                 **resources})


BASE_ABS = str(REPO / BASE)
FAKE_SBATCH = """#!/bin/bash
# sbatch stand-in: keep the script, answer like sbatch
cp "$1" "$FAKE_SBATCH_DIR/job.sh"
echo "Submitted batch job 4242"
"""


def test_packed_grid_is_one_array_of_packed_tasks(mnist_dir, tmp_path, monkeypatch, capsys):
    """--runs-per-gpu 2 with one GPU per task: 4 runs in 2 array tasks of 2 processes each; each task's
    cores are split between its runs; every run's job.json names its task and a log of its own."""
    import pickle

    from launch import grid, slurm

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(FAKE_SBATCH)
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SBATCH_DIR", str(tmp_path))
    monkeypatch.setattr(slurm, "check_reachable", lambda: None)
    monkeypatch.setattr(slurm, "validate", lambda resources: None)
    out = tmp_path / "out"
    assert grid.main(["--grid", str(_packed_grid(tmp_path, mnist_dir)), "--out", str(out), "--runs-per-gpu", "2"]) == 0
    printed = capsys.readouterr().out
    assert "Slurm request per array task: sbatch --partition=gpu --nodes=1 --ntasks-per-node=1" in printed
    assert "2 runs per task side by side" in printed and "submitted 4 run(s) as job array 4242 in 2 tasks" in printed

    script = (tmp_path / "job.sh").read_text()
    for flag in ("--array=0-1%2", "--gpus-per-node=1", "--cpus-per-task=4", "--ntasks-per-node=1", "--requeue",
                 "--signal=USR2@120", "--job-name=cskd-packed"):
        assert f"#SBATCH {flag}\n" in script, flag
    run_dirs = [out / "mnist5k" / "small_cnn" / "ce" / f"seed{s}" for s in range(4)]
    records = [json.loads((d / "job.json").read_text()) for d in run_dirs]
    assert [r["job_id"] for r in records] == ["4242_0", "4242_0", "4242_1", "4242_1"]
    tasks = {}
    for task in ("4242_0", "4242_1"):
        with open(out / "logs" / task / f"{task}_submitted.pkl", "rb") as f:
            tasks[task] = pickle.load(f).function
    assert {type(t).__name__ for t in tasks.values()} == {"PackedJob"}
    # a preempted or timed-out task resubmits itself whole: every run resumes from its own run dir
    assert all(t.checkpoint().function is t for t in tasks.values())
    names = [name for t in tasks.values() for name, _ in t.runs]
    assert [c["out_dir"] for t in tasks.values() for _, c in t.runs] == [str(d) for d in run_dirs]
    assert all(c["threads"] == 2 for t in tasks.values() for _, c in t.runs)  # 4 cores, 2 runs
    assert [r["log"] for r in records] == [str(out / "logs" / r["job_id"] / f"{n}.log") for r, n in zip(records, names)]


def test_multi_process_runs_are_not_packed(tmp_path, capsys):
    from launch import grid

    code = grid.main(["--grid", str(_packed_grid(tmp_path, tmp_path / "nodata")), "--out", str(tmp_path / "out"),
                      "--tasks-per-node", "2", "--runs-per-gpu", "2", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0] == ("error: --runs-per-gpu 2 packs single-process runs, but these runs have 2 processes each "
                      "(nodes x tasks per node); drop --runs-per-gpu or use --nodes 1 --tasks-per-node 1")
    assert not (tmp_path / "out").exists()


def test_packed_task_reports_each_run_from_its_own_log(mnist_dir, tmp_path):
    """The in-task runner, as a Slurm array task runs it (here through submitit's local executor): both
    runs start, each in its own process, and fail at once for reasons of their own; each reason is in
    its own log and in the task's log, and the task fails naming both. (A packed task whose runs train
    is tested against the local Slurm.)"""
    import submitit

    from cskd.config import load_config, to_dict
    from cskd.job import PackedJob, packed_log

    def config(name: str, *overrides: str) -> dict:
        return to_dict(load_config(BASE_ABS, [f"data.path={mnist_dir}", f"out_dir={tmp_path / name}", "epochs=1",
                                              "threads=1", *overrides]))

    runs = [("big", config("big", "batch_size=100000")), ("nodata", config("nodata", f"data.path={tmp_path}/none"))]
    executor = submitit.LocalExecutor(folder=tmp_path / "logs" / "%j")
    executor.update_parameters(timeout_min=10)
    job = executor.submit(PackedJob(runs, runs_per_gpu=2))
    with pytest.raises(submitit.core.utils.FailedJobError) as failed:
        job.result()
    said = str(failed.value)
    assert "2 of 2 packed runs failed:" in said and f"{tmp_path / 'big'}: ConfigError: " in said, said[-2000:]
    assert f"{tmp_path / 'nodata'}: DataError: " in said and str(packed_log(job.paths.folder, "big")) in said
    big, nodata = (packed_log(job.paths.folder, name).read_text() for name in ("big", "nodata"))
    assert "100000 is larger than the 4000 training samples" in big and "DataError" not in big
    assert nodata.startswith("DataError: ") and "ConfigError" not in nodata
    task_log = job.paths.stdout.read_text()
    assert task_log.count("started ") == 2 and task_log.count("FAILED ") == 2, task_log
