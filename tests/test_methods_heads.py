"""Label smoothing, max entropy, AdaCos and Virtual-softmax: their losses on hand values, their
heads, and where their gradients go. Tiny tensors, no training runs."""
import math

import pytest
import torch
import torch.nn.functional as F

from cskd.batch import Batch
from cskd.config import load_config
from cskd.errors import ConfigError
from cskd.losses import (
    adacos_scale,
    cross_entropy,
    label_smoothing_loss,
    max_entropy_loss,
    softmax_entropy,
    virtual_softmax_loss,
)
from cskd.methods import METHODS
from cskd.models import build_model

LN2 = math.log(2)
# softmax([ln 2, 0, 0]) = [2, 1, 1] / 4 = [1/2, 1/4, 1/4]: log p = [-ln 2, -2 ln 2, -2 ln 2]
HALF_QUARTER_QUARTER = torch.tensor([[LN2, 0.0, 0.0]])


def _batch(num_classes: int = 5, n: int = 6, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    return Batch(torch.randn(n, 3, 32, 32, generator=g), labels, torch.arange(n))


def _prepared(name: str, num_classes: int = 5, **params):
    torch.manual_seed(0)
    method = METHODS[name](METHODS[name].Params(**params), num_classes)
    return method, method.prepare_model(build_model("small_cnn", num_classes))


# --- label smoothing ---------------------------------------------------------------------------

def test_label_smoothing_uniform_hand_value():
    # C=3, eps=0.3, uniform: target [0.7 + 0.1, 0.1, 0.1]; loss = 0.8 ln2 + 2 * 0.1 * 2 ln2 = 1.2 ln2
    loss = label_smoothing_loss(HALF_QUARTER_QUARTER, torch.tensor([0]), 0.3, "uniform")
    assert loss.item() == pytest.approx(1.2 * LN2, abs=1e-6)


def test_label_smoothing_others_hand_value():
    # C=3, eps=0.3, others: target [0.7, 0.15, 0.15]; loss = 0.7 ln2 + 2 * 0.15 * 2 ln2 = 1.3 ln2
    loss = label_smoothing_loss(HALF_QUARTER_QUARTER, torch.tensor([0]), 0.3, "others")
    assert loss.item() == pytest.approx(1.3 * LN2, abs=1e-6)


def test_label_smoothing_uniform_is_pytorch_and_eps0_is_ce():
    logits, targets = torch.randn(4, 7, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 3, 6, 3])
    expected = F.cross_entropy(logits, targets, label_smoothing=0.1)
    assert label_smoothing_loss(logits, targets, 0.1).item() == pytest.approx(expected.item(), abs=1e-6)
    for convention in ("uniform", "others"):
        plain = label_smoothing_loss(logits, targets, 0.0, convention)
        assert plain.item() == pytest.approx(cross_entropy(logits, targets).item(), abs=1e-6)


# --- max entropy -------------------------------------------------------------------------------

def test_max_entropy_hand_value():
    # p = [1/2, 1/4, 1/4], y = 0: CE = ln2; H = 1/2 ln2 + 2 * 1/4 * 2 ln2 = 1.5 ln2
    # beta = 0.5: loss = ln2 - 0.75 ln2 = 0.25 ln2
    assert softmax_entropy(HALF_QUARTER_QUARTER).item() == pytest.approx(1.5 * LN2, abs=1e-6)
    loss = max_entropy_loss(HALF_QUARTER_QUARTER, torch.tensor([0]), 0.5)
    assert loss.item() == pytest.approx(0.25 * LN2, abs=1e-6)


def test_max_entropy_term_raises_the_entropy():
    logits = torch.tensor([[3.0, 1.0, -2.0], [0.5, 2.5, 0.0]], requires_grad=True)
    targets = torch.tensor([0, 1])
    # the gradient of the entropy term alone (loss minus its CE): a descent step must raise H
    (max_entropy_loss(logits, targets, 1.0) - cross_entropy(logits, targets)).backward()
    stepped = logits.detach() - 0.1 * logits.grad
    assert softmax_entropy(stepped).item() > softmax_entropy(logits.detach()).item()


