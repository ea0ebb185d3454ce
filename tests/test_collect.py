"""launch/collect.py on hand-made run dirs: every expected number below is computed by hand.

The grid under test (top1_err, final / best epoch):
  mnist5k/small_cnn   ce 2, 3 (best 1.5, 2.5)   cskd 1, 2, 3 (best 0.5, 1.5, 2.5) + seed3 missing   adacos 3
  cifar100/small_cnn  ce 40, 44                cskd 33.6 + seed0 failed + seed2 running
  cifar100/resnet18   cskd 29, 31 (a second grid, no ce)
"""
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO
from launch import collect, slurm

BINS = [0.0, 0.25, 0.5, 0.75, 1.0]


def summary(dataset, model, method, seed, final, best, ece=0.0, device="GPU-A x1", reliability=None):
    metrics = dict.fromkeys(("top5_err", "nll", "aurc", "eaurc", "r_at_1"), 0.0)
    return {"final": {**metrics, "top1_err": final, "ece": ece, "epoch": 9},
            "best": {**metrics, "top1_err": best, "ece": ece, "epoch": 4},
            "seed": seed, "method": method, "model": model, "dataset": dataset, "device": device,
            "reliability": reliability or {"edges": BINS, "count": [0, 0, 1, 1], "accuracy": [0, 0, 0.0, 1.0],
                                           "confidence": [0, 0, 0.6, 0.9]}}


def add_run(grid_root, dataset, model, method, seed, **kw):
    run_dir = grid_root / dataset / model / method / f"seed{seed}"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"method: {method}\nseed: {seed}\n")
    if "final" in kw:
        (run_dir / "summary.json").write_text(json.dumps(summary(dataset, model, method, seed, **kw)))
    return run_dir


def manifest(grid_root, name, dirs):
    runs = [{"run_id": f"id{i}", "dir": d, "dataset": d.split("/")[0], "model": d.split("/")[1],
             "method": d.split("/")[2], "seed": int(d.split("/")[3][4:])} for i, d in enumerate(dirs)]
    (grid_root / "grid.json").write_text(json.dumps({"name": name, "runs": runs}))


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    m, c = ("mnist5k", "small_cnn"), ("cifar100", "small_cnn")
    add_run(root, *m, "ce", 0, final=2.0, best=1.5, ece=4.0,
            reliability={"edges": BINS, "count": [0, 2, 0, 2], "accuracy": [None, 0.5, None, 1.0],
                         "confidence": [0, 0.4, 0, 0.9]})
    add_run(root, *m, "ce", 1, final=3.0, best=2.5, ece=6.0,
            reliability={"edges": BINS, "count": [0, 2, 4, 0], "accuracy": [0, 1.0, 0.75, 0],
                         "confidence": [0, 0.3, 0.6, 0]})
    for seed, (final, best) in enumerate([(1.0, 0.5), (2.0, 1.5), (3.0, 2.5)]):
        add_run(root, *m, "cskd", seed, final=final, best=best)
    add_run(root, *m, "adacos", 0, final=3.0, best=3.0)
    add_run(root, *c, "ce", 0, final=40.0, best=40.0, device="cpu x1")
    add_run(root, *c, "ce", 1, final=44.0, best=44.0, device="cpu x1")
    add_run(root, *c, "cskd", 1, final=33.6, best=33.6)
    failed = add_run(root, *c, "cskd", 0)
    (failed / "job.json").write_text(json.dumps({"scheduler": "local", "job_id": "x", "state": "FAILED",
                                                 "reason": "NonFiniteLossError: loss is nan", "log": "/some/log"}))
    running = add_run(root, *c, "cskd", 2)  # its launcher is alive: this test process
    (running / "job.json").write_text(json.dumps({"scheduler": "local", "job_id": "y", "pid": os.getpid(),
                                                  "log": "/run/log"}))
    manifest(root, "t", ["mnist5k/small_cnn/ce/seed0", "mnist5k/small_cnn/ce/seed1", "mnist5k/small_cnn/adacos/seed0"]
             + [f"mnist5k/small_cnn/cskd/seed{s}" for s in range(4)]  # seed3 has no dir: missing
             + ["cifar100/small_cnn/ce/seed0", "cifar100/small_cnn/ce/seed1"]
             + [f"cifar100/small_cnn/cskd/seed{s}" for s in range(3)])
    other = root / "u"
    add_run(other, "cifar100", "resnet18", "cskd", 0, final=29.0, best=29.0)
    add_run(other, "cifar100", "resnet18", "cskd", 1, final=31.0, best=31.0)
    manifest(other, "u", ["cifar100/resnet18/cskd/seed0", "cifar100/resnet18/cskd/seed1"])
    return root


