"""Every method of the CS-KD and PS-KD papers trains end to end on the real MNIST sample: few runs, shared.

Three local grids (launch/grid.py, two runs at a time), then kills:
1. `ce` and `cskd` on seed 0 (4 epochs): CS-KD's run is the KD and TF-KD teacher below (that CS-KD
   beats CE on each of 3 paired seeds is asserted by the demo grid's test, tests/test_grid.py);
2. `ls`, `cskd_e`, `mixup_cskd` and `kd_cskd` on the same seed: each must reach a test error
   below twice CE's (a broken loss lands near chance, 90%);
3. every other method for 2 epochs (seed 0, deterministic): finite metrics, better than chance
   (PS-KD with both teachers: the table in `pskd`, the epoch-start network in `pskd_cutmix`);
4. the stateful methods (AdaCos's scale, KD's teacher, Mixup's RNG draws, PS-KD's prediction table)
   killed with SIGKILL while saving their second epoch, then resumed: the result equals grid 3's
   uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cskd import rundir
from conftest import REPO, run_cli

GRID = str(REPO / "launch" / "grid.py")
KILL_AT = str(REPO / "tests" / "kill_at.py")
BASE = str(REPO / "configs" / "mnist5k_small_cnn.yaml")
SEEDS = [0]  # one paired seed: a broken loss is far from 2x CE's error on any seed
COMPARED = ["ls", "cskd_e", "mixup_cskd", "kd_cskd"]
SMOKE = ["maxent", "adacos", "vsoftmax", "ddgsd", "byot", "mixup", "kd", "pskd", "pskd_cutmix", "pskd_cutout", "cutmix",
         "cutout", "ls_cutmix", "cskd_cutmix", "tfkd", "tfkd_cutmix"]
STATEFUL = ["adacos", "kd", "mixup", "pskd"]
TEACHER_KEYS = ("kd.teacher", "kd_cskd.teacher", "tfkd.teacher", "tfkd_cutmix.teacher")
# PS-KD's second teacher, the network as the epoch started, and TF-KD's hand-designed one.
SMOKE_RULES = [{"if": {"method": "pskd_cutmix"}, "set": {"pskd_cutmix.teacher": "model"}},
               {"if": {"method": "tfkd_cutmix"}, "set": {"tfkd_cutmix.mode": "reg", "tfkd_cutmix.prob": 1.0}}]


def run_grid(path: Path, out: Path, **grid) -> dict[tuple[str, int], dict]:
    """Run a grid here (2 at a time); return each run's summary by (method, seed)."""
    path.write_text(yaml.safe_dump({"name": path.stem, "base": BASE, **grid}))
    res = run_cli([GRID, "--grid", str(path), "--out", str(out), "--parallel", "2"], timeout=1200)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summaries = {}
    for method in grid["axes"]["method"]:
        for seed in grid["seeds"]:
            path = out / "mnist5k" / "small_cnn" / method / f"seed{seed}" / "summary.json"
            summaries[(method, seed)] = json.loads(path.read_text())
    return summaries