# --- AdaCos ------------------------------------------------------------------------------------

def test_adacos_initial_scale():
    _, net = _prepared("adacos", num_classes=10)
    assert net.head.scale.item() == pytest.approx(math.sqrt(2) * math.log(9), abs=1e-6)


def test_adacos_scale_hand_value():
    # s = ln2, so exp(s * cos) is 2, 1, 1/2 for cos = 1, 0, -1.
    # non-target sums: row 0 (y=0): 1 + 2 = 3; row 1 (y=1): 1/2 + 1 = 1.5; row 2 (y=2): 1 + 1 = 2
    # B_avg = 6.5 / 3 = 13/6. Target angles pi/3, pi/6, pi/2: median pi/3 > pi/4, so cos(pi/4) is used:
    # s_new = ln(13/6) / (1/sqrt2)
    cos = torch.tensor([[0.5, 0.0, 1.0], [-1.0, math.sqrt(3) / 2, 0.0], [0.0, 0.0, 0.0]])
    s_new = adacos_scale(cos, torch.tensor([0, 1, 2]), LN2)
    assert s_new.item() == pytest.approx(math.sqrt(2) * math.log(13 / 6), rel=1e-5)
    # target angles 0.1, 0.2, 0.3 (all below pi/4): cos(median) = cos(0.2); non-targets as above
    cos[0, 0], cos[1, 1], cos[2, 2] = math.cos(0.1), math.cos(0.2), math.cos(0.3)
    s_new = adacos_scale(cos, torch.tensor([0, 1, 2]), LN2)
    assert s_new.item() == pytest.approx(math.log(13 / 6) / math.cos(0.2), rel=1e-5)


def test_adacos_head_uses_its_scale_at_eval_and_checkpoints_it():
    _, net = _prepared("adacos")
    assert set(dict(net.head.named_parameters())) == {"weight"} and net.head.weight.shape == (5, 64)
    net.head.scale.fill_(5.0)
    net.eval()
    with torch.no_grad():
        f = net.forward_features(_batch().images)
        cos = F.normalize(f) @ F.normalize(net.head.weight).T
        assert torch.allclose(net.head(f), 5.0 * cos, atol=1e-6)
    state = net.state_dict()
    assert state["head.scale"].item() == 5.0
    _, fresh = _prepared("adacos")
    assert fresh.head.scale.item() != 5.0
    fresh.load_state_dict(state)
    assert fresh.head.scale.item() == 5.0


def test_adacos_step_uses_the_new_scale_and_no_gradient_reaches_it():
    method, net = _prepared("adacos")
    batch = _batch()
    net.train()
    s_old = net.head.scale.clone()
    out = method.loss(net, batch)
    out.loss.backward()  # after the in-place scale update: the forward kept its own copy
    s_new = net.head.scale.clone()
    with torch.no_grad():  # train-mode BN normalises with the batch's own statistics: the same features
        cos = F.normalize(net.forward_features(batch.images)) @ F.normalize(net.head.weight).T
    assert s_new.item() != pytest.approx(s_old.item())
    assert s_new.item() == pytest.approx(adacos_scale(cos, batch.labels, s_old).item(), rel=1e-5)
    assert torch.allclose(out.logits, s_new * cos, atol=1e-5)
    assert out.terms["scale"].item() == pytest.approx(s_new.item())
    assert not net.head.scale.requires_grad and net.head.scale.grad is None
    assert all(p is not net.head.scale for p in net.parameters())
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0


def test_adacos_refuses_two_classes():
    with pytest.raises(ConfigError, match="adacos"):
        _prepared("adacos", num_classes=2)


# --- Virtual-softmax ---------------------------------------------------------------------------

