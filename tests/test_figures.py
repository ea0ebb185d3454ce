"""launch/figures.py and cskd/analysis.py on fabricated run dirs: each figure's plotted numbers are checked against
values computed here directly from the files' arrays (numpy), or by hand.

The grid (dataset toy, 4 classes, 120 test samples, 20 training samples over 6 epochs):
  toy/net   ce seeds 0, 1; cskd seeds 1, 2 (common seed 1); pskd seeds 0, 1 (with ce: seed 0);
            vsoftmax, adacos, ls seed 1 (reliability only, adacos with test features)
  toy/net2  ce seed 0, pskd seed 0 (reliability only)
"""
import json

import numpy as np
import pytest
import torch

from cskd import analysis
from cskd.sample_log import SampleRecorder, append_rows
from datasets_prep.beton_writer import MIN_PAGE, MODE_RAW, BetonWriter
from launch import collect, figure_runs, figures
from test_collect import BINS, add_run

C, N, TRAIN, EPOCHS = 4, 120, 20, 6
LABELS = np.arange(N) % C
FEATURE_INDEX = np.sort(np.concatenate([np.flatnonzero(LABELS == c)[:15] for c in range(C)]))  # 60 rows
CLASSES = ["apple", "bee", "car", "dog"]
SUPER = ["plant", "animal", "thing", "animal"]


def rng_logits(seed):
    """Noisy logits that favour the true class: a mix of right and wrong predictions."""
    g = np.random.default_rng(seed)
    logits = g.normal(size=(N, C))
    logits[np.arange(N), LABELS] += 1.0
    return logits


def write_logits(run_dir, logits, epoch=9, name="test_logits.pt", **extra):
    torch.save({"epoch": epoch, "logits": torch.tensor(logits).half(), "labels": torch.tensor(LABELS), **extra},
               run_dir / name)


def run(root, method, seed, model="net", ece=0.0, r_at_1=0.0, reliability=None, logits=None, **extra):
    run_dir = add_run(root, "toy", model, method, seed, final=10.0, best=9.0, ece=ece, reliability=reliability)
    data = json.loads((run_dir / "summary.json").read_text())
    data["final"]["r_at_1"] = data["best"]["r_at_1"] = r_at_1
    (run_dir / "summary.json").write_text(json.dumps(data))
    if logits is not None:
        write_logits(run_dir, logits, classes=CLASSES, superclass_of_class=SUPER, **extra)
    return run_dir


def features(seed):
    g = np.random.default_rng(100 + seed)
    return {"features": torch.tensor(g.normal(size=(len(FEATURE_INDEX), 8))).half(),
            "feature_index": torch.tensor(FEATURE_INDEX)}


def training_logits(seed, epoch):
    """(TRAIN, C) logits of a training epoch: samples 0..5 are mostly wrong (hard), the rest learnt."""
    g = np.random.default_rng(1000 * seed + epoch)
    logits = g.normal(size=(TRAIN, C))
    labels = np.arange(TRAIN) % C
    logits[np.arange(6, TRAIN), labels[6:]] += 4.0
    logits[np.arange(6), (labels[:6] + 1) % C] += 2.0 if epoch % 3 else -2.0  # right in 1 of 3 epochs
    return logits, labels


def write_per_sample(run_dir, seed, probabilities=True):
    """The run's per-sample files, as the trainer writes them; returns the (EPOCHS, TRAIN) logits."""
    every = []
    for epoch in range(EPOCHS):
        logits, labels = training_logits(seed, epoch)
        recorder = SampleRecorder(TRAIN, torch.device("cpu"), probabilities)
        step_logits, step_labels = torch.tensor(logits).float(), torch.tensor(labels)
        recorder.observe(torch.arange(TRAIN), step_logits.argmax(1) == step_labels, step_logits, step_labels)
        append_rows(run_dir, epoch, TRAIN, recorder.end_epoch(True))
        every.append(logits)
    return np.stack(every), labels


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("figs") / "grid"
    for seed, ece in ((0, 4.0), (1, 6.0)):
        run(root, "ce", seed, ece=ece, r_at_1=50.0 + seed, logits=rng_logits(seed), **features(seed))
    for seed, ece in ((1, 1.0), (2, 2.0)):
        run(root, "cskd", seed, ece=ece, r_at_1=70.0 + seed, logits=rng_logits(10 + seed), **features(10 + seed))
    run(root, "adacos", 1, ece=30.0, r_at_1=60.0, logits=rng_logits(20), **features(20))
    run(root, "vsoftmax", 1, ece=8.0)  # no logits: left out of Fig. 3, drawn in Fig. 5
    run(root, "ls", 1, ece=3.0, reliability={"edges": BINS, "count": [0, 1, 2, 3], "accuracy": [0, 0.0, 0.5, 1.0],
                                             "confidence": [0, 0.4, 0.6, 0.8]})
    for seed in (0, 1):
        run_dir = run(root, "pskd", seed, ece=2.0 + seed, logits=rng_logits(30 + seed))
        write_per_sample(run_dir, 30 + seed)
    write_per_sample(root / "toy/net/ce/seed0", 0)
    run(root, "ce", 0, model="net2", ece=5.0)
    run(root, "pskd", 0, model="net2", ece=1.0)
    return root


