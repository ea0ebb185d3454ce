"""The CS-KD paper's grids (grids/cskd2020_*.yaml) and the grid-file features they use.

Every grid file dry-runs without its datasets and without writing anything; each paper grid crosses
exactly its table's (dataset, model) cells with its methods and 3 seeds, with the paper's recipe;
the `config:` axis and the `paper:` declaration behave as documented in the README.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, assert_refused, file_tree

GRIDS = sorted((REPO / "grids").glob("*.yaml"))
PAPER_GRIDS = sorted((REPO / "grids").glob("cskd2020_*.yaml"))

SMALL = {"cifar100", "tinyimagenet"}  # 32-px sets, batch 128
FINE = {"cub200", "dogs", "mit67", "mixed"}  # 224-px sets, batch 32
LAM = {"cifar100": 1, "tinyimagenet": 1, "imagenet": 1, "cub200": 3, "dogs": 3, "mit67": 3, "mixed": 3}
PIPELINE = {"cifar100": "cifar", "tinyimagenet": "tinyimagenet32"} | dict.fromkeys(FINE | {"imagenet"}, "imagenet224")
CLASSWISE = ("cskd", "cskd_e", "mixup_cskd", "kd_cskd")  # the methods with CS-KD's lambda and T


def cells(small: str, fine: str) -> set[tuple[str, str]]:
    return {(d, small) for d in ("cifar100", "tinyimagenet")} | {(d, fine) for d in ("cub200", "dogs", "mit67")}


R18 = cells("preact_resnet18", "resnet18")
TABLES = {  # grid -> (paper table, (dataset folder, model) cells, methods)
    "cskd2020_table1": ("1", R18 | cells("densenet121_bc_cifar", "densenet121"),
                        {"ce", "ls", "maxent", "adacos", "vsoftmax", "cskd"}),
    "cskd2020_table2": ("2", R18, {"ce", "ddgsd", "byot", "cskd"}),
    "cskd2020_table3": ("3", R18, {"ce", "mixup", "mixup_cskd", "cskd"}),
    "cskd2020_table4": ("4", cells("preact_resnet10", "resnet10"), {"ce", "kd", "kd_cskd", "cskd"}),
    "cskd2020_table5": ("5", {("imagenet", m) for m in ("resnet50", "resnet101", "resnext101_32x4d")}, {"ce", "cskd"}),
    "cskd2020_table6": ("6", R18, {"ce", "ls", "maxent", "adacos", "vsoftmax", "cskd", "cskd_e"}),
    "cskd2020_hierarchy": ("fig4_text", {("mixed", "resnet18")}, {"ce", "cskd"}),
}
RUN_COUNTS = {"cskd2020_table1": 180, "cskd2020_table2": 60, "cskd2020_table3": 60, "cskd2020_table4": 60,
              "cskd2020_table5": 18, "cskd2020_table6": 105, "cskd2020_hierarchy": 6, "demo": 6, "mnist5k_slurm": 6,
              "pskd2021_table1": 60, "pskd2021_table1_tfkd": 15, "pskd2021_table2": 18, "pskd2021_table2_shakedrop": 6,
              "pskd2021_table3": 45, "pskd2021_table4": 8, "pskd2021_table4_tfkd": 2}


def test_every_paper_grid_is_listed():
    assert {g.stem for g in PAPER_GRIDS} == set(TABLES) and {g.stem for g in GRIDS} == set(RUN_COUNTS)


@pytest.mark.parametrize("grid", GRIDS, ids=[g.stem for g in GRIDS])
def test_dry_run_needs_no_data_and_writes_nothing(grid, tmp_path, monkeypatch, capsys):
    """From an empty directory (no data/ anywhere near): every run listed as todo, exit 0, no file written.
    In this process (the command's `main`), as a fresh process would only add torch's import time."""
    from launch import grid as launcher

    monkeypatch.chdir(tmp_path)
    code = launcher.main(["--grid", str(grid), "--dry-run", "--out", str(tmp_path / "out")])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stdout[-2000:] + stderr[-2000:]
    todo = [line for line in stdout.splitlines() if line.startswith("todo")]
    assert len(todo) == RUN_COUNTS[grid.stem] and len({line.split()[1] for line in todo}) == len(todo)
    assert file_tree(tmp_path) == {}, "a dry run wrote files"


@pytest.mark.parametrize("name", sorted(TABLES))
def test_paper_grid_crosses_its_cells_with_the_papers_recipe(name):
    from launch.gridspec import expand, grid_paper

    path = REPO / "grids" / f"{name}.yaml"
    table, want_cells, methods = TABLES[name]
    assert grid_paper(path) == {"paper": "cskd2020", "table": table}
    root, runs = expand(path, None)
    assert root == REPO / "runs" / name
    seen = {}
    for run in runs:
        cfg, dataset = run.config, Path(run.config.data.path).name
        assert cfg.data.path == f"data/{dataset}" and cfg.data.pipeline == PIPELINE[dataset]
        seen.setdefault((dataset, cfg.model, cfg.method), set()).add(cfg.seed)
        assert run.out_dir == root / dataset / cfg.model / cfg.method / f"seed{cfg.seed}"
        assert cfg.label == cfg.method
        epochs, batch = (90, 256) if dataset == "imagenet" else (200, 128 if dataset in SMALL else 32)
        assert (cfg.epochs, cfg.batch.global_, cfg.lr, cfg.momentum, cfg.weight_decay) == (
            epochs, batch, 0.1, 0.9, 1e-4)
        assert (cfg.lr_schedule, cfg.nesterov, cfg.amp, cfg.sync_bn) == ("step_reference", False, False, False)
        if cfg.method in CLASSWISE:
            assert (cfg.method_params.lam, cfg.method_params.temperature) == (LAM[dataset], 4), (name, dataset)
    assert set(seen) == {(d, m, method) for d, m in want_cells for method in methods}
    assert all(seeds == {0, 1, 2} for seeds in seen.values())
    assert len(runs) == len(want_cells) * len(methods) * 3 == RUN_COUNTS[name]


def test_table4_teachers_are_table1_densenet_cskd_seed0_runs():
    """KD and KD+CS-KD read the Table 1 run dir of the DenseNet-121 CS-KD run (seed 0) on the same dataset."""
    from launch.gridspec import expand

    _, table1 = expand(REPO / "grids" / "cskd2020_table1.yaml", None)
    teacher_dirs = {Path(r.config.data.path).name: r.out_dir for r in table1
                    if r.config.method == "cskd" and r.config.seed == 0 and "densenet" in r.config.model}
    assert len(teacher_dirs) == 5
    _, table4 = expand(REPO / "grids" / "cskd2020_table4.yaml", None)
    students = [r for r in table4 if r.config.method in ("kd", "kd_cskd")]
    assert len(students) == 30
    for run in students:
        assert REPO / run.config.method_params.teacher == teacher_dirs[Path(run.config.data.path).name]


@pytest.mark.parametrize("name", sorted(TABLES))
def test_paper_grid_resources(name):
    """One GPU per run, a whole 8-GPU node (one process per GPU, 32 images each) for ImageNet; the
    partition comes from the command line."""
    from launch.grid import _parser, resources_of

    res = resources_of(REPO / "grids" / f"{name}.yaml", _parser().parse_args([]))
    assert res.partition is None and res.nodes == 1 and res.cpus_per_task and res.mem_gb
    if name == "cskd2020_table5":
        assert (res.gpus_per_node, res.ntasks_per_node, 256 // res.ntasks_per_node) == (8, 8, 32)
    else:
        assert (res.gpus_per_node, res.ntasks_per_node) == (1, 1)


# --- the grid-file features --------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_config_axis_replaces_base_and_stays_out_of_the_label(tmp_path):
    """Each config file (relative to the grid, else to the repository) is the base of its runs."""
    write(tmp_path / "cfg" / "a.yaml", "data: {path: data/set_a}\nmodel: small_cnn\nepochs: 3\ncskd: {lam: 2}\n")
    grid = write(tmp_path / "g.yaml", yaml.safe_dump({
        "name": "g", "base": "configs/mnist5k_small_cnn.yaml",
        "axes": {"config": ["cfg/a.yaml", "configs/mnist5k_small_cnn.yaml"], "method": ["ce", "cskd"]},
        "seeds": [0]}))
    from launch.gridspec import expand

    root, runs = expand(grid, tmp_path / "out")
    got = {(Path(r.config.data.path).name, r.config.method): r for r in runs}
    assert len(runs) == 4 and set(got) == {(d, m) for d in ("set_a", "mnist5k") for m in ("ce", "cskd")}
    assert got[("set_a", "cskd")].config.epochs == 3 and got[("set_a", "cskd")].config.method_params.lam == 2
    assert got[("mnist5k", "cskd")].config.epochs == 15 and got[("mnist5k", "cskd")].config.method_params.lam == 1
    assert got[("set_a", "cskd")].out_dir == root / "set_a" / "small_cnn" / "cskd" / "seed0"
    assert {r.config.label for r in runs} == {"ce", "cskd"}


@pytest.mark.parametrize("config, fragment", [
    (["cfg/missing.yaml"], "config file {tmp}/cfg/missing.yaml does not exist"),
    (["cfg/bad.yaml"], "config file {tmp}/cfg/bad.yaml is not valid YAML"),
    ([3], "axis 'config' lists config files; 3 is not a path"),
    (["cfg/a.yaml", "cfg/a.yaml"], "axis 'config' lists 'cfg/a.yaml' twice"),
    (["cfg/a.yaml", "cfg/a_too.yaml"], "the runs {config='cfg/a.yaml'} and {config='cfg/a_too.yaml'} would share"),
])
def test_bad_config_axis_is_one_line(tmp_path, capsys, config, fragment):
    from launch import grid

    write(tmp_path / "cfg" / "a.yaml", "model: small_cnn\n")
    write(tmp_path / "cfg" / "a_too.yaml", "model: small_cnn\nepochs: 3\n")
    write(tmp_path / "cfg" / "bad.yaml", "model: [small_cnn\n")
    path = write(tmp_path / "g.yaml", yaml.safe_dump({"axes": {"config": config}}))
    before = file_tree(tmp_path)
    code = grid.main(["--grid", str(path), "--out", str(tmp_path / "out")])
    assert_refused(SimpleNamespace(returncode=code, stderr=capsys.readouterr().err),
                   fragment.replace("{tmp}", str(tmp_path)), before, tmp_path)


@pytest.mark.parametrize("paper", [
    "cskd2020", {"paper": "cskd2020"}, {"paper": "cskd2020", "table": 1},
    {"paper": "cskd2020", "table": "1", "metric": "top1_err"}, {"paper": "", "table": "1"},
])
def test_bad_paper_declaration_is_one_line(tmp_path, capsys, paper):
    from launch import grid

    path = write(tmp_path / "g.yaml", yaml.safe_dump({"base": "configs/mnist5k_small_cnn.yaml", "paper": paper}))
    before = file_tree(tmp_path)
    code = grid.main(["--grid", str(path), "--out", str(tmp_path / "out")])
    assert_refused(SimpleNamespace(returncode=code, stderr=capsys.readouterr().err),
                   "'paper' must be a mapping of exactly the string keys 'paper' and 'table'", before, tmp_path)


def test_manifest_records_the_paper_table(tmp_path):
    """grid.json carries the grid's `paper:` (null when it declares none), for collect to find the paper's numbers."""
    from launch import grid

    for name, paper in (("with", {"paper": "cskd2020", "table": "2"}), ("without", None)):
        text = {"name": name, "base": "configs/mnist5k_small_cnn.yaml"} | ({"paper": paper} if paper else {})
        path = write(tmp_path / f"{name}.yaml", yaml.safe_dump(text))
        root, runs = grid.expand(path, tmp_path / name)
        grid._start(SimpleNamespace(force=False, grid=path), root, runs, [])  # no run to start: the manifest only
        manifest = json.loads((root / "grid.json").read_text())
        assert manifest["paper"] == paper and manifest["name"] == name and len(manifest["runs"]) == 1


def test_a_rule_may_supply_what_the_method_requires(tmp_path, capsys):
    """kd needs a teacher: a rule on data.path supplies it per dataset; without the rule, one line names the key."""
    from launch import grid

    teacher = {"if": {"data.path": "data/mnist5k"}, "set": {"kd.teacher": "runs/t/mnist5k/small_cnn/cskd/seed0"}}
    text = {"base": "configs/mnist5k_small_cnn.yaml", "axes": {"method": ["ce", "kd"]}, "seeds": [0]}
    _, runs = grid.expand(write(tmp_path / "ok.yaml", yaml.safe_dump(text | {"rules": [teacher]})), tmp_path / "o")
    assert [r.config.method_params.teacher for r in runs if r.config.method == "kd"] == [teacher["set"]["kd.teacher"]]
    path = write(tmp_path / "no_rule.yaml", yaml.safe_dump(text))
    before = file_tree(tmp_path)
    code = grid.main(["--grid", str(path), "--out", str(tmp_path / "out")])
    assert_refused(SimpleNamespace(returncode=code, stderr=capsys.readouterr().err), "'kd.teacher' is empty",
                   before, tmp_path)
