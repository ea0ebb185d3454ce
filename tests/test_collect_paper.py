"""launch/collect.py on grids that declare the paper table they reproduce (launch/paper.py).

Hand-made run dirs, top1_err final / best (best = final - 1), against cskd2020 Table 1 (resnet18):
  cub200  ce 46.5, 47.5, 48.5   cskd 36.0, 36.5, 37.0   cskd-lam3 (method cskd) 33.0   kd 40.0 (not in the paper)
  dogs    ce 38.0               cskd 31.5
against Table 6 (preact_resnet18, cifar100): cskd seeds 0, 1 with top5_err 5.70, 5.80, ece 9.0, 9.4, r_at_1 71.0, 71.2;
against fig4_text (resnet18, mixed): cskd without hier_acc_bird in its summary.
Every expected number below is computed by hand.
"""
import csv
import json

import pytest

from launch import collect, paper

PAPER_NUMBERS = dict.fromkeys(("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc", "r_at_1"), 0.0)


def add_run(root, dataset, model, method, seed, final, best, label=None):
    """A finished run's dir under `root` (its summary.json as the trainer writes it); returns the dir, relative."""
    run_dir = root / dataset / model / (label or method) / f"seed{seed}"
    run_dir.mkdir(parents=True)
    summary = {"dataset": dataset, "model": model, "method": method, "label": label or method, "seed": seed,
               "epochs": 200, "device": "cpu x1", "final": {**PAPER_NUMBERS, **final, "epoch": 199},
               "best": {**PAPER_NUMBERS, **best, "epoch": 150}}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    return str(run_dir.relative_to(root))


def grid(root, name, dirs, declared=None):
    manifest = {"name": name, "runs": [{"run_id": d, "dir": d} for d in dirs]}
    if declared is not None:
        manifest["paper"] = declared
    (root / "grid.json").write_text(json.dumps(manifest))


def top1(root, dataset, method, seed, final, label=None):
    return add_run(root, dataset, "resnet18", method, seed, {"top1_err": final}, {"top1_err": final - 1.0}, label)


def table1_runs(root):
    return ([top1(root, "cub200", "ce", s, v) for s, v in enumerate([46.5, 47.5, 48.5])]
            + [top1(root, "cub200", "cskd", s, v) for s, v in enumerate([36.0, 36.5, 37.0])]
            + [top1(root, "dogs", "ce", 0, 38.0), top1(root, "dogs", "cskd", 0, 31.5),
               top1(root, "cub200", "cskd", 0, 33.0, label="cskd-lam3"), top1(root, "cub200", "kd", 0, 40.0)])


@pytest.fixture(autouse=True)
def no_pngs(monkeypatch):  # the reliability diagrams are test_collect's; drawing them would only slow this down
    monkeypatch.setattr(collect, "reliability_overlay", lambda curves, path, title: None)


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "runs"
    t1 = root / "t1"
    grid(t1, "t1", table1_runs(t1), {"paper": "cskd2020", "table": "1"})
    t6 = root / "t6"
    dirs = [add_run(t6, "cifar100", "preact_resnet18", "cskd", s, m, m)
            for s, m in enumerate([{"top5_err": 5.70, "ece": 9.0, "r_at_1": 71.0},
                                   {"top5_err": 5.80, "ece": 9.4, "r_at_1": 71.2}])]
    grid(t6, "t6", dirs, {"paper": "cskd2020", "table": "6"})
    hier = root / "fig4"
    grid(hier, "fig4", [add_run(hier, "mixed", "resnet18", "cskd", 0, {}, {})],
         {"paper": "cskd2020", "table": "fig4_text"})
    return root


def section(text, heading):
    """{method: {dataset: cell}} of the table under the line `heading`."""
    lines = text.splitlines()
    start = lines.index(heading)
    block = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        block.append([c.strip() for c in line.strip("|").split("|")])
    return {row[0]: dict(zip(block[0][1:], row[1:])) for row in block[2:]}