def table(text, model):
    """{method: {dataset: cell}} of the table under `model`'s heading, and its column order."""
    lines = text.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"**{model}**"))
    block = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split("|")])
    header, body = block[0], block[2:]
    return {row[0]: dict(zip(header[1:], row[1:])) for row in body}, header[1:], [row[0] for row in body]


def test_final_tables_cells_and_order(root):
    text = collect.report(root)
    assert "**small_cnn** — top1_err (%), final epoch" in text
    cells, columns, methods = table(text, "small_cnn")
    assert columns == ["cifar100", "mnist5k"]
    assert methods == ["ce", "adacos", "cskd"]  # the baseline first, then alphabetical
    # ce mnist: 2, 3 -> 2.5, std sqrt(0.5) = 0.707; cskd 1, 2, 3 -> 2, std 1, (2 - 2.5) / 2.5 = -20%
    assert cells["ce"]["mnist5k"] == "2.50±0.71 n=2"
    assert cells["cskd"]["mnist5k"] == "2.00±1.00 (-20.0%) n=3"
    assert cells["adacos"]["mnist5k"] == "3.00±0.00 (+20.0%) n=1"
    # ce cifar: 40, 44 -> 42, std sqrt(8) = 2.83; cskd 33.6: (33.6 - 42) / 42 = -20%
    assert cells["ce"]["cifar100"] == "42.00±2.83 n=2"
    assert cells["cskd"]["cifar100"] == "33.60±0.00 (-20.0%) n=1"
    assert cells["adacos"]["cifar100"] == "–"
    cells, columns, methods = table(text, "resnet18")
    assert columns == ["cifar100"] and methods == ["cskd"]
    assert cells["cskd"]["cifar100"] == "30.00±1.41 n=2"  # no ce row: no relative change
    assert text.index("**resnet18**") < text.index("**small_cnn**")
    assert "sample std (ddof=1)" in text and "selected on the test set" in text
    assert "Machine(s): GPU-A x1; cpu x1." in text
    assert (root / "results.md").read_text() == text


def test_best_epoch(root):
    text = collect.report(root, epoch="best")
    assert "**small_cnn** — top1_err (%), best epoch" in text
    cells, _, _ = table(text, "small_cnn")
    # ce 1.5, 2.5 -> 2.0, std 0.707; cskd 0.5, 1.5, 2.5 -> 1.5, std 1, (1.5 - 2) / 2 = -25%
    assert cells["ce"]["mnist5k"] == "2.00±0.71 n=2"
    assert cells["cskd"]["mnist5k"] == "1.50±1.00 (-25.0%) n=3"


def test_other_metric_heading(root):
    assert "**small_cnn** — nll (nats), final epoch" in collect.report(root, "nll")


def test_not_done_lists(root):
    text = collect.report(root)
    section = text[text.index("**Runs not done**"):]
    assert section.startswith("**Runs not done**: 3 of 14")
    assert "missing (1):\n- `mnist5k/small_cnn/cskd/seed3`\n" in section
    assert ("failed (1):\n- `cifar100/small_cnn/cskd/seed0`: NonFiniteLossError: loss is nan (log: /some/log)\n"
            in section)
    running = re.search(r"running \(1\):\n- `cifar100/small_cnn/cskd/seed2`: (.*)\n", section)
    assert running and running[1].startswith(f"local, launcher pid {os.getpid()}") and running[1].endswith(
        "(log: /run/log)"), section
    assert "pending" not in section and "cancelled" not in section
    assert section.index("missing") < section.index("running") < section.index("failed")


