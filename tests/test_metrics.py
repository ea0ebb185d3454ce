import math

import pytest
import torch

from cskd.metrics import (
    aurc_eaurc,
    classification_metrics,
    ece,
    hierarchical_accuracy,
    nll,
    recall_at_1,
    reliability_bins,
    top_k_error,
)


def test_top_k_error():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0], [3.0, 1.0, 2.0]])
    labels = torch.tensor([0, 2, 0, 1])
    assert top_k_error(logits, labels, 1) == pytest.approx(75.0)  # only the first is right
    assert top_k_error(logits, labels, 2) == pytest.approx(50.0)  # 2nd row: 2 is 2nd; 3rd, 4th miss
    assert top_k_error(logits, labels, 5) == pytest.approx(0.0)  # k capped at 3 classes


def test_nll():
    logits = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    assert nll(logits, torch.tensor([0, 1])) == pytest.approx((math.log(2) + math.log(10)) / 2)


def test_ece_hand_value_and_half_open_bins():
    conf = torch.tensor([0.25, 0.5, 0.75, 0.95])
    correct = torch.tensor([True, False, True, True])
    # 2 bins, (0, .5] and (.5, 1]: 0.5 falls in the first. Bin 1: conf .375, acc .5; bin 2: conf .85, acc 1
    assert ece(conf, correct, n_bins=2) == pytest.approx(100 * (0.5 * 0.125 + 0.5 * 0.15))
    bins = reliability_bins(conf, correct, 2)
    assert bins["count"] == [2, 2]
    assert bins["accuracy"] == pytest.approx([0.5, 1.0])


def test_ece_perfectly_calibrated_is_zero():
    conf = torch.full((10,), 0.7, dtype=torch.float64)
    correct = torch.tensor([True] * 7 + [False] * 3)
    assert ece(conf, correct, 20) == pytest.approx(0.0, abs=1e-9)


def test_aurc_eaurc_hand_values():
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([True, False, True, False])
    # risks at coverage 1..4: 0, 1/2, 1/3, 2/4 -> AURC = (0 + .5 + .3333 + .5) / 4
    # oracle with r=2 errors of n=4: (1/4) * (1/3 + 2/4)
    aurc, eaurc = aurc_eaurc(conf, correct)
    assert aurc == pytest.approx(1000 * (0.5 + 1 / 3 + 0.5) / 4)
    assert eaurc == pytest.approx(aurc - 1000 * (1 / 3 + 0.5) / 4)


def test_aurc_oracle_ranking_has_zero_excess():
    conf = torch.tensor([0.9, 0.8, 0.3, 0.2])
    correct = torch.tensor([True, True, False, False])
    assert aurc_eaurc(conf, correct)[1] == pytest.approx(0.0, abs=1e-9)


def test_recall_at_1_excludes_self():
    features = torch.tensor([[0.0], [0.1], [1.0], [1.05], [5.0]])
    labels = torch.tensor([0, 0, 1, 0, 1])
    # neighbours: 0->1 (same), 1->0 (same), 2->3 (diff), 3->2 (diff), 4->3 (diff)
    assert recall_at_1(features, labels) == pytest.approx(40.0)
    assert recall_at_1(features, labels, chunk=2) == pytest.approx(40.0)  # chunking changes nothing


def test_classification_metrics_keys_and_units():
    torch.manual_seed(0)
    logits, labels = torch.randn(50, 10), torch.randint(0, 10, (50,))
    metrics, bins = classification_metrics(logits, labels, torch.randn(50, 4), n_bins=20)
    assert set(metrics) == {"top1_err", "top5_err", "nll", "ece", "aurc", "eaurc", "r_at_1"}
    assert 0 <= metrics["top5_err"] <= metrics["top1_err"] <= 100
    assert len(bins["count"]) == 20 and sum(bins["count"]) == 50


def test_hierarchical_accuracy_counts_the_predicted_fine_labels_superclass():
    # classes 0, 1 are birds, 2 a dog, 3 indoor
    supers = ["bird", "bird", "dog", "indoor"]
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    predictions = torch.tensor([1, 0, 2, 2, 0, 3])
    # bird samples: 0->1 (bird, right although the fine label is wrong), 0->0 (right), 1->2 (dog: wrong)
    # dog samples: 2->2 right, 2->0 wrong; indoor: 3->3 right. Overall 4 of 6.
    acc = hierarchical_accuracy(predictions, labels, supers)
    assert acc == pytest.approx({"hier_acc": 400 / 6, "hier_acc_bird": 200 / 3, "hier_acc_dog": 50.0,
                                 "hier_acc_indoor": 100.0})
    assert "hier_acc_indoor" not in hierarchical_accuracy(predictions[:5], labels[:5], supers)  # no indoor sample


def test_classification_metrics_adds_the_hierarchy_when_given():
    logits = torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 2.0]])  # predicts 1 and 2
    labels = torch.tensor([0, 2])
    metrics, _ = classification_metrics(logits, labels, torch.randn(2, 3), superclass_of_class=["a", "a", "b"])
    assert metrics["top1_err"] == pytest.approx(50.0)
    assert (metrics["hier_acc"], metrics["hier_acc_a"], metrics["hier_acc_b"]) == (100.0, 100.0, 100.0)
