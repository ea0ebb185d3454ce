"""The computations behind the CS-KD and PS-KD papers' figures, as pure functions of arrays.

No files and no drawing: logits (N, C) and labels (N,) as torch tensors or numpy arrays in, numpy
out, so that each figure's numbers can be checked on a few hand-made rows (launch/figure_runs.py
reads the run dirs, launch/figures_cskd.py and launch/figures_pskd.py draw). Probabilities are
computed in float64 from the float16 logits the run dirs keep.
"""
from __future__ import annotations

import numpy as np
import torch

from cskd.sample_log import hard_to_learn

HARD_CAP = 100  # PS-KD Fig. 2 plots 100 hard-to-learn samples
TSNE = {"perplexity": 30.0, "init": "pca", "random_state": 0}  # CS-KD Fig. 3's t-SNE, as the captions state it


def log_probabilities(logits) -> np.ndarray:
    """log softmax of `logits` (N, C), float64."""
    return torch.log_softmax(torch.as_tensor(logits).double(), dim=1).numpy()


def probabilities(logits) -> np.ndarray:
    """softmax of `logits` (N, C), float64."""
    return np.exp(log_probabilities(logits))


def predictions(logits) -> np.ndarray:
    """The predicted label of each row of `logits` (the first of tied maxima)."""
    return np.asarray(torch.as_tensor(logits).float().argmax(dim=1).numpy(), dtype=np.int64)


def commonly_misclassified(labels, *logits) -> np.ndarray:
    """The test positions (ascending) that every model of `logits` misclassifies."""
    labels = np.asarray(labels)
    wrong = np.ones(len(labels), dtype=bool)
    for one in logits:
        wrong &= predictions(one) != labels
    return np.flatnonzero(wrong)


def commonly_correct(labels, *logits) -> np.ndarray:
    """The test positions (ascending) that every model of `logits` classifies correctly."""
    labels = np.asarray(labels)
    right = np.ones(len(labels), dtype=bool)
    for one in logits:
        right &= predictions(one) == labels
    return np.flatnonzero(right)


def predicted_and_true_log_probs(logits, labels, index) -> tuple[np.ndarray, np.ndarray]:
    """(log p(predicted label), log p(ground-truth label)) of the samples at `index` (CS-KD Fig. 2)."""
    index = np.asarray(index, dtype=np.int64)
    log_p = log_probabilities(torch.as_tensor(logits)[index])
    rows = np.arange(len(index))
    return log_p.max(axis=1), log_p[rows, np.asarray(labels)[index]]


def shared_edges(values: list[np.ndarray], bins: int = 20) -> np.ndarray:
    """Histogram edges covering every array of `values`, so that overlaid histograms share their bins."""
    joined = np.concatenate([np.asarray(v, dtype=np.float64) for v in values])
    return np.histogram_bin_edges(joined, bins=bins)


def shown_classes(p_a: np.ndarray, p_b: np.ndarray, label: int, limit: int = 20, top: int = 10) -> np.ndarray:
    """The classes a bar plot of two models' softmax rows shows (CS-KD Fig. 1(b)): all of them when there
    are at most `limit`, else the `top` classes by the larger of the two probabilities (highest first),
    with the ground truth `label` added last when it is not among them."""
    if len(p_a) <= limit:
        return np.arange(len(p_a))
    order = np.argsort(-np.maximum(p_a, p_b), kind="stable")[:top]
    return order if label in order else np.append(order, label)


def top_k(probs: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(classes, probabilities) of the `k` highest entries of one softmax row, highest first (ties: lower
    class first)."""
    order = np.argsort(-np.asarray(probs), kind="stable")[:k]
    return order, np.asarray(probs)[order]


def superclass_confusion(predicted, labels, superclass_of_class: list[str]) -> tuple[list[str], np.ndarray]:
    """(superclass names in sorted order, S x S matrix): row = true superclass, column = superclass of the
    predicted fine label, each row divided by its sample count so that it sums to 1 (CS-KD Fig. 4(a)/(b)).
    A superclass without test samples has a row of NaN."""
    names = sorted(set(superclass_of_class))
    of_class = np.array([names.index(s) for s in superclass_of_class])
    truth, guess = of_class[np.asarray(labels)], of_class[np.asarray(predicted)]
    counts = np.zeros((len(names), len(names)))
    np.add.at(counts, (truth, guess), 1)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore"):  # 0 / 0 for a superclass with no samples: NaN, drawn as empty
        return names, counts / totals


def error_per_superclass(predicted, labels, superclass_of_class: list[str]) -> dict[str, float]:
    """Fine-grained top-1 error (%) over the test samples of each true superclass (CS-KD Fig. 4(c)), in
    sorted order of the names; superclasses without test samples are left out."""
    labels, predicted = np.asarray(labels), np.asarray(predicted)
    of_sample = np.asarray(superclass_of_class)[labels]
    return {name: 100.0 * float(np.mean(predicted[of_sample == name] != labels[of_sample == name]))
            for name in sorted(set(superclass_of_class)) if np.any(of_sample == name)}


def hard_samples(correct: np.ndarray, cap: int = HARD_CAP) -> np.ndarray:
    """The first `cap` (lowest positions) hard-to-learn training samples of one run's (epochs, N)
    correctness rows: correct in fewer than half of the epochs (`cskd.sample_log.hard_to_learn`)."""
    return hard_to_learn(correct)[:cap]


def mean_and_iqr(rows: np.ndarray, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per epoch (row of `rows`, (epochs, N)), the mean, 25th and 75th percentile over the columns `samples`."""
    chosen = np.asarray(rows, dtype=np.float64)[:, np.asarray(samples, dtype=np.int64)]
    return chosen.mean(axis=1), np.percentile(chosen, 25, axis=1), np.percentile(chosen, 75, axis=1)


def lowest(candidates: np.ndarray, n: int) -> list[int]:
    """The `n` lowest of `candidates` (fewer if there are fewer): the figures' sample choice, a rule of the
    test order alone, so that nobody picks flattering examples."""
    return [int(i) for i in np.sort(np.asarray(candidates))[:n]]


def tsne_embedding(features: np.ndarray) -> tuple[np.ndarray, float]:
    """(M, 2) t-SNE of `features` (M, D) with `TSNE`'s settings, and the perplexity used: 30, or M - 1
    when there are fewer points (t-SNE needs a perplexity below the point count)."""
    from sklearn.manifold import TSNE as TSNEModel  # only this figure needs scikit-learn

    perplexity = min(TSNE["perplexity"], float(len(features) - 1))
    model = TSNEModel(n_components=2, perplexity=perplexity, init=TSNE["init"], random_state=TSNE["random_state"])
    return model.fit_transform(np.asarray(features, dtype=np.float32)), perplexity