def test_slurm_states_and_unreachable_slurm(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    dirs = {}
    for seed, job in enumerate(["11", "12", "13"]):
        dirs[job] = add_run(root, "d", "m", "ce", seed)
        (dirs[job] / "job.json").write_text(json.dumps({"scheduler": "slurm", "job_id": job, "log": f"/l/{job}"}))
    manifest(root, "s", [f"d/m/ce/seed{s}" for s in range(3)])
    monkeypatch.setattr(slurm, "job_states", lambda ids: {"11": "PENDING", "12": "CANCELLED", "13": "RUNNING"})
    text = collect.report(root)
    assert text.startswith("no finished runs (summary.json) under")
    assert "pending (1):\n- `d/m/ce/seed0`: job 11, PENDING (log: /l/11)" in text
    assert "running (1):\n- `d/m/ce/seed2`: job 13, RUNNING (log: /l/13)" in text
    assert "cancelled (1):\n- `d/m/ce/seed1`: job 12, CANCELLED (log: /l/12)" in text

    def unreachable(ids):
        raise slurm.SlurmError("squeue failed: no controller")

    monkeypatch.setattr(slurm, "job_states", unreachable)
    status = collect.status_text(root)
    assert status.startswith("s (.): done 0, pending 0, running 0, failed 0, cancelled 0, missing 0, unknown 3 "
                             "— total 3\n")
    assert "unknown (3):\n- `d/m/ce/seed0`: job 11, squeue failed: no controller (log: /l/11)" in status


def test_status_counts(root):
    text = collect.status_text(root)
    lines = text.splitlines()
    assert lines[0] == "t (.): done 9, pending 0, running 1, failed 1, cancelled 0, missing 1 — total 12"
    assert lines[1] == "u (u): done 2, pending 0, running 0, failed 0, cancelled 0, missing 0 — total 2"
    assert "failed (1):\n- `cifar100/small_cnn/cskd/seed0`: NonFiniteLossError: loss is nan (log: /some/log)" in text
    assert "**small_cnn**" not in text


def test_without_manifest_lists_started_runs(tmp_path):
    root = tmp_path / "runs"
    add_run(root, "d", "m", "ce", 0, final=5.0, best=4.0)
    add_run(root, "d", "m", "ce", 1)
    text = collect.report(root)
    assert table(text, "m")[0]["ce"]["d"] == "5.00±0.00 n=1"
    assert "unknown (1):\n- `d/m/ce/seed1`: started (config.yaml) but no summary.json" in text
    assert collect.status_text(root).startswith("(no grid.json; run dirs on disk) (.): done 1, pending 0, "
                                                "running 0, failed 0, cancelled 0, missing 0, unknown 1 — total 2")


def test_csv_keeps_its_format(root):
    collect.report(root)
    with open(root / "results.csv") as f:
        assert f.readline() == "dataset,model,method,metric,epoch,mean,std,n,rel_vs_ce_pct\n"
    rows = {(r["dataset"], r["model"], r["method"], r["epoch"]): r for r in csv.DictReader(open(root / "results.csv"))}
    assert len(rows) == 2 * 6  # 6 (dataset, model, method) groups, final and best each
    cskd = rows[("mnist5k", "small_cnn", "cskd", "final")]
    assert cskd["metric"] == "top1_err" and cskd["n"] == "3"
    assert float(cskd["mean"]) == pytest.approx(2.0) and float(cskd["std"]) == pytest.approx(1.0)
    assert float(cskd["rel_vs_ce_pct"]) == pytest.approx(-20.0)
    assert float(rows[("mnist5k", "small_cnn", "cskd", "best")]["rel_vs_ce_pct"]) == pytest.approx(-25.0)
    assert rows[("mnist5k", "small_cnn", "ce", "final")]["rel_vs_ce_pct"] == ""


def test_pooled_bins_weight_by_count():
    a = {"edges": BINS, "count": [0, 2, 0, 2], "accuracy": [None, 0.5, None, 1.0], "confidence": [0, 0.4, 0, 0.9]}
    b = {"edges": BINS, "count": [0, 2, 4, 0], "accuracy": [0, 1.0, 0.75, 0], "confidence": [0, 0.3, 0.6, 0]}
    pooled = collect.pooled_bins([a, b])
    assert pooled["count"] == [0, 4, 4, 2]
    assert pooled["accuracy"] == pytest.approx([0, 0.75, 0.75, 1.0])  # (2*0.5 + 2*1.0) / 4
    assert pooled["confidence"] == pytest.approx([0, 0.35, 0.6, 0.9])


def test_reliability_pngs(root, monkeypatch):
    collect.report(root)
    pngs = sorted(p.name for p in root.glob("reliability_*.png"))
    assert pngs == ["reliability_cifar100_resnet18.png", "reliability_cifar100_small_cnn.png",
                    "reliability_mnist5k_small_cnn.png"]
    from PIL import Image

    for name in pngs:
        with Image.open(root / name) as image:
            assert image.format == "PNG" and image.size[0] > 100
            image.verify()
    drawn = {}
    monkeypatch.setattr(collect, "reliability_overlay", lambda curves, path, title: drawn.update({path.name: curves}))
    collect.report(root)
    curves = drawn["reliability_mnist5k_small_cnn.png"]
    assert list(curves) == ["ce (mean ECE 5.00%, n=2)", "adacos (mean ECE 0.00%, n=1)",
                            "cskd (mean ECE 0.00%, n=3)"]
    assert curves["ce (mean ECE 5.00%, n=2)"]["count"] == [0, 4, 4, 2]


def cli(*args):
    return subprocess.run([sys.executable, str(REPO / "launch" / "collect.py"), *args], capture_output=True,
                          text=True, cwd=REPO.parent, timeout=120)


def test_cli(root, capsys):
    res = cli(str(root))  # as users run it: a fresh process, from another directory
    assert res.returncode == 0 and res.stdout == (root / "results.md").read_text()
    assert "2.00±1.00 (-20.0%) n=3" in res.stdout
    res = cli(str(root / "nope"))
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr
    assert collect.main([str(root), "--epoch", "best"]) == 0 and "1.50±1.00 (-25.0%) n=3" in capsys.readouterr().out
    assert collect.main([str(root), "--status"]) == 0 and capsys.readouterr().out.startswith("t (.): done 9,")
    with pytest.raises(SystemExit) as exit_:
        collect.main([str(root), "--epoch", "last"])
    assert exit_.value.code == 2


def test_empty_dir_writes_nothing(tmp_path):
    assert collect.main([str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []


def test_tables_come_from_summaries_not_paths(root, tmp_path):
    """Run dirs moved anywhere (other root, other depth, other names) give the same tables."""
    expected = {epoch: collect.markdown_tables(collect.aggregate(collect.find_results(root), "top1_err"), epoch)
                for epoch in collect.EPOCHS}
    moved = tmp_path / "elsewhere"
    for i, summary_path in enumerate(sorted(root.rglob("summary.json"))):
        target = moved / ("deep/er" if i % 2 else "") / f"run{i}"
        target.mkdir(parents=True)
        shutil.copy(summary_path, target / "summary.json")
    results = collect.find_results(moved)
    assert len(results) == 11
    for epoch in collect.EPOCHS:
        assert collect.markdown_tables(collect.aggregate(results, "top1_err"), epoch) == expected[epoch]


def test_label_names_the_row(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        run_dir = add_run(root, "d", "m", "cskd", seed, final=5.0 + seed, best=4.0)
        data = json.loads((run_dir / "summary.json").read_text())
        (run_dir / "summary.json").write_text(json.dumps({**data, "label": "cskd-lam3"}))
    add_run(root, "d", "m", "cskd", 2, final=1.0, best=1.0)
    cells, _, methods = table(collect.report(root), "m")
    assert methods == ["cskd", "cskd-lam3"] and cells["cskd-lam3"]["d"] == "5.50±0.71 n=2"


def test_malformed_summary_is_listed_and_the_table_still_printed(tmp_path):
    """One damaged summary.json does not hide the others: the table is printed (exit 0), the bad file is
    listed with its path and what is wrong, and stderr says so in one warning line."""
    root = tmp_path / "runs"
    add_run(root, "d", "m", "ce", 1, final=7.0, best=6.0)
    run_dir = add_run(root, "d", "m", "ce", 0, final=5.0, best=4.0)
    data = json.loads((run_dir / "summary.json").read_text())
    del data["final"]["nll"]
    (run_dir / "summary.json").write_text(json.dumps(data))
    res = cli(str(root))
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("warning: 1 summary.json/grid.json file(s)")
    cells, _, _ = table(res.stdout, "m")
    assert cells["ce"]["d"] == "7.00±0.00 n=1"  # the readable run, alone
    assert ("**Unreadable files** (1), left out of the tables above:\n- `d/m/ce/seed0/summary.json`: is not a cskd "
            "summary ('final' lacks nll); delete it to re-run the run") in res.stdout
    assert res.stdout == (root / "results.md").read_text()
    status = cli(str(root), "--status")
    assert status.returncode == 0 and "unknown 1" in status.stdout and "summary.json is unreadable" in status.stdout


def test_a_column_pooling_two_conversions_is_flagged(tmp_path):
    root = tmp_path / "runs"
    for seed, digest in enumerate(["aa", "aa", "bb"]):
        run_dir = add_run(root, "cifar100", "m", "ce", seed, final=30.0, best=30.0)
        data = json.loads((run_dir / "summary.json").read_text())
        data["data"] = {"path": f"data/c100_{digest}", "sha256": {"train.beton": digest, "test.beton": digest}}
        (run_dir / "summary.json").write_text(json.dumps(data))
    assert "Warning: the cifar100 column pools runs on 2 different conversions" in collect.report(root)
    (root / "cifar100" / "m" / "ce" / "seed2" / "summary.json").unlink()
    assert "Warning" not in collect.report(root)


# Ensembles: 4 test samples of 3 classes, labels 0, 1, 2, 0. A run's softmax gives 0.6 to one class and 0.2 to the
# others: to the label (C, right) or to the next class (W, wrong). By seed (final epoch; best: all right):
#   ce    W C C C | W W C C | W C C C   (25%, 50%, 25% wrong)
#   cskd  C C C W | C C C C | C C C C   (25%, 0%, 0%)
#   ls    two seeds, seed1 without logits files (a run from before they were kept);  adacos one seed
ENSEMBLE_LABELS = [0, 1, 2, 0]


def save_logits(run_dir, rights, best_rights=None):
    """The run dir's test_logits.pt (epoch 9) and best_test_logits.pt (epoch 4): `rights` says per sample whether
    the run is right (C) or wrong (W)."""
    import torch

    def log_probs(rights):
        probs = torch.full((len(rights), 3), 0.2, dtype=torch.float64)
        for i, (label, right) in enumerate(zip(ENSEMBLE_LABELS, rights)):
            probs[i, label if right else (label + 1) % 3] = 0.6
        return probs.log().half()

    for name, epoch, pattern in (("test_logits.pt", 9, rights), ("best_test_logits.pt", 4, best_rights or [1] * 4)):
        torch.save({"epoch": epoch, "logits": log_probs(pattern), "labels": torch.tensor(ENSEMBLE_LABELS)},
                   run_dir / name)


@pytest.fixture
def ensemble_root(tmp_path):
    root = tmp_path / "runs"
    patterns = {"ce": [[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]], "cskd": [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]]}
    dirs = []
    for method, seeds in patterns.items():
        for seed, rights in enumerate(seeds):
            save_logits(add_run(root, "d", "m", method, seed, final=1.0, best=1.0), rights)
            dirs.append(f"d/m/{method}/seed{seed}")
    save_logits(add_run(root, "d", "m", "ls", 0, final=1.0, best=1.0), [1, 1, 1, 1])
    add_run(root, "d", "m", "ls", 1, final=1.0, best=1.0)
    save_logits(add_run(root, "d", "m", "adacos", 0, final=1.0, best=1.0), [1, 1, 1, 1])
    manifest(root, "e", dirs + ["d/m/ls/seed0", "d/m/ls/seed1", "d/m/adacos/seed0"])
    return root


def heading_table(text, heading):
    """{method: {dataset: cell}} of the table under the line `heading`."""
    lines = text.splitlines()
    block = []
    for line in lines[lines.index(heading) + 2:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split("|")])
    return {row[0]: dict(zip(block[0][1:], row[1:])) for row in block[2:]}


def test_ensemble_section_and_csv_rows(ensemble_root):
    text = collect.report(ensemble_root)
    section = text[text.index("**Ensembles (average of the seeds' softmax)**"):]
    cells = heading_table(section, "**m** — top1_err (%), final epoch (ensemble)")
    # ce: sample 0 wrong in all three (0.6 on class 1): wrong; sample 1 C W C: label (0.6 + 0.2 + 0.6) / 3 = 0.467
    # vs 0.333: right; samples 2, 3 right -> 25% wrong. cskd: sample 3 C C W -> right: 0% wrong, -100% vs ce
    assert cells == {"ce": {"d": "25.00 n=3"}, "cskd": {"d": "0.00 (-100.0%) n=3"}}  # ls: listed below
    assert "- d / m / ls (2 runs), final and best: d/m/ls/seed1 has no test_logits.pt: it finished before" in section
    assert "adacos" not in section  # one run: no ensemble
    assert table(text, "m")[0]["ce"]["d"] == "1.00±0.00 n=3"  # the per-seed table is still the first
    best = heading_table(collect.report(ensemble_root, epoch="best"), "**m** — top1_err (%), best epoch (ensemble)")
    assert best == {"ce": {"d": "0.00 n=3"}, "cskd": {"d": "0.00 n=3"}}  # no relative change vs. 0
    nll = heading_table(collect.report(ensemble_root, "nll"), "**m** — nll (nats), final epoch (ensemble)")
    assert nll["ce"]["d"] == f"{-(math.log(0.2) + math.log(1.4 / 3) + 2 * math.log(0.6)) / 4:.2f} n=3"
    assert "r_at_1 is not defined for an ensemble" in collect.report(ensemble_root, "r_at_1")

    with open(ensemble_root / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = {(r["method"], r["metric"], r["epoch"]): r for r in reader}
    assert reader.fieldnames == ["dataset", "model", "method", "metric", "epoch", "mean", "std", "n", "rel_vs_ce_pct"]
    ce = rows[("ce", "top1_err", "final-ensemble")]
    assert (float(ce["mean"]), ce["std"], ce["n"], ce["rel_vs_ce_pct"]) == (25.0, "", "3", "")
    assert float(rows[("cskd", "top1_err", "final-ensemble")]["rel_vs_ce_pct"]) == -100.0
    assert float(rows[("ce", "top1_err", "best-ensemble")]["mean"]) == 0.0
    # half float logits: log(0.2) and log(0.6) are rounded to 1e-3 relative
    assert float(rows[("ce", "nll", "final-ensemble")]["mean"]) == pytest.approx(
        -(math.log(0.2) + math.log(1.4 / 3) + 2 * math.log(0.6)) / 4, abs=2e-3)
    assert {m for m, metric, e in rows if e == "final-ensemble"} == {"ce", "cskd"}  # not ls, not adacos
    assert {metric for _, metric, e in rows if e == "best-ensemble"} == {"top1_err", "top5_err", "nll", "ece", "aurc",
                                                                         "eaurc"}
    assert ("ce", "r_at_1", "final-ensemble") not in rows and len(rows) == 2 * 4 + 2 * 2 * 6  # 4 labels, per seed


def test_ensembles_load_each_logits_file_once(ensemble_root, monkeypatch):
    from cskd import ensemble

    loaded = []
    real = ensemble.load

    def counting(path):
        loaded.append(path)
        return real(path)

    monkeypatch.setattr(ensemble, "load", counting)
    collect.make_report(ensemble_root, with_figures=False)  # the papers' figures load logits files of their own
    # 6 runs of ce/cskd x 2 files; none of ls: its seed1's missing file is found before any is read
    assert len(loaded) == len(set(loaded)) == 2 * 6


def test_a_root_without_logits_has_no_ensemble_section(root):
    assert "Ensembles" not in collect.report(root) and "ensemble" not in (root / "results.csv").read_text()
