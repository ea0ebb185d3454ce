import csv
import json
import sys

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
    assert set(rows) == {"ce/final", "ce/best", "cskd/final", "cskd/best"}
    assert all(r["n"] == "3" for r in rows.values())
    assert float(rows["cskd/final"]["rel_vs_ce_pct"]) < 0
    assert float(rows["ce/final"]["mean"]) == pytest.approx(sum(final[("ce", s)] for s in range(3)) / 3)

    again = run_cli([str(REPO / "launch" / "grid.py"), "--out", str(tmp_path / "runs")], timeout=300, cwd=tmp_path)
    assert again.returncode == 0 and again.stdout.count("skip") == 6 and table in again.stdout


def test_failed_run_is_reported_and_others_finish(mnist_dir, tmp_path):
    grid = write_grid(tmp_path / "g.yaml", name="g", base=str(REPO / "configs" / "mnist5k_small_cnn.yaml"),
                      overrides={"data.path": str(mnist_dir), "epochs": 1}, axes={"method": ["ce", "cskd"]},
                      seeds=[0])
    blocked = tmp_path / "out" / "mnist5k" / "small_cnn" / "ce" / "seed0"
    blocked.mkdir(parents=True)
    (blocked / "config.yaml").write_text("method: ce\nepochs: 99\n")  # someone else's run
    res = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(grid), "--out", str(tmp_path / "out")], timeout=600)
    assert res.returncode == 1
    assert "FAILED" in res.stdout and "holds a run with a different config" in res.stdout and "log:" in res.stdout
    assert (tmp_path / "out" / "mnist5k" / "small_cnn" / "cskd" / "seed0" / "summary.json").exists()
    assert "cskd" in (tmp_path / "out" / "results.md").read_text()


def test_dry_run_lists_runs_with_identities(tmp_path):
    res = run_cli([str(REPO / "launch" / "grid.py"), "--dry-run", "--out", str(tmp_path)], timeout=120)
    assert res.returncode == 0
    lines = [l.split() for l in res.stdout.splitlines() if l.startswith("todo")]
    assert len(lines) == 6 and len({l[1] for l in lines}) == 6  # six distinct run identities
    assert lines[0][2].endswith("mnist5k/small_cnn/ce/seed0") and not (tmp_path / "mnist5k").exists()


@pytest.mark.parametrize("grid, message", [
    ({"base": "configs/mnist5k_small_cnn.yaml", "axis": {"method": ["ce"]}}, "unknown key(s) axis"),
    ({"base": "configs/mnist5k_small_cnn.yaml", "axes": {"method": []}}, "axis 'method' must be a non-empty list"),
    ({"base": "configs/mnist5k_small_cnn.yaml", "axes": {"lrr": [0.1]}}, "unknown config key 'lrr'"),
])
def test_bad_grids(tmp_path, grid, message):
    res = run_cli([str(REPO / "launch" / "grid.py"), "--grid", str(write_grid(tmp_path / "g.yaml", **grid)),
                   "--out", str(tmp_path)], timeout=120)
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