def test_paper_numbers_beside_ours_and_flags(root):
    text = collect.report(root)
    final = section(text, "**resnet18** — top1_err (%), final epoch: ours vs cskd2020 Table 1")
    assert list(final) == ["ce", "cskd", "cskd-lam3", "kd"]  # the paper's row order, then what it lacks
    assert list(final["ce"]) == ["cub200", "dogs"]
    # ce cub200: 47.5 ± 1.0 (n=3) vs 46.00 ± 1.43 (n=3): SE = sqrt(1/3 + 1.43²/3) = 1.0075, 2 SE = 2.015 > 1.50
    assert final["ce"]["cub200"] == "47.50±1.00 n=3 vs 46.00±1.43 (+1.50)"
    # cskd cub200: 36.5 ± 0.5 vs 33.28 ± 0.99: SE = sqrt(0.25/3 + 0.9801/3) = 0.6403, 2 SE = 1.281 < 3.22
    assert final["cskd"]["cub200"] == "36.50±0.50 n=3 vs 33.28±0.99 (+3.22) ⚠"
    # n=1: no std of ours, so the 1.0-point tolerance: |38.0 - 36.29| = 1.71 > 1, |31.5 - 30.85| = 0.65 < 1
    assert final["ce"]["dogs"] == "38.00±0.00 n=1 vs 36.29±0.32 (+1.71) ⚠"
    assert final["cskd"]["dogs"] == "31.50±0.00 n=1 vs 30.85±0.28 (+0.65)"
    # a label that is not a paper method is compared with its runs' method (cskd); kd has no paper number
    assert final["cskd-lam3"]["cub200"] == "33.00±0.00 n=1 vs 33.28±0.99 (-0.28)"
    assert final["kd"]["cub200"] == "40.00±0.00 n=1" and final["kd"]["dogs"] == "–"
    assert "2 of 5 at the final epoch, 2 of 5 at the best epoch" in text
    assert "Grid(s): t1. Training epochs: paper 200, ours 200." in text
    assert (root / "results.md").read_text() == text


def test_best_epoch_is_compared_too(root):
    best = section(collect.report(root), "**resnet18** — top1_err (%), best epoch: ours vs cskd2020 Table 1")
    assert best["ce"]["cub200"] == "46.50±1.00 n=3 vs 46.00±1.43 (+0.50)"
    assert best["cskd"]["cub200"] == "35.50±0.50 n=3 vs 33.28±0.99 (+2.22) ⚠"  # 2 SE = 1.281, as at the final
    assert best["ce"]["dogs"] == "37.00±0.00 n=1 vs 36.29±0.32 (+0.71)"  # within 1.0 here, flagged at the final
    assert best["cskd-lam3"]["cub200"] == "32.00±0.00 n=1 vs 33.28±0.99 (-1.28) ⚠"


def test_table6_reports_its_own_metrics(root):
    text = collect.report(root)
    heading = "**preact_resnet18** — {} ({}), final epoch: ours vs cskd2020 Table 6"
    # top5_err 5.75 ± 0.0707 (n=2) vs 5.69 ± 0.03: SE = sqrt(0.005/2 + 0.0009/3) = 0.0529, 2 SE = 0.106 > 0.06
    assert section(text, heading.format("top5_err", "%"))["cskd"] == {"cifar100": "5.75±0.07 n=2 vs 5.69±0.03 (+0.06)"}
    # ece 9.2 ± 0.283 vs 5.17 ± 0.40: SE = sqrt(0.08/2 + 0.16/3) = 0.3055, 2 SE = 0.611 < 4.03
    assert section(text, heading.format("ece", "%"))["cskd"] == {"cifar100": "9.20±0.28 n=2 vs 5.17±0.40 (+4.03) ⚠"}
    # r_at_1 71.1 ± 0.141 vs 71.15 ± 0.15: SE = sqrt(0.02/2 + 0.0225/3) = 0.1323, 2 SE = 0.265 > 0.05
    assert section(text, heading.format("r_at_1", "%"))["cskd"] == {"cifar100": "71.10±0.14 n=2 vs 71.15±0.15 (-0.05)"}
    assert "top1_err (%), final epoch: ours vs cskd2020 Table 6" not in text


