"""Evaluation metrics as pure functions of logits, labels and features (torch tensors, any device).

Conventions (those of the CS-KD and PS-KD papers): errors, ECE and R@1 in percent; AURC and
E-AURC x1000 (PS-KD utils/metric.py); NLL in nats per sample; ECE over equal-width confidence
bins (l, u] of the max-softmax probability, 20 bins by default as in the CS-KD paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

METRIC_NAMES = ("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc", "r_at_1")


def top_k_error(logits: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """% of samples whose label is not among the k highest logits (k capped at the class count)."""
    k = min(k, logits.shape[1])
    hit = (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
    return 100.0 * (1.0 - hit.double().mean().item())


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true label (test cross-entropy)."""
    return F.cross_entropy(logits.double(), labels).item()


def reliability_bins(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int) -> dict[str, list]:
    """Per-bin sample count, mean confidence and accuracy over equal-width bins (l, u] of [0, 1]."""
    confidence, correct = confidence.cpu(), correct.cpu()  # CUDA bincount has no deterministic kernel
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    which = torch.bucketize(confidence.double(), edges[1:-1], right=False)  # (l, u]; 0 falls in bin 0
    count = torch.bincount(which, minlength=n_bins).double()
    conf_sum = torch.bincount(which, weights=confidence.double(), minlength=n_bins)
    acc_sum = torch.bincount(which, weights=correct.double(), minlength=n_bins)
    nonzero = count.clamp(min=1)
    return {"edges": edges.tolist(), "count": count.long().tolist(),
            "confidence": (conf_sum / nonzero).tolist(), "accuracy": (acc_sum / nonzero).tolist()}


def ece(confidence: torch.Tensor, correct: torch.Tensor, n_bins: int = 20) -> float:
    """Expected calibration error in %: sum over bins of |B|/n * |acc(B) - conf(B)|."""
    return ece_from_bins(reliability_bins(confidence, correct, n_bins))


def ece_from_bins(bins: dict[str, list]) -> float:
    """ECE in % from `reliability_bins` output (so a caller that needs both bins them once)."""
    n = sum(bins["count"])
    return 100.0 * sum(c / n * abs(a - p) for c, a, p in zip(bins["count"], bins["accuracy"], bins["confidence"]))


def aurc_eaurc(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[float, float]:
    """Area under the risk-coverage curve and its excess over the oracle ranking, both x1000.

    Samples are sorted by confidence, highest first (ties keep their order); risk_k is the error
    rate among the k most confident; AURC = mean_k risk_k. The oracle puts the r errors last:
    AURC* = (1/n) sum_{i=1..r} i / (n - r + i); E-AURC = AURC - AURC*.
    """
    n = len(confidence)
    order = torch.sort(confidence.double(), descending=True, stable=True).indices
    errors = (~correct.bool())[order].double()
    risk = errors.cumsum(0) / torch.arange(1, n + 1, dtype=torch.float64, device=errors.device)
    aurc = risk.mean().item()
    r = int(errors.sum().item())
    i = torch.arange(1, r + 1, dtype=torch.float64)
    optimal = (i / (n - r + i)).sum().item() / n
    return 1000.0 * aurc, 1000.0 * (aurc - optimal)


def recall_at_1(features: torch.Tensor, labels: torch.Tensor, chunk: int = 2048) -> float:
    """% of samples whose nearest other sample (L2 on the features, itself excluded) has the same label.

    Ties go to the lowest index. Computed in chunks of rows so memory stays O(chunk * n).
    """
    feats = features.double()
    sq = (feats * feats).sum(1)
    hits = 0
    for start in range(0, len(feats), chunk):
        block = feats[start:start + chunk]
        dist = sq[start:start + chunk, None] - 2.0 * block @ feats.T + sq[None, :]
        rows = torch.arange(len(block), device=feats.device)
        dist[rows, rows + start] = float("inf")  # exclude the sample itself
        nearest = dist.argmin(dim=1)
        hits += (labels[nearest] == labels[start:start + chunk]).sum().item()
    return 100.0 * hits / len(feats)


def hierarchical_accuracy(predictions: torch.Tensor, labels: torch.Tensor,
                          superclass_of_class: list[str]) -> dict[str, float]:
    """The CS-KD paper's hierarchy accuracy (Sec. 3.3, Fig. 4), in %: a sample counts as right when the
    superclass of its *predicted fine* label is the superclass of its true label.

    Returns `hier_acc` over all samples and `hier_acc_<superclass>` over the samples of each true
    superclass (the paper quotes the bird one: "up to 99.3%"). Superclasses without test samples are left out.
    """
    names = sorted(set(superclass_of_class))
    index = {name: i for i, name in enumerate(names)}
    super_of = torch.tensor([index[s] for s in superclass_of_class], device=labels.device)
    truth, predicted = super_of[labels], super_of[predictions]
    right = (truth == predicted).double()
    result = {"hier_acc": 100.0 * right.mean().item()}
    for name, i in index.items():
        members = truth == i
        if members.any():
            result[f"hier_acc_{name}"] = 100.0 * right[members].mean().item()
    return result


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, features: torch.Tensor | None,
                           n_bins: int = 20, superclass_of_class: list[str] | None = None
                           ) -> tuple[dict[str, float], dict[str, list]]:
    """All metrics of the CS-KD/PS-KD papers for one split, and the reliability-diagram bins.

    Without `features` R@1 is left out (an ensemble's log mean probabilities, `cskd.ensemble`, are
    scored as logits: their softmax is the mean probability). With `superclass_of_class` (a dataset
    that records a hierarchy, e.g. datasets_prep's `mixed`), the hierarchy accuracies of
    `hierarchical_accuracy` are added."""
    probs = F.softmax(logits.double(), dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = prediction == labels
    aurc, eaurc = aurc_eaurc(confidence, correct)
    bins = reliability_bins(confidence, correct, n_bins)
    metrics = {
        "top1_err": top_k_error(logits, labels, 1),
        "top5_err": top_k_error(logits, labels, 5),
        "nll": nll(logits, labels),
        "ece": ece_from_bins(bins),
        "aurc": aurc,
        "eaurc": eaurc,
    }
    if features is not None:
        metrics["r_at_1"] = recall_at_1(features, labels)
    if superclass_of_class is not None:
        metrics |= hierarchical_accuracy(prediction, labels, superclass_of_class)
    return metrics, bins