def group_of(root, model="net", scope="model", **kw):
    results = collect.read_results(root)[0]
    return next(g for g in figures.find_groups(results, scope, **kw) if g.model in (model, None))


def draw(root, name, **kw):
    group = group_of(root, scope=figures.FIGURES[name].scope, **kw)
    return figures.FIGURES[name].make(group)


def saved(root, method, seed, model="net"):
    return torch.load(root / "toy" / model / method / f"seed{seed}" / "test_logits.pt", weights_only=True)


# --- cskd/analysis.py ----------------------------------------------------------------------------------------

def test_misclassified_and_log_probs_by_hand():
    a = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])
    b = torch.tensor([[0.0, 2.0, 0.0], [0.0, 2.0, 0.0], [2.0, 0.0, 0.0]])
    labels = np.array([1, 1, 1])
    assert list(analysis.commonly_misclassified(labels, a, b)) == [2]
    assert list(analysis.commonly_correct(labels, a, b)) == [1]
    pred, true = analysis.predicted_and_true_log_probs(a, labels, [2])
    z = np.log(np.exp(2.0) + 2)
    assert pred == pytest.approx([2.0 - z]) and true == pytest.approx([0.0 - z])


def test_superclass_confusion_and_error_by_hand():
    superclass_of_class = ["b", "b", "a", "a", "c", "c"]
    labels = np.array([0, 1, 2, 3, 4, 5, 0, 2])
    predicted = np.array([1, 2, 2, 0, 4, 3, 0, 5])
    names, matrix = analysis.superclass_confusion(predicted, labels, superclass_of_class)
    assert names == ["a", "b", "c"]
    # true a: samples 2, 3, 7 predicted into a, b, c; true b: 0, 1, 6 into b, a, b; true c: 4, 5 into c, a
    assert matrix == pytest.approx(np.array([[1 / 3, 1 / 3, 1 / 3], [1 / 3, 2 / 3, 0], [1 / 2, 0, 1 / 2]]))
    assert matrix.sum(axis=1) == pytest.approx(np.ones(3))
    errors = analysis.error_per_superclass(predicted, labels, superclass_of_class)
    assert errors == pytest.approx({"a": 200 / 3, "b": 200 / 3, "c": 50.0})