@pytest.fixture(scope="module")
def grids(mnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("methods")
    # The device-resident loader: the same batches as FFCV's (tests/test_device_data.py) without FFCV's
    # JIT compilation in every run's process, most of a short run's time.
    # Every run keeps its per-sample probabilities (log_per_sample), for the figures (tests/test_figures.py).
    fixed = {"data.path": str(mnist_dir), "data.loader": "device", "epochs": 4, "log_per_sample": True}
    baseline = run_grid(root / "baseline.yaml", root / "baseline", overrides=fixed, axes={"method": ["ce", "cskd"]},
                        seeds=SEEDS)  # side by side
    teacher = root / "baseline" / "mnist5k" / "small_cnn" / "cskd" / "seed0"
    with_teacher = {**fixed, **{key: str(teacher) for key in TEACHER_KEYS}}
    compared = run_grid(root / "compared.yaml", root / "compared", overrides=with_teacher,
                        axes={"method": COMPARED}, seeds=SEEDS)
    smoke = run_grid(root / "smoke.yaml", root / "smoke", overrides={**with_teacher, "epochs": 2,
                                                                      "deterministic": True},
                     axes={"method": SMOKE}, rules=SMOKE_RULES, seeds=[0])
    return {"root": root, "teacher": teacher, "baseline": baseline, "compared": compared, "smoke": smoke}


def test_cskd_variants_learn_on_paired_seeds(grids):
    err = {key: s["final"]["top1_err"] for part in ("baseline", "compared") for key, s in grids[part].items()}
    for method in COMPARED:
        for seed in SEEDS:
            assert err[(method, seed)] < 2 * err[("ce", seed)], (method, seed, err)
    assert err[("cskd", 0)] < 2 * err[("ce", 0)], err  # the teacher
    for (method, _), summary in grids["compared"].items():
        assert summary["method"] == method and summary["epochs"] == 4


def test_every_other_method_trains_with_finite_metrics(grids):
    for (method, _), summary in grids["smoke"].items():
        for kind in ("final", "best"):
            metrics = summary[kind]
            assert all(math.isfinite(v) for k, v in metrics.items() if isinstance(v, float)), (method, metrics)
        assert summary["final"]["top1_err"] < 85, (method, summary["final"])  # chance is 90%


def test_stateful_methods_killed_and_resumed_match_the_uninterrupted_runs(grids, tmp_path):
    """Each method's kill and resume run beside the others' (2 cores): the results must not depend on it."""
    args = {m: ["-m", "cskd.train", "--config", str(grids["root"] / "smoke" / "mnist5k" / "small_cnn" / m / "seed0" /
                                                       "config.yaml"), f"out_dir={tmp_path / m}"] for m in STATEFUL}
    killed = run_all({m: [KILL_AT, "checkpoint-mid", "2", *a[2:]] for m, a in args.items()})  # saving epoch 2
    for method, res in killed.items():
        assert res.returncode == -9, (method, res.stderr[-3000:])
        assert not (tmp_path / method / "summary.json").exists()
    for method, res in run_all(args).items():
        assert res.returncode == 0 and "resuming" in res.stdout, (method, res.stderr[-3000:])
        got = json.loads((tmp_path / method / "summary.json").read_text())
        want = grids["smoke"][(method, 0)]
        assert (got["final"], got["best"]) == (want["final"], want["best"]), method
        for name in (rundir.TRAIN_CORRECT, rundir.TRAIN_PROBS):  # the killed epoch's rows were cut, then rewritten
            straight = grids["root"] / "smoke" / "mnist5k" / "small_cnn" / method / "seed0" / name
            assert (tmp_path / method / name).read_bytes() == straight.read_bytes(), (method, name)


def run_all(commands: dict[str, list[str]], timeout: float = 600) -> dict[str, subprocess.CompletedProcess]:
    """`python <args>` for every entry at once, like conftest.run_cli; each result by its key."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {k: subprocess.Popen([sys.executable, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env=env, cwd=REPO) for k, a in commands.items()}
    results = {}
    for key, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            proc.kill()
        results[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


def test_a_kd_student_checkpoint_holds_no_teacher(grids):
    import torch

    student = grids["root"] / "smoke" / "mnist5k" / "small_cnn" / "kd" / "seed0"
    teacher = torch.load(grids["teacher"] / "checkpoint.pt", weights_only=True)
    saved = torch.load(student / "checkpoint.pt", weights_only=True)
    assert set(saved["model"]) == set(teacher["model"])  # the student's own small_cnn, nothing else
    assert yaml.safe_load((student / "config.yaml").read_text())["kd"]["teacher"] == str(grids["teacher"])


def test_collect_tables_every_method(grids, capsys):
    from launch.collect import main

    assert main([str(grids["root"])]) == 0  # in this process: tests/test_collect.py runs the command itself
    out, err = capsys.readouterr()
    assert "warning" not in err, err
    rows = {line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")}
    assert {"ce", "cskd", *COMPARED, *SMOKE} <= rows, out
    # report.html embeds every figure these runs allow (all but CS-KD's Fig. 4: MNIST has no superclasses)
    drawn = sorted((grids["root"] / "figures").glob("*.png"))
    assert [p.name for p in drawn] == [f"{name}_mnist5k{'' if name == 'pskd_fig3' else '_small_cnn'}.png" for name in
                                       ("cskd_fig1b", "cskd_fig2", "cskd_fig3", "cskd_fig5", "pskd_fig2", "pskd_fig3",
                                        "pskd_fig4")]
    page = (grids["root"] / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == len(drawn) + 1  # and the reliability overlay


def test_eval_adds_hierarchy_accuracy_where_the_dataset_records_superclasses(grids, mnist_dir, tmp_path):
    """As on datasets_prep's `mixed` (387 classes in bird/dog/indoor): here digits 0-4 'low', 5-9 'high'."""
    data = tmp_path / "mnist5k"
    data.mkdir()
    for name in ("train.beton", "test.beton"):
        (data / name).symlink_to(mnist_dir / name)
    meta = json.loads((mnist_dir / "meta.json").read_text())
    (data / "meta.json").write_text(json.dumps({**meta, "superclass_of_class": ["low"] * 5 + ["high"] * 5}))
    out = tmp_path / "eval.json"
    res = run_cli(["-m", "cskd.eval", str(grids["teacher"]), "--data", str(data), "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"hier_acc", "hier_acc_low", "hier_acc_high"} <= set(result)
    # a prediction in the right superclass is either right or a confusion within it
    assert 100 - result["top1_err"] <= result["hier_acc"] <= 100
    plain = grids["baseline"][("cskd", 0)]["final"]
    assert "hier_acc" not in plain and result["top1_err"] == pytest.approx(plain["top1_err"])


def test_the_papers_figures_from_the_real_runs(grids):
    """The figures of these grids' real runs (one group: mnist5k / small_cnn, seed 0) plot what the run dirs hold,
    computed here directly from their files. CS-KD's t-SNE is left to tests/test_figures.py (seconds per method)."""
    import numpy as np
    import torch

    from cskd import checkpoint, sample_log
    from launch import collect, figure_runs, figures

    root = grids["root"]
    run = {m: root / part / "mnist5k" / "small_cnn" / m / "seed0" for part, ms in
           (("baseline", ("ce", "cskd")), ("smoke", ("pskd",))) for m in ms}
    (group,) = figure_runs.find_groups(collect.read_results(root)[0], "model")
    logits = {m: checkpoint.load(d / rundir.TEST_LOGITS) for m, d in run.items()}
    labels = logits["ce"]["labels"]

    missed = ((logits["ce"]["logits"].float().argmax(1) != labels) & (logits["cskd"]["logits"].float().argmax(1)
                                                                      != labels)).sum().item()
    counts = figures.FIGURES["cskd_fig2"].make(group).numbers["counts"]
    assert missed > 0 and all(c.sum() == missed for panel in counts.values() for c in panel.values()), counts

    correct = sample_log.read_correct(run["ce"]).rows  # 4 epochs of CE
    hard = np.flatnonzero(correct.sum(axis=0) * 2 < len(correct))[:100]
    assert len(hard) > 0
    means = figures.FIGURES["pskd_fig2"].make(group).numbers["mean"]
    for method in ("ce", "pskd"):
        target, top = sample_log.read_probabilities(run[method])
        assert np.allclose(means["target"][method], target.rows[:, hard].mean(axis=1))
        assert np.allclose(means["max"][method], top.rows[:, hard].mean(axis=1))

    shown = figures.FIGURES["pskd_fig4"].make(group).numbers
    assert shown["image_text"] == [None, None]  # the images come from the runs' own dataset
    for sample_bars in shown["bars"]:
        assert len(sample_bars["ce"]) == 5 and np.all(np.diff(sample_bars["pskd"]) <= 0)
    probs = torch.softmax(logits["pskd"]["logits"].double(), 1)
    wrong_both = [i for i in range(len(labels)) if all(logits[m]["logits"][i].float().argmax() != labels[i]
                                                        for m in ("ce", "pskd"))]
    assert np.allclose(shown["bars"][0]["pskd"], probs[wrong_both[0]].sort(descending=True).values[:5])

    ece = figures.FIGURES["pskd_fig3"].make(figure_runs.find_groups(group.runs, "dataset")[0]).numbers["ece"]
    summaries = {r.label: r.final["ece"] for r in group.runs}
    assert ece["small_cnn"] == pytest.approx(summaries)  # one curve per method, each its run's ECE (one seed)
    assert figures.FIGURES["cskd_fig4"].make(group) is None  # MNIST records no superclasses: not this grid's figure

    skipped = []
    made = figures.make_figures(root, only="cskd_fig5", fmt="pdf", skipped=skipped)
    assert [f.path.name for f in made] == ["cskd_fig5_mnist5k_small_cnn.pdf"] and not skipped
    assert made[0].path.read_bytes()[:4] == b"%PDF"