def test_a_metric_the_runs_lack_shows_a_dash(root):
    text = collect.report(root)
    cells = section(text, "**resnet18** — hier_acc_bird (%), final epoch: ours vs cskd2020 Table fig4_text")
    assert cells == {"cskd": {"mixed": "– vs 99.30"}}  # no std on either side and no number of ours: no flag
    assert "0 of 0 at the final epoch" in text


def test_csv_has_the_paper_columns(root):
    collect.report(root)
    with open(root / "results.csv") as f:
        reader = csv.DictReader(f)
        rows = {(r["dataset"], r["model"], r["method"], r["metric"], r["epoch"]): r for r in reader}
    assert reader.fieldnames == ["dataset", "model", "method", "metric", "epoch", "mean", "std", "n",
                                 "rel_vs_ce_pct"] + paper.COLUMNS
    cskd = rows[("cub200", "resnet18", "cskd", "top1_err", "final")]
    assert cskd["paper"] == "cskd2020 Table 1" and cskd["paper_n"] == "3" and cskd["flag"] == "1"
    assert float(cskd["paper_mean"]) == 33.28 and float(cskd["paper_std"]) == 0.99
    assert float(cskd["diff"]) == pytest.approx(3.22) and float(cskd["threshold"]) == pytest.approx(1.2807, abs=1e-4)
    assert float(cskd["rel_vs_ce_pct"]) == pytest.approx(100 * (36.5 - 47.5) / 47.5)
    dogs = rows[("dogs", "resnet18", "ce", "top1_err", "best")]
    assert (dogs["flag"], float(dogs["threshold"]), float(dogs["diff"])) == ("0", 1.0, pytest.approx(0.71))
    kd = rows[("cub200", "resnet18", "kd", "top1_err", "final")]
    assert [kd[c] for c in ("paper_mean", "paper_std", "paper_n", "diff", "threshold", "flag")] == [""] * 6
    hier = rows[("mixed", "resnet18", "cskd", "hier_acc_bird", "final")]
    assert (hier["mean"], hier["n"], hier["paper_mean"], hier["paper_std"], hier["flag"]) == ("", "0", "99.3", "", "")
    assert rows[("cifar100", "preact_resnet18", "cskd", "ece", "best")]["flag"] == "1"
    assert len(rows) == 2 * (6 + 3 + 1)  # both epochs of 6 Table 1 cells, 3 Table 6 metrics, 1 hierarchy cell


def test_a_grid_without_paper_keeps_todays_output(tmp_path):
    root = tmp_path / "runs"
    dirs = table1_runs(root)
    grid(root, "t1", dirs)
    text = collect.report(root)
    results = collect.find_results(root)
    assert text == (collect.markdown_tables(collect.aggregate(results, "top1_err")) + "\n"
                    + collect.footnote(results) + "\nAll 10 runs are done.\n")
    assert " vs " not in text and "⚠" not in text
    with open(root / "results.csv") as f:
        assert f.readline() == "dataset,model,method,metric,epoch,mean,std,n,rel_vs_ce_pct\n"
    manifest = json.loads((root / "grid.json").read_text())
    (root / "grid.json").write_text(json.dumps({**manifest, "paper": None}))  # how launch/runs.py says "none"
    assert collect.report(root) == text
    grid(root, "t1", dirs, {"paper": "cskd2020", "table": "1"})
    assert "vs cskd2020 Table 1" in collect.report(root)


def test_plain_grid_beside_a_paper_grid_is_unchanged(root, tmp_path):
    alone = tmp_path / "alone"
    grid(alone, "plain", [top1(alone, "cub200", "ce", s, v) for s, v in enumerate([50.0, 52.0])])
    expected = collect.report(alone).removesuffix("All 2 runs are done.\n")
    (alone / "results.md").unlink()
    (alone / "results.csv").unlink()
    alone.rename(root / "plain")
    text = collect.report(root)
    assert text.startswith(expected) and "**cskd2020 Table 1**" in text
    assert "| ce | 52.00±1.41 vs" not in text  # the plain grid's runs are not compared with the paper


