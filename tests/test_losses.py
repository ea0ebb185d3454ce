import math

import pytest
import torch

from cskd.config import load_config
from cskd.losses import cross_entropy, cskd_loss, kd_kl_div
from cskd.batch import Batch
from cskd.methods import METHODS


def test_kd_kl_div_hand_value_t1():
    # p = softmax([1, 0]) = [s, 1-s], q = softmax([0, 1]) = [1-s, s] with s = sigmoid(1);
    # KL(q || p) = (s - (1-s)) * log(s / (1-s)) = tanh(1/2) * 1
    kl = kd_kl_div(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), temperature=1.0)
    assert kl.item() == pytest.approx(math.tanh(0.5), abs=1e-6)


def test_kd_kl_div_temperature_scaling():
    # at T=2 the logit gap is 1/2: KL = tanh(1/4) * 1/2, then multiplied by T^2 = 4
    kl = kd_kl_div(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), temperature=2.0)
    assert kl.item() == pytest.approx(4 * 0.5 * math.tanh(0.25), abs=1e-6)


def test_kd_kl_div_sums_classes_and_averages_rows():
    # identical rows give zero; the mean over 2 rows halves the single-row value
    student = torch.tensor([[1.0, 0.0], [0.3, 0.3]])
    teacher = torch.tensor([[0.0, 1.0], [0.3, 0.3]])
    assert kd_kl_div(student, teacher, 1.0).item() == pytest.approx(math.tanh(0.5) / 2, abs=1e-6)


def test_cskd_loss_hand_value():
    logits = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    pair = torch.tensor([[0.0, 1.0], [0.0, 2.0]])
    targets = torch.tensor([0, 1])
    ce = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(-2))) / 2
    kl = math.tanh(0.5) / 2  # second pair is identical
    assert cskd_loss(logits, targets, pair, temperature=1.0, lam=3.0).item() == pytest.approx(ce + 3 * kl, abs=1e-6)
    assert cskd_loss(logits, targets, pair, 1.0, 0.0).item() == pytest.approx(ce, abs=1e-6)
    assert cskd_loss(logits, targets, pair, 1.0, 1.0).dim() == 0


def test_gradient_flows_through_anchors_only():
    logits = torch.randn(4, 5, requires_grad=True)
    pair = torch.randn(4, 5, requires_grad=True)
    cskd_loss(logits, torch.tensor([0, 1, 2, 3]), pair, 4.0, 1.0).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert pair.grad is None


def test_losses_computed_in_float32_from_bf16():
    logits = torch.randn(8, 10)
    pair = torch.randn(8, 10)
    y = torch.randint(0, 10, (8,))
    low = cskd_loss(logits.bfloat16(), y, pair.bfloat16(), 4.0, 1.0)
    assert low.dtype == torch.float32
    ref = cskd_loss(logits.bfloat16().float(), y, pair.bfloat16().float(), 4.0, 1.0)
    assert low.item() == pytest.approx(ref.item(), rel=1e-6)


def test_cskd_method_matches_pure_loss_and_uses_separate_train_mode_pass():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.Linear(8, 3)).train()
    images, pairs = torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2) + 5.0
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = load_config(None, ["method=cskd", "cskd.temperature=2", "cskd.lam=0.5"])
    method = METHODS["cskd"](cfg.method_params, 3)
    bn = model[2]
    out = method.loss(model, Batch(images, labels, torch.arange(6), pairs, labels, torch.arange(6)))
    assert bn.num_batches_tracked.item() == 2  # two train-mode passes, running stats updated twice
    with torch.no_grad():
        model.train()
        expected = cskd_loss(model(images), labels, model(pairs), 2.0, 0.5)  # BN sees each half alone
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(out.terms) == {"ce", "cls"}


def test_ce_method():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    images, labels = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    out = METHODS["ce"](None, 3).loss(model, Batch(images, labels, torch.arange(5)))
    assert out.loss.item() == pytest.approx(cross_entropy(model(images), labels).item())
