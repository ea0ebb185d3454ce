"""cskd.ensemble: the ensemble of runs from their saved test logits; every expected number is computed by hand.

The logits below are log-probabilities, so each run's softmax is the probability table written beside it.
"""
import json
import math

import pytest
import torch

from cskd import ensemble
from cskd.errors import ConfigError, CskdError, DataError, RunDirError
from cskd.metrics import classification_metrics
from conftest import run_cli

# Two runs, 4 samples, 3 classes; labels 0, 2, 2, 1.
RUN_A = [[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.5, 0.3, 0.2]]
RUN_B = [[0.2, 0.7, 0.1], [0.2, 0.2, 0.6], [0.2, 0.2, 0.6], [0.1, 0.3, 0.6]]
LABELS = [0, 2, 2, 1]


def logits(probs, dtype=torch.float64):
    return torch.tensor(probs, dtype=torch.float64).log().to(dtype)


def test_two_runs_by_hand():
    metrics, bins = ensemble.ensemble_metrics([logits(RUN_A), logits(RUN_B)], torch.tensor(LABELS), n_bins=4)
    # mean probabilities: [.4 .5 .1] [.2 .35 .45] [.15 .15 .7] [.3 .3 .4] -> predictions 1, 2, 2, 2 with
    # confidences .5, .45, .7, .4; labels 0, 2, 2, 1: samples 0 and 3 are wrong
    assert metrics["top1_err"] == pytest.approx(50.0)
    assert metrics["top5_err"] == 0.0  # k capped at the 3 classes
    assert metrics["nll"] == pytest.approx(-(math.log(0.4) + math.log(0.45) + math.log(0.7) + math.log(0.3)) / 4)
    # bins (l, u] of width .25: (.25, .5] holds .5 (wrong), .45 (right), .4 (wrong): acc 1/3, conf .45;
    # (.5, .75] holds .7 (right). ECE = 3/4 |1/3 - .45| + 1/4 |1 - .7| = .0875 + .075
    assert bins["count"] == [0, 3, 1, 0]
    assert bins["accuracy"][1] == pytest.approx(1 / 3) and bins["confidence"][1] == pytest.approx(0.45)
    assert metrics["ece"] == pytest.approx(16.25)
    # by confidence: .7 right, .5 wrong, .45 right, .4 wrong: risks 0, 1/2, 1/3, 2/4 -> AURC 1/3;
    # oracle with r = 2 errors of n = 4: (1/3 + 2/4) / 4 -> E-AURC = 1/3 - 5/24 = 1/8
    assert metrics["aurc"] == pytest.approx(1000 / 3)
    assert metrics["eaurc"] == pytest.approx(125.0)
    assert set(metrics) == set(ensemble.METRICS) and "r_at_1" not in metrics


def test_the_rule_is_the_mean_of_softmaxes_not_of_logits():
    a, b = [[0.899, 0.1, 0.001]], [[0.001, 0.5, 0.499]]
    # mean probabilities [.45 .3 .25]: class 0, right; mean logits (geometric mean) would pick class 1
    assert (logits(a) + logits(b)).argmax().item() == 1
    metrics, _ = ensemble.ensemble_metrics([logits(a), logits(b)], torch.tensor([0]))
    assert metrics["top1_err"] == 0.0 and metrics["nll"] == pytest.approx(-math.log(0.45))


def test_three_runs_average_their_probabilities():
    runs = [[[0.7, 0.2, 0.1]], [[0.1, 0.8, 0.1]], [[0.1, 0.2, 0.7]]]
    mean = ensemble.mean_log_probs(logits(r) for r in runs).exp()  # a generator: one run at a time
    assert mean.tolist()[0] == pytest.approx([0.3, 0.4, 0.3])
    metrics, _ = ensemble.ensemble_metrics([logits(r) for r in runs], torch.tensor([1]))
    assert metrics["top1_err"] == 0.0 and metrics["nll"] == pytest.approx(-math.log(0.4))


