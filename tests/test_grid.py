import csv
import re
import json

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
    """A rule sends CS-KD's learning rate through the roof: that run fails, CE finishes, both are reported."""
    grid = write_grid(tmp_path / "g.yaml", name="g", base=str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                      overrides={"data.path": str(mnist_dir), "epochs": 1}, axes={"method": ["ce", "cskd"]},
                      rules=[{"if": {"method": "cskd"}, "set": {"lr": 1e30}}], seeds=[0])
    out = tmp_path / "out"
    res = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(grid), "--out", str(out)], timeout=600)
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "NonFiniteLossError" in res.stdout and "log:" in res.stdout
    assert (out / "mnist5k" / "small_cnn" / "ce" / "seed0" / "summary.json").exists()
    failed = yaml.safe_load((out / "mnist5k" / "small_cnn" / "cskd" / "seed0" / "config.yaml").read_text())
    assert failed["lr"] == 1e30
    assert "failed" in res.stderr and "cskd/seed0" in res.stderr
    assert "ce" in (out / "results.md").read_text()
    status = run_cli([str(REPO / "launch" / "collect.py"), str(out), "--status"], timeout=120)
    assert status.returncode == 0 and "NonFiniteLossError" in status.stdout, status.stdout + status.stderr

    again = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(grid), "--out", str(out), "--dry-run"], timeout=120)
    lines = again.stdout.splitlines()
    assert any(l.startswith("skip") and "/ce/seed0" in l for l in lines)
    assert any(l.startswith("todo") and "/cskd/seed0 (was failed: NonFiniteLossError" in l for l in lines), lines


def test_run_dir_of_another_config_is_refused_before_anything_runs(mnist_dir, tmp_path):
    grid = write_grid(tmp_path / "g.yaml", name="g", base=str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                      overrides={"data.path": str(mnist_dir), "epochs": 1}, axes={"method": ["ce", "cskd"]},
                      seeds=[0])
    blocked = tmp_path / "out" / "mnist5k" / "small_cnn" / "cskd" / "seed0"
    blocked.mkdir(parents=True)
    (blocked / "config.yaml").write_text("method: cskd\nepochs: 99\n")  # someone else's run
    res = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(grid), "--out", str(tmp_path / "out")],
                  timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "holds a run with a different config (differs in: " in res.stderr and "epochs" in res.stderr
    assert "--force" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out" / "mnist5k" / "small_cnn" / "ce").exists()  # nothing started
    assert not (tmp_path / "out" / "grid.json").exists()


def test_dry_run_lists_runs_with_identities(tmp_path):
    res = run_cli([str(REPO / "launch" / "grid.py"), "--dry-run", "--out", str(tmp_path)], timeout=120)
    assert res.returncode == 0
    lines = [l.split() for l in res.stdout.splitlines() if l.startswith("todo")]
    assert len(lines) == 6 and len({l[1] for l in lines}) == 6  # six distinct run identities
    assert lines[0][2].endswith("mnist5k/small_cnn/ce/seed0") and not (tmp_path / "mnist5k").exists()


BASE = "configs/mnist5k_small_cnn.yaml"


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
    ({"base": BASE, "resources": {"partition": "gpu", "tasks_per_node": 3}}, "does not divide by the 3 processes"),
])
def test_bad_grids(tmp_path, grid, message):
    res = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(write_grid(tmp_path / "g.yaml", **grid)),
                   "--out", str(tmp_path)], timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr


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


def test_partition_without_slurm_names_what_to_check(tmp_path):
    """--partition on a machine where Slurm's commands are not found: a one-line error, nothing written."""
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    res = run_cli([str(REPO / "launch" / "grid.py"), "--partition", "gpu", "--out", str(tmp_path / "out")],
                  timeout=120, env={"PATH": str(empty_bin)})
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