def test_virtual_softmax_hand_value_per_sample_norms():
    # W = [[2, 0], [0, 1]]: ||W_0|| = 2, ||W_1|| = 1.
    # A: x = [1, 0], y = 0: logits [2, 0], virtual 2 * 1 = 2: CE = ln(e^2 + 1 + e^2) - 2
    # B: x = [0, 3], y = 1: logits [0, 3], virtual 1 * 3 = 3: CE = ln(1 + e^3 + e^3) - 3
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    features = torch.tensor([[1.0, 0.0], [0.0, 3.0]])
    targets = torch.tensor([0, 1])
    expected = (math.log(2 * math.e**2 + 1) - 2 + math.log(2 * math.e**3 + 1) - 3) / 2
    loss = virtual_softmax_loss(features @ weight.T, features, weight, targets)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # each sample's virtual logit uses its own norm: the batch loss is the mean of the one-sample losses
    singles = [virtual_softmax_loss(features[i:i + 1] @ weight.T, features[i:i + 1], weight, targets[i:i + 1])
               for i in range(2)]
    assert loss.item() == pytest.approx(sum(s.item() for s in singles) / 2, abs=1e-6)


def test_virtual_softmax_gradient_reaches_the_target_weight_through_the_virtual_logit():
    weight = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    features = torch.tensor([[1.0, 0.5], [0.5, 3.0]])
    targets = torch.tensor([0, 1])
    # logits without gradient: whatever reaches the weight comes through ||W_y||
    virtual_softmax_loss(features @ weight.detach().T, features, weight, targets).backward()
    assert weight.grad[0].abs().sum() > 0 and weight.grad[1].abs().sum() > 0
    assert weight.grad[2].abs().sum() == 0  # no sample has class 2


def test_vsoftmax_head_has_no_bias_and_eval_logits_are_c_dim():
    method, net = _prepared("vsoftmax")
    assert net.head.bias is None and "head.bias" not in net.state_dict()
    batch = _batch()
    net.train()
    out = method.loss(net, batch)
    assert out.logits.shape == (6, 5)
    out.loss.backward()
    assert net.head.weight.grad is not None
    net.eval()
    with torch.no_grad():
        assert net.head(net.forward_features(batch.images)).shape == (6, 5)


# --- all four: a step, and their config checks -------------------------------------------------

@pytest.mark.parametrize("name", ["ls", "maxent", "adacos", "vsoftmax"])
def test_one_step(name):
    method, net = _prepared(name)
    net.train()
    out = method.loss(net, _batch())
    assert out.logits.shape == (6, 5) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert all(not t.requires_grad for t in out.terms.values())
    out.loss.backward()


def test_method_losses_match_the_pure_functions():
    batch = _batch()
    for name, params, pure in [("ls", {"epsilon": 0.2, "convention": "others"},
                                lambda z: label_smoothing_loss(z, batch.labels, 0.2, "others")),
                               ("maxent", {"beta": 0.3}, lambda z: max_entropy_loss(z, batch.labels, 0.3))]:
        method, net = _prepared(name, **params)
        net.eval()  # the same logits on both calls
        out = method.loss(net, batch)
        assert out.loss.item() == pytest.approx(pure(out.logits).item(), abs=1e-6)


@pytest.mark.parametrize("overrides, key", [
    (["method=ls", "ls.epsilon=1.5"], "ls.epsilon"),
    (["method=ls", "ls.epsilon=1"], "ls.epsilon"),
    (["method=ls", "ls.epsilon=-0.1"], "ls.epsilon"),
    (["method=ls", "ls.convention=tf"], "ls.convention"),
    (["method=maxent", "maxent.beta=-1"], "maxent.beta"),
])
def test_bad_params_are_config_errors(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_good_params_load():
    assert load_config(None, ["method=ls", "ls.convention=others"]).method_params.convention == "others"
    assert load_config(None, ["method=maxent", "maxent.beta=0"]).method_params.beta == 0.0
    assert load_config(None, ["method=adacos"]).method == "adacos"
