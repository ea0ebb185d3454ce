"""`python -m cskd.eval` and `cskd.eval.evaluate`: the saved model, re-evaluated, gives the reported numbers."""
import json
import os
import pickle
import shutil
import subprocess

import pytest
import torch

from cskd import distributed as D
from cskd.eval import evaluate, main
from cskd.metrics import METRIC_NAMES
from cskd.models import build_model
from conftest import REPO, TORCHRUN, run_cli

CLOSE = ("nll", "ece", "aurc", "eaurc", "r_at_1")


def assert_same_metrics(result: dict, reported: dict) -> None:
    assert result["top1_err"] == reported["top1_err"] and result["top5_err"] == reported["top5_err"]
    for name in CLOSE:
        assert abs(result[name] - reported[name]) <= 1e-6, (name, result[name], reported[name])
    assert result["samples"] == reported["samples"] and result["epoch"] == reported["epoch"]


@pytest.mark.parametrize("which", ["final", "best"])
def test_one_process_reproduces_a_two_rank_cskd_summary(ddp_cskd_run, tmp_path, which):
    """Rank 1 evaluated its shard with rank 0's BatchNorm buffers, in float32: one process on the saved
    weights gets the same numbers."""
    run_dir, _ = ddp_cskd_run
    summary = json.loads((run_dir / "summary.json").read_text())
    out = tmp_path / "eval.json"
    res = run_cli(["-m", "cskd.eval", str(run_dir), "--checkpoint", which, "--out", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert_same_metrics(result, summary[which])
    assert (result["checkpoint"], result["world_size"], result["dataset"]) == (which, 1, "mnist5k")
    for name in METRIC_NAMES:  # the printed table
        assert f"  {name:<9} {result[name]:.4f}" in res.stdout


def test_torchrun_eval_equals_one_process(ddp_cskd_run, tmp_path):
    run_dir, _ = ddp_cskd_run
    out = tmp_path / "eval.json"
    res = subprocess.run([*TORCHRUN, "--nproc_per_node=2", "-m", "cskd.eval", str(run_dir), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and res.stdout.count("top1_err") == 1  # rank 0 reports
    assert_same_metrics(result, json.loads((run_dir / "summary.json").read_text())["final"])


class Touch:
    """A pickle that runs code when loaded: it would create the file `path`."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_bad_inputs_are_one_line_errors(ddp_cskd_run, mnist_dir, tmp_path, capsys):
    run_dir, _ = ddp_cskd_run

    def error(*args) -> str:
        assert main([*map(str, args)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
        return err

    assert "has no config.yaml: not a cskd run dir" in error(tmp_path)

    renamed = tmp_path / "renamed"
    shutil.copytree(mnist_dir, renamed)
    meta = json.loads((renamed / "meta.json").read_text())
    (renamed / "meta.json").write_text(json.dumps({**meta, "classes": ["zero", *meta["classes"][1:]]}))
    assert "names class 0 'zero', the run's training set '0'" in error(run_dir, "--data", renamed)
    eleven = {**meta, "num_classes": 11, "classes": [*meta["classes"], "ten"]}  # consistent, but not the run's
    (renamed / "meta.json").write_text(json.dumps(eleven))
    assert "has 11 classes but the model has 10 outputs" in error(run_dir, "--data", renamed)

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "best.pt").unlink()
    assert "has no best.pt" in error(copy, "--checkpoint", "best")
    marker = tmp_path / "code-ran"
    with open(copy / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": Touch(marker), "epoch": 1}, f)
    assert "it is not loaded, since unpickling it could run code" in error(copy)
    assert not marker.exists()


def test_other_dataset_with_the_same_classes(ddp_cskd_run, mnist_dir, tmp_path, capsys):
    run_dir, _ = ddp_cskd_run
    other = tmp_path / "elsewhere"
    shutil.copytree(mnist_dir, other)
    assert main([str(run_dir), "--data", str(other), "--ece-bins", "10", "--out", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    final = json.loads((run_dir / "summary.json").read_text())["final"]
    assert result["data"] == str(other) and result["ece_bins"] == 10
    assert result["top1_err"] == final["top1_err"] and result["ece"] != final["ece"]  # 10 bins, not 20


def test_evaluate_is_float32_inside_autocast():
    """bf16 autocast (training's) must not reach evaluation: same metrics inside an autocast context."""
    torch.manual_seed(0)
    model = build_model("small_cnn", 10).eval()
    batches = [(torch.randn(50, 3, 32, 32), torch.randint(0, 10, (50,)), torch.arange(50) + 50 * i) for i in range(2)]
    env = D.DistEnv(0, 1, 0, torch.device("cpu"))
    plain, _, _ = evaluate(model, batches, env)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(batches[0][0]).dtype == torch.bfloat16  # autocast is really on here
        inside, _, _ = evaluate(model, batches, env)
    assert inside == plain and plain["samples"] == 100