def test_one_run_scores_as_that_run():
    torch.manual_seed(0)
    z = (3 * torch.randn(300, 10)).half()
    y = torch.randint(0, 10, (300,))
    ours, our_bins = ensemble.ensemble_metrics([z], y, 15)
    theirs, their_bins = classification_metrics(z.float(), y, torch.randn(300, 4), 15)
    del theirs["r_at_1"]
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-9) and our_bins["count"] == their_bins["count"]


def make_run(root, name, final, best=None, labels=LABELS, dataset="toy", config="", summary=True, files=True,
             test_sha=None):
    """A run dir as the trainer leaves it: config.yaml, summary.json (final epoch 9, best 4) and the two logits files
    (`final`/`best`: probability tables)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"method: ce\nseed: 0\n{config}")
    if summary:
        metrics = dict.fromkeys(("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc", "r_at_1"), 0.0)
        data = {"path": "data/toy", "sha256": {"test.beton": test_sha}} if test_sha else {"path": "data/toy"}
        (run_dir / "summary.json").write_text(json.dumps({
            "dataset": dataset, "model": "m", "method": "ce", "seed": 0, "data": data,
            "final": {**metrics, "epoch": 9}, "best": {**metrics, "epoch": 4}}))
    if files:
        for file, epoch, probs in (("test_logits.pt", 9, final), ("best_test_logits.pt", 4, best or final)):
            torch.save({"epoch": epoch, "logits": logits(probs, torch.float16), "labels": torch.tensor(labels)},
                       run_dir / file)
    return run_dir


def test_ensemble_runs_reads_the_runs_files(tmp_path):
    a = make_run(tmp_path, "a", RUN_A, best=RUN_B)
    b = make_run(tmp_path, "b", RUN_B)
    result = ensemble.ensemble_runs([a, b], ece_bins=4)
    expected, bins = ensemble.ensemble_metrics([logits(RUN_A, torch.float16), logits(RUN_B, torch.float16)],
                                               torch.tensor(LABELS), 4)
    assert {k: result[k] for k in ensemble.METRICS} == expected and result["reliability"] == bins
    hand = -(math.log(0.4) + math.log(0.45) + math.log(0.7) + math.log(0.3)) / 4  # as above
    assert result["top1_err"] == 50.0 and result["nll"] == pytest.approx(hand, abs=1e-3)  # float16 logits
    assert (result["runs"], result["checkpoint"], result["epochs"]) == ([str(a), str(b)], "final", [9, 9])
    assert (result["dataset"], result["samples"], result["classes"], result["ece_bins"]) == ("toy", 4, 3, 4)
    assert "softmax" in result["rule"] and "r_at_1" in result["note"]
    best = ensemble.ensemble_runs([a, b], "best")  # both B's table: the predictions of B alone
    assert best["epochs"] == [4, 4] and best["ece_bins"] == 20  # the runs' own ece_bins (config.yaml default)
    assert best["top1_err"] == 50.0  # B predicts 1, 2, 2, 2


REFUSALS = {  # name -> (how the second run differs, the error class, a fragment of the one-line message)
    "labels": (dict(labels=[0, 2, 1, 1]), DataError, "different test labels (first at sample 2: 2 vs 1)"),
    "samples": (dict(final=RUN_B[:3], labels=LABELS[:3]), DataError, "were tested on 4 and 3 samples"),
    "classes": (dict(final=[p + [0.0001] for p in RUN_B]), DataError, "different class counts (3 vs 4)"),
    "dataset": (dict(dataset="other"), DataError, "different datasets (toy vs other)"),
    "no logits": (dict(files=False), RunDirError, "has no test_logits.pt: it finished before cskd kept test logits"),
    "unfinished": (dict(summary=False), RunDirError, "is not finished (no summary.json) (its test_logits.pt is of "
                                                     "the last epoch it finished); let it finish"),
    "ece bins": (dict(config="ece_bins: 10\n"), ConfigError, "different ece_bins"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line(tmp_path, capsys, case):
    changes, error, fragment = REFUSALS[case]
    a = make_run(tmp_path, "a", RUN_A)
    b = make_run(tmp_path, "b", **{"final": RUN_B, **changes})
    with pytest.raises(error) as refused:
        ensemble.ensemble_runs([a, b])
    assert fragment in str(refused.value) and "\n" not in str(refused.value)
    assert str(b) in str(refused.value)  # names the run
    assert ensemble.main([str(a), str(b)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1 and fragment in err


def test_other_refusals(tmp_path, capsys):
    a, b = make_run(tmp_path, "a", RUN_A), make_run(tmp_path, "b", RUN_B)
    for dirs, fragment in (([a], "at least 2 run dirs, got 1"), ([a, tmp_path / "a"], "is listed twice"),
                           ([a, tmp_path / "nope"], "has no config.yaml")):
        with pytest.raises(CskdError, match=fragment):
            ensemble.ensemble_runs(dirs)
    c = make_run(tmp_path, "c", RUN_B, test_sha="1" * 64)
    d = make_run(tmp_path, "d", RUN_B, test_sha="2" * 64)
    with pytest.raises(DataError, match="different test.beton sha256s in summary.json"):
        ensemble.ensemble_runs([c, d])
    stale = make_run(tmp_path, "stale", RUN_B)
    torch.save({"epoch": 7, "logits": logits(RUN_B, torch.float16), "labels": torch.tensor(LABELS)},
               stale / "test_logits.pt")
    with pytest.raises(RunDirError, match="holds epoch 8's logits but summary.json reports epoch 10"):
        ensemble.ensemble_runs([a, stale])
    overflow = logits(RUN_B, torch.float16)
    overflow[2, 1] = float("inf")  # a logit beyond float16's range
    torch.save({"epoch": 9, "logits": overflow, "labels": torch.tensor(LABELS)}, stale / "test_logits.pt")
    with pytest.raises(RunDirError, match="holds non-finite logits"):
        ensemble.ensemble_runs([a, stale])
    (stale / "test_logits.pt").write_bytes(b"")
    with pytest.raises(RunDirError, match="is empty"):
        ensemble.ensemble_runs([a, stale])
    torch.save({"epoch": 9, "logits": torch.zeros(4)}, stale / "test_logits.pt")
    with pytest.raises(RunDirError, match="is not a test logits file"):
        ensemble.ensemble_runs([a, stale])
    assert ensemble.main([str(a), str(b), "--ece-bins", "0"]) == 2
    assert "--ece-bins must be >= 1" in capsys.readouterr().err


def test_cli_prints_and_writes(tmp_path, capsys):
    a = make_run(tmp_path, "a", RUN_A)
    b = make_run(tmp_path, "b", RUN_B, config="ece_bins: 10\n")
    out = tmp_path / "ens.json"
    assert ensemble.main([str(a), str(b), "--ece-bins", "4", "--out", str(out)]) == 0  # bins that differ: chosen
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert printed.startswith("ensemble of 2 runs (final, epochs 10, 10) on toy test: 4 samples, 3 classes, 4 ECE "
                              "bins; mean of the runs' softmax probabilities\n")
    for name in ensemble.METRICS:
        assert f"  {name:<9} {result[name]:.4f}" in printed
    assert "r_at_1 is not defined for an ensemble" in printed and result["ece"] > 0
    assert ensemble.main([str(a), str(b), "--ece-bins", "4", "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_cli_as_users_run_it(tmp_path):
    a, b = make_run(tmp_path, "a", RUN_A), make_run(tmp_path, "b", RUN_B, labels=[1, 2, 2, 1])
    res = run_cli(["-m", "cskd.ensemble", str(a), str(b), "--checkpoint", "best"], timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1
    assert "Traceback" not in res.stderr and "different test labels" in res.stderr