def test_a_table_without_numbers_is_one_warning(tmp_path, capsys):
    root = tmp_path / "runs"
    dirs = table1_runs(root)
    grid(root, "t9", dirs, {"paper": "cskd2020", "table": "9"})
    assert collect.main([str(root)]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("warning: 1 grid.json paper declaration(s)")
    assert "cskd2020 table 9 has no numbers in paper_numbers.yaml" in err
    assert "**Paper declarations not used** (1)" in out and "- grid.json: cskd2020 table 9 has no numbers" in out
    assert "| ce | 47.50±1.00 n=3 | 38.00±0.00 n=1 |" in out  # its runs as in a grid without a declaration
    grid(root, "t9", dirs, ["cskd2020", "1"])
    assert collect.main([str(root)]) == 0 and "'paper' is ['cskd2020', '1'], not" in capsys.readouterr().err


def test_paper_numbers_file():
    tables = paper.load_tables()
    assert sum(len(t.records) for t in tables.values()) == 571
    assert {t.paper for t in tables.values()} == {"cskd2020", "pskd2021"}
    datasets = {key[0] for t in tables.values() for key in t.records}
    assert {"cifar100", "tinyimagenet", "cub200", "dogs", "mit67", "imagenet", "mixed"} <= datasets
    assert not {"stanford_dogs", "mixed_cub_dogs_mit67"} & datasets
    assert tables[("cskd2020", "6")].order(3) == ["top5_err", "ece", "r_at_1"]
    assert tables[("cskd2020", "1")].order(3) == ["top1_err"]
    assert tables[("pskd2021", "1")].order(3) == ["top1_err", "top5_err", "nll", "ece", "aurc"]
    dogs = tables[("cskd2020", "1")].records[("dogs", "resnet18", "cskd", "top1_err")]
    assert (dogs.mean, dogs.std, dogs.n, dogs.epochs) == (30.85, 0.28, 3, 200)
    assert tables[("pskd2021", "1")].records[("cifar100", "preact_resnet18", "pskd", "ece")].std is None


# PS-KD Table 3 (the ensembles of Table 1's three seeds): 100 test samples of 3 classes, labels i % 3. A seed gives
# 0.6 to the label (right) or to the next class (wrong) and 0.2 to the others. ce: all seeds wrong on samples 0-20,
# each seed also on one more sample of its own (2 of 3 right there: the ensemble is right) -> 21% ensemble error;
# pskd: all wrong on 0-24 -> 25%.
T3_WRONG = {"ce": 21, "pskd": 25}


def t3_run(root, method, seed, logits=True):
    """A finished cifar100/preact_resnet18 run with config.yaml and (`logits`) its test logits files."""
    import torch

    top1 = {"top1_err": 20.0 + seed}
    run = root / add_run(root, "cifar100", "preact_resnet18", method, seed, top1, top1)
    (run / "config.yaml").write_text(f"method: {method}\nseed: {seed}\n")
    if logits:
        labels = torch.arange(100) % 3
        wrong = torch.zeros(100, dtype=torch.bool)
        wrong[:T3_WRONG[method]] = True
        wrong[50 + seed] = True
        probs = torch.full((100, 3), 0.2, dtype=torch.float64)
        probs[torch.arange(100), torch.where(wrong, (labels + 1) % 3, labels)] = 0.6
        for name, epoch in (("test_logits.pt", 199), ("best_test_logits.pt", 150)):
            torch.save({"epoch": epoch, "logits": probs.log().half(), "labels": labels}, run / name)
    return str(run.relative_to(root))


T3_DECLARED = [{"paper": "pskd2021", "table": "1"}, {"paper": "pskd2021", "table": "3"}]


def test_a_table_of_ensembles_is_compared_with_our_ensembles(tmp_path):
    root = tmp_path / "runs"
    grid(root, "pskd", [t3_run(root, m, s) for m in T3_WRONG for s in range(3)], T3_DECLARED)
    text = collect.report(root)
    ens = section(text, "**preact_resnet18** — top1_err (%), final epoch (ensemble): ours vs pskd2021 Table 3")
    # no std on either side: the fixed 1.0-point tolerance; |21 - 21.36| = 0.36 <= 1, |25 - 18.79| = 6.21 > 1
    assert ens == {"ce": {"cifar100": "21.00 n=3 vs 21.36 (-0.36)"},
                   "pskd": {"cifar100": "25.00 n=3 vs 18.79 (+6.21) ⚠"}}
    best = section(text, "**preact_resnet18** — top1_err (%), best epoch (ensemble): ours vs pskd2021 Table 3")
    assert best["ce"]["cifar100"] == "21.00 n=3 vs 21.36 (-0.36)"
    assert "nll (nats), final epoch (ensemble): ours vs pskd2021 Table 3" in text
    assert "Ours: the ensemble of each method's seeds (the mean of their softmax probabilities), n = runs." in text
    assert "In a table of ensembles (agg ensemble_3models)" in text
    # the same runs' Table 1 is the per-seed means, as before: 20, 21, 22 -> 21 ± 1
    t1 = section(text, "**preact_resnet18** — top1_err (%), final epoch: ours vs pskd2021 Table 1")
    assert t1["ce"]["cifar100"].startswith("21.00±1.00 n=3 vs ")
    assert "final epoch (ensemble): ours vs pskd2021 Table 1" not in text
    with open(root / "results.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["epoch"] == "final-ensemble" and r["metric"] == "top1_err"]
    compared = {r["method"]: r for r in rows if r["paper"] == "pskd2021 Table 3"}
    ce = compared["ce"]
    assert (float(ce["mean"]), ce["std"], ce["n"], float(ce["paper_mean"]), ce["paper_std"]) == (
        pytest.approx(21.0), "", "3", 21.36, "")
    assert (float(ce["diff"]), float(ce["threshold"]), ce["flag"]) == (pytest.approx(-0.36), 1.0, "0")
    assert compared["pskd"]["flag"] == "1"
    assert {r["method"] for r in rows if r["paper"] == ""} == {"ce", "pskd"}  # and among all ensembles


def test_a_table_of_ensembles_without_logits_shows_the_papers_numbers(tmp_path):
    root = tmp_path / "runs"
    dirs = [t3_run(root, "ce", s, logits=s != 1) for s in range(3)] + [t3_run(root, "pskd", 0)]
    grid(root, "pskd", dirs, [{"paper": "pskd2021", "table": "3"}, {"paper": "pskd2021", "table": "99"}])
    text = collect.report(root)
    ens = section(text, "**preact_resnet18** — top1_err (%), final epoch (ensemble): ours vs pskd2021 Table 3")
    assert ens == {"ce": {"cifar100": "– vs 21.36"}, "pskd": {"cifar100": "– vs 18.79"}}  # pskd: one run only
    assert ("- cifar100 / preact_resnet18 / ce (3 runs), final and best: cifar100/preact_resnet18/ce/seed1 has no "
            "test_logits.pt") in text
    # a list may name a table without numbers: that one is listed, the others are used
    assert "- grid.json: pskd2021 table 99 has no numbers in paper_numbers.yaml" in text


def test_the_grid_file_takes_a_list_of_tables(tmp_path):
    import yaml

    from cskd.errors import ConfigError
    from launch import gridspec

    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"base": "configs/mnist5k_small_cnn.yaml", "paper": T3_DECLARED}))
    assert gridspec.grid_paper(path) == T3_DECLARED  # as grid.json records it
    for bad, fragment in (([], "or a non-empty list of them"), ([T3_DECLARED[0], {"paper": "pskd2021"}], "got"),
                          ([T3_DECLARED[0], T3_DECLARED[0]], "lists {'paper': 'pskd2021', 'table': '1'} twice")):
        path.write_text(yaml.safe_dump({"base": "configs/mnist5k_small_cnn.yaml", "paper": bad}))
        with pytest.raises(ConfigError, match=fragment) as refused:
            gridspec.load_grid(path)
        assert "\n" not in str(refused.value)
