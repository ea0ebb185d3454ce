"""The PS-KD paper's grids (grids/pskd2021_*.yaml): each crosses its table's cells with its methods
and the paper's recipe, declares its tables, and finds its TF-KD teachers where the CE grids put them.
That every grid dry-runs without data is tests/test_paper_grids.py's."""
from __future__ import annotations

import pytest
from conftest import REPO

CIFAR = {"preact_resnet18", "resnet101_cifar", "densenet121_bc_cifar", "resnext29_8x64d", "pyramidnet200_a240"}
PYRAMID = {"pyramidnet200_a240", "pyramidnet200_a240_shakedrop"}
GRIDS = {  # grid -> (declared tables, models, methods, seeds)
    "pskd2021_table1": (["1", "3"], CIFAR, {"ce", "ls", "cskd", "pskd"}, {0, 1, 2}),
    "pskd2021_table1_tfkd": (["1", "3"], CIFAR, {"tfkd"}, {0, 1, 2}),
    "pskd2021_table2": (["2"], {"pyramidnet200_a240"}, {"ce", "cutout", "pskd_cutout", "cutmix", "pskd_cutmix", "pskd"},
                        {0, 1, 2}),
    "pskd2021_table2_shakedrop": (["2"], {"pyramidnet200_a240_shakedrop"}, {"cutmix", "pskd_cutmix"}, {0, 1, 2}),
    "pskd2021_table3": (["3"], CIFAR, {"ce", "cskd", "pskd"}, {0, 1, 2}),
    "pskd2021_table4": (["4"], {"resnet152"}, {"ce", "ls", "cskd", "pskd", "cutmix", "ls_cutmix", "cskd_cutmix",
                                               "pskd_cutmix"}, {0}),
    "pskd2021_table4_tfkd": (["4"], {"resnet152"}, {"tfkd", "tfkd_cutmix"}, {0}),
}


def expand(name: str):
    from launch.gridspec import expand as expand_grid

    return expand_grid(REPO / "grids" / f"{name}.yaml", None)


def test_every_pskd_grid_is_listed():
    assert {g.stem for g in (REPO / "grids").glob("pskd2021_*.yaml")} == set(GRIDS)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_pskd_grid_crosses_its_cells_with_the_papers_recipe(name):
    from launch.gridspec import grid_paper

    tables, models, methods, seeds = GRIDS[name]
    declared = grid_paper(REPO / "grids" / f"{name}.yaml")
    declared = declared if isinstance(declared, list) else [declared]
    assert declared == [{"paper": "pskd2021", "table": t} for t in tables]
    root, runs = expand(name)
    assert root == REPO / "runs" / name
    seen = {}
    for run in runs:
        cfg = run.config
        seen.setdefault((cfg.model, cfg.method), set()).add(cfg.seed)
        assert (cfg.momentum, cfg.nesterov, cfg.lr_schedule, cfg.ece_bins, cfg.amp) == (0.9, True, "milestones", 10,
                                                                                         False)
        if cfg.model == "resnet152":  # ImageNet, Sec. 4.2
            assert cfg.data.path == "data/imagenet" and (cfg.data.color_jitter, cfg.data.lighting) == (0.4, 0.1)
            assert (cfg.epochs, cfg.lr_milestones, cfg.batch.global_, cfg.lr, cfg.weight_decay) == (
                90, [30, 60], 256, 0.1, 1e-4)
        else:  # CIFAR-100, Sec. 4.1: PyramidNet's own batch, lr and weight decay
            assert cfg.data.path == "data/cifar100" and cfg.data.pipeline == "cifar"
            assert (cfg.epochs, cfg.lr_milestones) == (300, [150, 225])
            assert (cfg.batch.global_, cfg.lr, cfg.weight_decay) == ((64, 0.25, 1e-4) if cfg.model in PYRAMID
                                                                  else (128, 0.1, 5e-4))
        if cfg.method.startswith("pskd"):
            imagenet = cfg.model == "resnet152"
            assert (cfg.method_params.alpha_T, cfg.method_params.teacher) == ((0.3, "model") if imagenet
                                                                              else (0.8, "table"))
        if cfg.method in ("cutmix", "ls_cutmix", "cskd_cutmix", "tfkd_cutmix"):
            assert (cfg.method_params.beta, cfg.method_params.prob) == (1.0, 1.0 if cfg.model == "resnet152" else 0.5)
        if "cutout" in cfg.method:
            assert cfg.method_params.size == 8
    assert set(seen) == {(m, method) for m in models for method in methods}
    assert all(s == seeds for s in seen.values())


@pytest.mark.parametrize("student, teacher", [("pskd2021_table1_tfkd", "pskd2021_table1"),
                                              ("pskd2021_table4_tfkd", "pskd2021_table4")])
def test_tfkd_teachers_are_the_ce_seed0_runs_of_the_same_architecture(student, teacher):
    """TF-KD's self variant: a pretrained network of the student's own architecture (PS-KD Sec. 2)."""
    _, teachers = expand(teacher)
    ce = {r.config.model: r.out_dir for r in teachers if r.config.method == "ce" and r.config.seed == 0}
    _, students = expand(student)
    assert students
    for run in students:
        assert run.config.method_params.mode == "self"
        assert REPO / run.config.method_params.teacher == ce[run.config.model]


def test_imagenet_runs_take_a_whole_node():
    from launch.grid import _parser, resources_of

    for name in ("pskd2021_table4", "pskd2021_table4_tfkd"):
        res = resources_of(REPO / "grids" / f"{name}.yaml", _parser().parse_args([]))
        assert (res.nodes, res.gpus_per_node, res.ntasks_per_node, 256 // res.ntasks_per_node) == (1, 8, 8, 32)
