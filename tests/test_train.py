import json

import pytest
import torch
import yaml

from cskd import checkpoint, sample_log
from cskd.config import load_config
from cskd.errors import NonFiniteLossError
from cskd.methods import METHODS, Method, StepOutput
from conftest import REPO, run_cli, train_args


def test_cli_run_writes_the_run_dir(mnist_dir, tmp_path):
    out = tmp_path / "run"
    res = run_cli(train_args(mnist_dir, out, "method=cskd", "epochs=2"))
    assert res.returncode == 0, res.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == "cskd" and saved["cskd"] == {"temperature": 4.0, "lam": 1.0, "exclude_self": False}
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["epoch"] for l in lines] == [0, 1]
    assert {"ce", "cls", "loss", "top1_err", "images_per_s"} <= set(lines[0]["train"])
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["schema"], summary["dataset"], summary["method"], summary["label"], summary["seed"]) == (
        1, "mnist5k", "cskd", "cskd", 0)
    meta = json.loads((mnist_dir / "meta.json").read_text())
    assert summary["data"] == {"path": str(mnist_dir), "sha256": {k: v["sha256"] for k, v in meta["files"].items()}}
    keys = {"top1_err", "top5_err", "nll", "ece", "aurc", "eaurc", "r_at_1"}
    assert keys <= set(summary["final"]) and keys <= set(summary["best"])
    assert summary["final"]["samples"] == 1000 and summary["final"]["epoch"] == 1
    assert summary["best"]["top1_err"] == min(l["test"]["top1_err"] for l in lines)
    assert {"epochs", "wall_s", "train_images_per_s", "world_size", "device"} <= set(summary)
    assert summary["final"]["top1_err"] < 60  # it learned something in 2 epochs (chance: 90%)
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "checkpoint.pt").exists() and not list(out.glob(".*tmp"))
    best = torch.load(out / "best.pt", weights_only=True)  # the model only, loadable without running code
    assert set(best) == {"model", "epoch", "test", "classes"} and best["epoch"] == summary["best"]["epoch"]
    assert best["test"]["top1_err"] == summary["best"]["top1_err"] and best["classes"] == [str(c) for c in range(10)]
    for name, kind in (("test_logits.pt", "final"), ("best_test_logits.pt", "best")):  # for ensembles and figures
        saved = torch.load(out / name, weights_only=True)
        assert saved["epoch"] == summary[kind]["epoch"] and saved["logits"].dtype == torch.float16
        assert saved["logits"].shape == (1000, 10) and saved["labels"].shape == (1000,)
        err = 100 * (saved["logits"].float().argmax(1) != saved["labels"]).double().mean().item()
        assert err == pytest.approx(summary[kind]["top1_err"], abs=0.2)  # float16 may break a near-tie otherwise
        # mnist5k's test split: 100 per class, 10 classes, so the feature subset is the whole split
        assert saved["feature_index"].tolist() == list(range(1000)) and saved["features"].shape == (1000, 64)
        assert saved["classes"] == [str(c) for c in range(10)] and saved["superclass_of_class"] is None
    correct = sample_log.read_correct(out)  # one row per epoch, its bits counting the epoch's train accuracy
    assert correct.first_epoch == 0 and correct.rows.shape == (2, 4000)
    for row, line in zip(correct.rows, lines):
        assert 100 * (1 - row.mean()) == pytest.approx(line["train"]["top1_err"], abs=1e-9)
    assert sample_log.read_probabilities(out) is None  # log_per_sample is off by default
    assert "\x1b[" not in res.stdout and "\r" not in res.stdout  # plain log lines, not a bar, in a pipe

    again = run_cli(train_args(mnist_dir, out, "method=cskd", "epochs=2"))
    assert again.returncode == 0 and "already complete" in again.stdout

    other = run_cli(train_args(mnist_dir, out, "method=cskd", "epochs=2", "lr=0.05"))
    assert other.returncode == 2
    assert "holds a run with a different config (differs in: lr)" in other.stderr and "--force" in other.stderr
    forced = run_cli(train_args(mnist_dir, out, "method=cskd", "--force", "epochs=1", "lr=0.05"))  # flags anywhere
    assert forced.returncode == 0, forced.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("overrides, message", [
    (["epochz=3"], "unknown config key 'epochz'"),
    (["model=resnet99"], "valid models: densenet121, densenet121_bc_cifar, preact_resnet10, preact_resnet18"),
    (["method=fskd"], "valid methods: adacos, byot, ce, cskd, cskd_cutmix, cskd_e, cutmix, cutout, ddgsd, kd"),
    (["data.path=/nonexistent/mnist5k"], "prepare it with: python -m datasets_prep mnist5k --out /nonexistent/mnist5k"),
])
def test_bad_input_one_line_errors(mnist_dir, tmp_path, overrides, message, capsys):
    # the CLI function in this process (tests/test_hostile_input.py runs such cases as real processes too)
    from cskd.train import cli

    code, err = cli(train_args(mnist_dir, tmp_path / "r", *overrides)[2:]), capsys.readouterr().err
    assert code == 2
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_batch_size_must_divide_by_world_size(mnist_dir, tmp_path):
    env = {"WORLD_SIZE": "3", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    res = run_cli(train_args(mnist_dir, tmp_path / "r", "batch_size=128"), timeout=120, env=env)
    assert res.returncode == 2
    assert ("batch.global=128 is not batch.micro_per_rank=? x batch.grad_accum=? x world size 3" in res.stderr
            and len(res.stderr.strip().splitlines()) == 1)


class NanAfterFirstEpoch(Method):
    """A test method: cross-entropy, then a NaN loss from epoch 1 on."""

    def loss(self, model, batch):
        logits = model(batch.images)
        loss = torch.nn.functional.cross_entropy(logits, batch.labels)
        return StepOutput(loss * float("nan") if batch.epoch >= 1 else loss, logits)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(mnist_dir, tmp_path, monkeypatch):
    from cskd.train import main

    monkeypatch.setitem(METHODS, "nan_test", NanAfterFirstEpoch)  # a method is just a registered class
    out = tmp_path / "r"
    cfg = load_config(str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                      [f"data.path={mnist_dir}", f"out_dir={out}", "method=nan_test", "epochs=3", "threads=1"])
    with pytest.raises(NonFiniteLossError, match=r"non-finite in epoch 1 .*last good checkpoint is kept"):
        main(cfg)
    saved = checkpoint.load(out / "checkpoint.pt")
    assert saved["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1 and not (out / "summary.json").exists()
    assert checkpoint.load(out / "best.pt")["epoch"] == 0

    # A crash between checkpoint.pt and best.pt: the resume writes best.pt from the checkpoint's model.
    (out / "best.pt").unlink()
    with pytest.raises(NonFiniteLossError):
        main(cfg)
    best = checkpoint.load(out / "best.pt")
    assert best["epoch"] == 0 and all(torch.equal(best["model"][k], v) for k, v in saved["model"].items())


def test_torchrun_two_processes(ddp_cskd_run):
    out, res = ddp_cskd_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["final"]["samples"] == 1000  # sharded evaluation, every test sample exactly once
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["train"]["images"] for l in lines] == [4000, 4000]  # both ranks' anchors, each once
    assert res.stdout.count("epoch 2/2 |") == 1  # only rank 0 reports
    # per-rank BatchNorm is not the reference's: said once, by rank 0
    assert res.stdout.count("warning: BatchNorm normalises each micro-batch of 64 anchors") == 1