def test_top_k_shown_classes_hard_samples_and_curves():
    classes, probs = analysis.top_k(np.array([0.1, 0.4, 0.2, 0.3]), 2)
    assert list(classes) == [1, 3] and list(probs) == [0.4, 0.3]
    p_a, p_b = np.linspace(0, 1, 30), np.zeros(30)
    shown = analysis.shown_classes(p_a, p_b, label=0)
    assert list(shown) == list(range(29, 19, -1)) + [0]  # top 10 by the larger probability, then the truth
    assert list(analysis.shown_classes(p_a[:5], p_b[:5], label=0)) == [0, 1, 2, 3, 4]
    correct = np.array([[1, 0, 0, 1], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=bool)  # correct 3, 1, 1, 1 of 3 epochs
    assert list(analysis.hard_samples(correct)) == [1, 2, 3]
    assert list(analysis.hard_samples(correct, cap=2)) == [1, 2]
    rows = np.array([[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]])
    mean, q25, q75 = analysis.mean_and_iqr(rows, [1, 2, 3])
    assert list(mean) == [2.0, 6.0] and list(q25) == [1.5, 5.5] and list(q75) == [2.5, 6.5]
    assert analysis.lowest(np.array([9, 3, 5]), 2) == [3, 5]


# --- the figures, on the grid ----------------------------------------------------------------------------------

def test_cskd_fig2_counts_are_the_commonly_misclassified(grid):
    drawing = draw(grid, "cskd_fig2")
    ce, cskd = saved(grid, "ce", 1)["logits"].float(), saved(grid, "cskd", 1)["logits"].float()
    both = (ce.argmax(1).numpy() != LABELS) & (cskd.argmax(1).numpy() != LABELS)
    assert 0 < both.sum() < N
    for panel in ("predicted", "true"):
        counts = drawing.numbers["counts"][panel]
        assert list(counts) == ["ce", "cskd"]
        assert all(c.sum() == both.sum() for c in counts.values())
    axes = drawing.figure.axes[0]
    assert sum(p.get_height() for p in axes.patches) == 2 * both.sum()  # both methods' bars in panel (a)
    assert "seed 1" in drawing.title and "final epoch" in drawing.title
    log_true = torch.log_softmax(ce.double(), 1).numpy()[both, LABELS[both]]
    edges = drawing.numbers["edges"]["true"]
    assert list(np.histogram(log_true, edges)[0]) == list(drawing.numbers["counts"]["true"]["ce"])


def test_cskd_fig1b_bars_are_the_softmax(grid):
    drawing = draw(grid, "cskd_fig1b")
    ce, cskd = saved(grid, "ce", 1)["logits"].double(), saved(grid, "cskd", 1)["logits"].double()
    both = np.flatnonzero((ce.argmax(1).numpy() != LABELS) & (cskd.argmax(1).numpy() != LABELS))
    assert f"test samples {both[0]}, {both[1]}" in drawing.caption
    for k, i in enumerate(both[:2]):
        bars = drawing.numbers["bars"][k]
        assert bars["ce"] == pytest.approx(torch.softmax(ce[i], 0).numpy(), abs=1e-6)  # C <= 20: every class
        assert bars["cskd"] == pytest.approx(torch.softmax(cskd[i], 0).numpy(), abs=1e-6)
    assert f"ground truth: {CLASSES[LABELS[both[0]]]}" in drawing.figure.axes[0].get_title()


def test_samples_beyond_the_test_set_are_a_reason(grid):
    with pytest.raises(figure_runs.Unavailable, match="--samples 999 is beyond the 120 test samples"):
        draw(grid, "cskd_fig1b", samples=[3, 999])


def test_cskd_fig3_one_point_per_feature_row_and_r_at_1(grid):
    drawing = draw(grid, "cskd_fig3")
    assert drawing.numbers["points"] == {"ce": len(FEATURE_INDEX), "adacos": len(FEATURE_INDEX),
                                         "cskd": len(FEATURE_INDEX)}
    for ax, r_at_1 in zip(drawing.figure.axes, (51.0, 60.0, 71.0)):  # seed 1 of ce, adacos, cskd
        assert sum(len(c.get_offsets()) for c in ax.collections) == len(FEATURE_INDEX)
        assert f"R@1 {r_at_1:.2f}% (whole test set)" in ax.get_title()
    assert "perplexity" in drawing.caption and "seed 1" in drawing.title


def test_cskd_fig4_matrices_and_errors_equal_direct_counts(grid):
    drawing = draw(grid, "cskd_fig4")
    names = sorted(set(SUPER))
    of = np.array([names.index(s) for s in SUPER])
    for method in ("ce", "cskd"):
        predicted = saved(grid, method, 1)["logits"].float().argmax(1).numpy()
        expected = np.zeros((3, 3))
        for t, p in zip(of[LABELS], of[predicted]):
            expected[t, p] += 1
        expected /= expected.sum(axis=1, keepdims=True)
        shown = drawing.numbers["matrices"][method]
        assert shown == pytest.approx(100 * expected) and shown.sum(axis=1) == pytest.approx([100.0] * 3)
        errors = [100 * np.mean(predicted[of[LABELS] == s] != LABELS[of[LABELS] == s]) for s in range(3)]
        assert drawing.numbers["errors"][method] == pytest.approx(errors)


def test_cskd_fig4_is_silent_for_a_dataset_without_hierarchy(tmp_path):
    for method in ("ce", "cskd"):
        run_dir = run(tmp_path, method, 0)
        write_logits(run_dir, rng_logits(0), classes=None, superclass_of_class=None)
    assert draw(tmp_path, "cskd_fig4") is None


def test_cskd_fig5_one_panel_per_baseline_and_mean_ece(grid):
    drawing = draw(grid, "cskd_fig5")
    assert drawing.numbers["ece"] == {"ce": {"ce": 5.0, "cskd": 1.5}, "vsoftmax": {"vsoftmax": 8.0, "cskd": 1.5},
                                      "adacos": {"adacos": 30.0, "cskd": 1.5}, "ls": {"ls": 3.0, "cskd": 1.5}}
    panels = [ax for ax in drawing.figure.axes if ax.get_title()]  # each panel's legend has an axes of its own
    assert [ax.get_title() for ax in panels] == ["(a) ce", "(b) vsoftmax", "(c) adacos", "(d) ls"]
    legends = [ax.get_legend() for ax in drawing.figure.axes if ax.get_legend()]
    legend = [t.get_text() for t in legends[0].get_texts()]
    assert "ce: ECE 5.00% (mean of n=2)" in legend and "cskd: ECE 1.50% (mean of n=2)" in legend


def test_pskd_fig3_one_panel_per_model(grid):
    drawing = draw(grid, "pskd_fig3")
    assert drawing.numbers["ece"]["net2"] == {"ce": 5.0, "pskd": 1.0}
    assert drawing.numbers["ece"]["net"]["pskd"] == 2.5
    assert [ax.get_title() for ax in drawing.figure.axes if ax.get_title()] == ["net", "net2"]
    legends = [ax.get_legend() for ax in drawing.figure.axes if ax.get_legend()]
    assert "pskd: ECE 1.00% (mean of n=1)" in [t.get_text() for t in legends[1].get_texts()]


def test_pskd_fig2_hard_samples_and_mean_curves(grid):
    drawing = draw(grid, "pskd_fig2")
    ce_logits = np.stack([training_logits(0, e)[0] for e in range(EPOCHS)])
    labels = np.arange(TRAIN) % C
    hard = np.flatnonzero(2 * (ce_logits.argmax(2) == labels).sum(0) < EPOCHS)
    assert list(hard) == list(range(6))
    assert f"{len(hard)} hard-to-learn samples" in drawing.figure.axes[0].get_title()
    for method, seed in (("ce", 0), ("pskd", 30)):
        logits = np.stack([training_logits(seed, e)[0] for e in range(EPOCHS)])
        probs = np.exp(logits) / np.exp(logits).sum(2, keepdims=True)
        target = probs[:, hard, labels[hard]].astype(np.float16).astype(np.float64)
        maximum = probs[:, hard].max(2).astype(np.float16).astype(np.float64)
        assert drawing.numbers["mean"]["target"][method] == pytest.approx(target.mean(1), rel=1e-6)
        assert drawing.numbers["mean"]["max"][method] == pytest.approx(maximum.mean(1), rel=1e-6)


def test_pskd_fig2_without_probabilities_says_so(tmp_path):
    for method in ("ce", "pskd"):
        write_per_sample(run(tmp_path, method, 0), 0, probabilities=False)
    with pytest.raises(figure_runs.Unavailable, match="train_correct.bits but no train_probs.f16.*log_per_sample"):
        draw(tmp_path, "pskd_fig2")


def top5(logits, i):
    p = torch.softmax(logits[i].double(), 0).numpy()
    return np.sort(p)[::-1][:5]


def test_pskd_fig4_bars_and_missing_dataset(grid):
    drawing = draw(grid, "pskd_fig4")
    ce, pskd = saved(grid, "ce", 0)["logits"], saved(grid, "pskd", 0)["logits"]
    wrong = np.flatnonzero((ce.float().argmax(1).numpy() != LABELS) & (pskd.float().argmax(1).numpy() != LABELS))
    right = np.flatnonzero((ce.float().argmax(1).numpy() == LABELS) & (pskd.float().argmax(1).numpy() == LABELS))
    assert f"test samples {wrong[0]}, {right[0]}" in drawing.caption
    for k, i in enumerate((wrong[0], right[0])):
        assert drawing.numbers["bars"][k]["ce"] == pytest.approx(top5(ce, i), abs=1e-6)
        assert drawing.numbers["bars"][k]["pskd"] == pytest.approx(top5(pskd, i), abs=1e-6)
    # config.yaml names no data.path: the default data/mnist5k, not there
    assert all(t.startswith("image not available: ") for t in drawing.numbers["image_text"])
    texts = [t.get_text() for t in drawing.figure.axes[0].texts]
    assert any(t.startswith("image not available:") for t in texts)


def write_dataset(path, labels, index):
    """A prepared dataset of raw 4 x 4 images whose test sample k is filled with the value 2 * index[k]."""
    path.mkdir()
    for split, ys, ids in (("train", labels[:1], index[:1]), ("test", labels, index)):
        writer = BetonWriter(path / f"{split}.beton", len(ys), MIN_PAGE)
        for y, i in zip(ys, ids):
            writer.add(np.full((4, 4, 3), 2 * i, np.uint8).tobytes(), MODE_RAW, 4, 4, int(y), int(i))
        writer.close()
    (path / "meta.json").write_text(json.dumps({"num_classes": C, "files": {}}))


def test_pskd_fig4_images_match_by_the_index_field(tmp_path):
    index = np.arange(N)[::-1].copy()  # stored in reverse: logits position i is the sample with index i
    write_dataset(tmp_path / "data", LABELS[index], index)
    for method, seed in (("ce", 0), ("pskd", 30)):
        run_dir = run(tmp_path / "grid", method, 0, logits=rng_logits(seed))
        (run_dir / "config.yaml").write_text(f"method: {method}\nseed: 0\ndata:\n  path: {tmp_path / 'data'}\n")
    drawing = draw(tmp_path / "grid", "pskd_fig4", samples=[5, 7])
    assert drawing.numbers["image_text"] == [None, None]
    images = [ax.images[0].get_array() for ax in drawing.figure.axes[::3]]
    assert [int(np.asarray(im)[0, 0, 0]) for im in images] == [10, 14]


# --- the command -----------------------------------------------------------------------------------------------

def test_cli_writes_every_figure_the_grid_allows(grid, capsys):
    assert figures.main([str(grid), "--only", "cskd_fig2"]) == 0
    assert figures.main([str(grid), "--only", "pskd_fig3", "--format", "pdf"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"cskd_fig2 toy/net: wrote {grid}/figures/cskd_fig2_toy_net.png",
                   "cskd_fig2 toy/net2: needs runs of ce and cskd with a seed in common; found ce (seed 0)",
                   f"pskd_fig3 toy: wrote {grid}/figures/pskd_fig3_toy.pdf"]
    assert (grid / "figures/pskd_fig3_toy.pdf").read_bytes()[:4] == b"%PDF"
    assert (grid / "figures/cskd_fig2_toy_net.png").read_bytes()[:4] == b"\x89PNG"


def test_make_figures_returns_figures_and_reasons(grid):
    skipped = []
    made = figures.make_figures(grid, only="cskd_fig3", skipped=skipped)
    assert [(f.name, f.path.name) for f in made] == [("cskd_fig3", "cskd_fig3_toy_net.png")]
    assert "t-SNE" in made[0].caption and "seed 1" in made[0].title
    assert skipped == ["cskd_fig3 toy/net2: needs runs of at least two of ce, vsoftmax, adacos, cskd with test "
                       "features and a seed in common; found ce (seed 0)"]


def test_best_epoch_reads_best_logits(grid, tmp_path):
    for method, seed in (("ce", 0), ("cskd", 0)):
        run_dir = run(tmp_path, method, seed, logits=rng_logits(seed))
        write_logits(run_dir, -rng_logits(seed), epoch=4, name="best_test_logits.pt")
    drawing = draw(tmp_path, "cskd_fig2", epoch="best")
    both = (-rng_logits(0)).argmax(1) != LABELS
    assert drawing.numbers["counts"]["true"]["ce"].sum() == both.sum()
    assert "best epoch" in drawing.title


def test_only_ce_runs_write_nothing(tmp_path, capsys):
    run(tmp_path, "ce", 0, logits=rng_logits(0))
    assert figures.main([str(tmp_path)]) == 0
    assert not (tmp_path / "figures").exists()
    out = capsys.readouterr().out.splitlines()
    assert out and all("wrote" not in line and "found ce (seed 0)" in line for line in out)


def test_unreadable_logits_skip_the_figure_with_a_reason(tmp_path, capsys):
    run(tmp_path, "ce", 0, logits=rng_logits(0))
    bad = run(tmp_path, "cskd", 0, logits=rng_logits(1))
    path = bad / "test_logits.pt"
    path.write_bytes(path.read_bytes()[:200])  # a copy cut short
    assert figures.main([str(tmp_path), "--only", "cskd_fig2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith(f"cskd_fig2 toy/net: {path} is truncated")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert figures.main([str(tmp_path), "--only", "fig9"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: unknown figure 'fig9'") and "cskd_fig2" in err[0]
    assert figures.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert figures.main([str(tmp_path), "--samples", "3,x"]) == 2
    assert "--samples" in capsys.readouterr().err


def test_cli_as_a_script(tmp_path):
    from conftest import run_cli

    res = run_cli(["launch/figures.py", str(tmp_path), "--only", "nope"], timeout=120)
    assert res.returncode == 2 and res.stderr.startswith("error: unknown figure") and res.stdout == ""
