"""DDGSD, BYOT and CS-KD-E: their pure losses on hand values, where gradients flow, BYOT's wrapper."""
import math

import pytest
import torch
from torch import nn

from cskd.batch import Batch
from cskd.config import load_config
from cskd.errors import ConfigError
from cskd.losses import byot_hint_loss, byot_loss, cross_entropy, cskd_e_loss, ddgsd_loss, kd_kl_div, mmd_linear
from cskd.methods import METHODS
from cskd.models import MODELS, Classifier, build_model

C = 5
B = 4


def make_batch(paired: bool = False, views: int = 1, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(B) % C
    batch = Batch(torch.randn(B, 3, 32, 32, generator=g), labels, torch.arange(B))
    if paired:
        batch.pair_images, batch.pair_labels, batch.pair_index = torch.randn(B, 3, 32, 32, generator=g), labels, \
            torch.arange(B) + B
    batch.views = [torch.randn(B, 3, 32, 32, generator=g) for _ in range(views - 1)]
    return batch


def method_and_model(name: str, **params):
    method = METHODS[name](METHODS[name].Params(**params), C)
    torch.manual_seed(0)
    return method, method.prepare_model(build_model("small_cnn", C))


# ---- pure losses on hand values ----

def test_mmd_linear_hand_value():
    # means: f1 -> [(1+3)/2, (0+2)/2] = [2, 1], f2 -> [1, 0]; squared distance 1^2 + 1^2 = 2
    f1 = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    f2 = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    assert mmd_linear(f1, f2).item() == pytest.approx(2.0)
    assert mmd_linear(f1, f1).item() == 0.0


def test_ddgsd_loss_hand_value():
    # CE([1,0], y=0) = log(1 + e^-1), CE([0,1], y=0) = log(1 + e^1); at T=1 both KL directions between
    # softmax([1,0]) and softmax([0,1]) are tanh(1/2) (see test_losses); MMD^2 = 1^2 + 2^2 = 5
    l1, l2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    f1, f2 = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 0.0]])
    y = torch.tensor([0])
    ce = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))
    got = ddgsd_loss(l1, l2, f1, f2, y, temperature=1.0, kl_weight=0.5, mmd_weight=0.1)
    assert got.item() == pytest.approx(ce + 0.5 * 2 * math.tanh(0.5) + 0.1 * 5, abs=1e-6)
    # T=2 halves the logit gap, T^2 = 4 scales each direction: 4 * tanh(1/4) / 2
    got = ddgsd_loss(l1, l2, f1, f2, y, temperature=2.0, kl_weight=1.0, mmd_weight=0.0)
    assert got.item() == pytest.approx(ce + 2 * 4 * math.tanh(0.25) / 2, abs=1e-6)


def test_byot_hint_loss_hand_value():
    # row 1: mask [T, F (0 and -1), T] -> (1-0)^2 + (0.5-2)^2 = 1 + 2.25; row 2: all <= 0 -> masked out;
    # summed over rows, not averaged
    aux = torch.tensor([[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]])
    final = torch.tensor([[0.0, -1.0, 2.0], [-1.0, -2.0, 0.0]])
    assert byot_hint_loss(aux, final).item() == pytest.approx(3.25)


def test_byot_loss_hand_value():
    # final [1,0] and one aux head [0,1], y = 0, T = 1: CE = log(1+e^-1) + log(1+e^1), KL(final || aux) =
    # tanh(1/2); hint: (0-1)^2 (final > 0) + 0 (both 0) = 1
    logits, aux = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    feats, aux_feats = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    ce = math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))
    got = byot_loss(logits, feats, [aux], [aux_feats], torch.tensor([0]), temperature=1.0, alpha=0.25, beta=0.1)
    assert got.item() == pytest.approx(0.75 * ce + 0.25 * math.tanh(0.5) + 0.1 * 1, abs=1e-6)


def test_cskd_e_loss_hand_value():
    # CE([1,0], 0) = log(1+e^-1); class-wise KL to the partner [0,1] = tanh(1/2); the clean view equals
    # the augmented one (no consistency term), then equals the partner (a second tanh(1/2))
    aug, pair, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    ce = math.log(1 + math.exp(-1))
    assert cskd_e_loss(aug, y, pair, aug, 1.0, lam=2.0, lam_e=3.0).item() == pytest.approx(
        ce + 2 * math.tanh(0.5), abs=1e-6)
    assert cskd_e_loss(aug, y, pair, pair, 1.0, lam=2.0, lam_e=3.0).item() == pytest.approx(
        ce + 2 * math.tanh(0.5) + 3 * math.tanh(0.5), abs=1e-6)


# ---- gradients of the pure losses ----

def test_ddgsd_kl_directions_detach_their_target():
    # each direction T^2 * KL(q || p(l/T)) has gradient T * (p - q) / batch with respect to l, q fixed:
    # with the target detached, the KL part of l1's gradient is T * (p1 - p2) / B (no second term from
    # l1's role as view 2's target)
    torch.manual_seed(0)
    l1, l2 = torch.randn(B, C, requires_grad=True), torch.randn(B, C, requires_grad=True)
    f = torch.zeros(B, 3)
    y = torch.zeros(B, dtype=torch.long)
    t = 4.0
    kl_part = ddgsd_loss(l1, l2, f, f, y, t, 1.0, 0.0) - ddgsd_loss(l1, l2, f, f, y, t, 0.0, 0.0)
    g1, g2 = torch.autograd.grad(kl_part, [l1, l2])
    p1, p2 = torch.softmax(l1 / t, 1), torch.softmax(l2 / t, 1)
    assert torch.allclose(g1, t * (p1 - p2).detach() / B, atol=1e-6)
    assert torch.allclose(g2, t * (p2 - p1).detach() / B, atol=1e-6)


def test_mmd_gradient_reaches_both_views():
    # d/d f1_i ||mu1 - mu2||^2 = 2 (mu1 - mu2) / B, and the opposite for f2
    f1, f2 = torch.randn(B, 3, requires_grad=True), torch.randn(B, 3, requires_grad=True)
    g1, g2 = torch.autograd.grad(mmd_linear(f1, f2), [f1, f2])
    diff = (f1.mean(0) - f2.mean(0)).detach()
    assert torch.allclose(g1, (2 * diff / B).expand(B, 3), atol=1e-6)
    assert torch.allclose(g2, -g1, atol=1e-6)


def test_byot_targets_are_detached():
    logits, feats = torch.randn(B, C, requires_grad=True), torch.rand(B, 6, requires_grad=True)
    aux, aux_feats = torch.randn(B, C, requires_grad=True), torch.rand(B, 6, requires_grad=True)
    loss = byot_loss(logits, feats, [aux], [aux_feats], torch.zeros(B, dtype=torch.long), 3.0, 1.0, 1.0)
    g_logits, g_feats, g_aux, g_aux_feats = torch.autograd.grad(loss, [logits, feats, aux, aux_feats],
                                                                allow_unused=True)
    # alpha = 1 drops the CE terms: the final head's logits and features are only targets
    assert (g_logits is None or g_logits.abs().sum() == 0) and g_feats is None
    assert g_aux.abs().sum() > 0 and g_aux_feats.abs().sum() > 0


# ---- the methods on small_cnn ----

def test_views_and_sampling():
    assert METHODS["ddgsd"].num_views == 2 and METHODS["cskd_e"].num_views == 2 and METHODS["byot"].num_views == 1
    assert METHODS["cskd_e"](METHODS["cskd_e"].Params(exclude_self=True), C).sampling().kind == "class_pairs"
    assert METHODS["cskd_e"](METHODS["cskd_e"].Params(exclude_self=True), C).sampling().exclude_self
    assert METHODS["ddgsd"](METHODS["ddgsd"].Params(), C).sampling().kind == "random"


def test_ddgsd_method_matches_pure_loss_and_views_get_gradient():
    method, model = method_and_model("ddgsd", temperature=2.0, kl_weight=0.7, mmd_weight=0.3)
    batch = make_batch(views=2)
    batch.images.requires_grad_(True)
    batch.views[0].requires_grad_(True)
    out = method.loss(model, batch)
    # one forward of both views (train-mode BatchNorm over all 2B images), as the method does
    logits, feats = model(torch.cat([batch.images, batch.views[0]]).detach(), with_features=True)
    ref = ddgsd_loss(logits[:B], logits[B:], feats[:B], feats[B:], batch.labels, 2.0, 0.7, 0.3)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(out.logits, logits[:B], atol=1e-5)
    assert set(out.terms) == {"ce", "kl", "mmd"} and not any(t.requires_grad for t in out.terms.values())
    out.loss.backward()
    assert batch.images.grad.abs().sum() > 0 and batch.views[0].grad.abs().sum() > 0


def test_cskd_e_gradient_only_through_the_augmented_view():
    method, model = method_and_model("cskd_e", temperature=4.0, lam=2.0, lam_e=3.0)
    batch = make_batch(paired=True, views=2)
    for t in (batch.images, batch.pair_images, batch.views[0]):
        t.requires_grad_(True)
    out = method.loss(model, batch)
    out.loss.backward()
    assert batch.views[0].grad.abs().sum() > 0
    assert batch.images.grad is None and batch.pair_images.grad is None  # clean view and partners: no_grad
    with torch.no_grad():  # separate train-mode forwards, as the method does
        aug, pair, clean = (model(x) for x in (batch.views[0], batch.pair_images, batch.images))
    ref = cskd_e_loss(aug, batch.labels, pair, clean, 4.0, 2.0, 3.0)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(out.logits, aug, atol=1e-5)
    assert out.terms["consistency"].item() == pytest.approx(kd_kl_div(aug, clean, 4.0).item(), rel=1e-5)
    assert out.terms["ce"].item() == pytest.approx(cross_entropy(aug, batch.labels).item(), rel=1e-5)


def test_byot_method_matches_pure_loss():
    method, model = method_and_model("byot")
    batch = make_batch()
    out = method.loss(model, batch)
    logits, feats, aux, aux_feats = model(batch.images, with_aux=True)
    ref = byot_loss(logits, feats, aux, aux_feats, batch.labels, 3.0, 0.1, 1e-6)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    assert set(out.terms) == {"ce", "kd", "hint"}


@pytest.mark.parametrize("term", ["hint", "kd"])
def test_byot_distillation_terms_leave_final_head_and_last_stage_alone(term):
    _, model = method_and_model("byot")
    logits, feats, aux, aux_feats = model(make_batch().images, with_aux=True)
    if term == "hint":
        loss = sum(byot_hint_loss(f, feats) for f in aux_feats)
    else:
        loss = sum(kd_kl_div(a, logits, 3.0) for a in aux)
    loss.backward()
    net = model.net
    assert all(p.grad is None for p in [*net.head.parameters(), *net.body[-1].parameters()])
    assert all(p.grad is not None for head in model.aux for p in head.body.parameters())
    assert net.body[0][0].weight.grad.abs().sum() > 0  # the shared earlier stages are trained by the heads


# ---- BYOT's wrapper ----

def test_byot_wrapper_heads_and_shapes():
    _, model = method_and_model("byot")
    assert len(model.aux) == 2  # small_cnn has 3 stages: heads after the first two
    # reductions (1, 2, 2): k = 2 after stage 1, k = 1 (3x3, stride 1) after stage 2
    middles = [head.body[3] for head in model.aux]
    assert [(m.kernel_size, m.stride) for m in middles] == [((2, 2), (2, 2)), ((3, 3), (1, 1))]
    logits, feats, aux, aux_feats = model(make_batch().images, with_aux=True)
    assert logits.shape == (B, C) and feats.shape == (B, 64)
    assert [a.shape for a in aux] == [(B, C)] * 2 and [f.shape for f in aux_feats] == [(B, 64)] * 2


def test_byot_evaluation_path_is_the_wrapped_network():
    _, model = method_and_model("byot")
    model.eval()
    x = make_batch().images
    with torch.no_grad():
        assert model.head is model.net.head
        assert torch.equal(model.forward_features(x), model.net.forward_features(x))
        assert torch.equal(model.head(model.forward_features(x)), model.net(x))
        assert torch.equal(model(x), model.net(x))
        logits, feats = model(x, with_features=True)
        assert torch.equal(feats, model.net.forward_features(x)) and torch.equal(logits, model.net(x))


def test_byot_state_dict_round_trip():
    method, model = method_and_model("byot")
    with torch.no_grad():  # move the BatchNorm running statistics off their initial values
        model(make_batch().images, with_aux=True)
    state = model.state_dict()
    assert any(k.startswith("aux.0.") for k in state) and any(k.startswith("net.head.") for k in state)
    torch.manual_seed(1)
    fresh = method.prepare_model(build_model("small_cnn", C))
    fresh.load_state_dict(state)
    model.eval()
    fresh.eval()
    x = make_batch(seed=1).images
    with torch.no_grad():
        for a, b in zip(model(x, with_aux=True), fresh(x, with_aux=True)):
            for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
                assert torch.equal(u, v)


def test_byot_refuses_a_model_without_stages():
    class Flat(Classifier):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(3, C)

    with pytest.raises(ConfigError, match="byot"):
        METHODS["byot"](METHODS["byot"].Params(), C).prepare_model(Flat())


@pytest.mark.skipif("preact_resnet18" not in MODELS, reason="preact_resnet18 not registered")
def test_byot_on_preact_resnet18():
    model = METHODS["byot"](METHODS["byot"].Params(), C).prepare_model(build_model("preact_resnet18", C))
    assert [head.body[3].kernel_size for head in model.aux] == [(8, 8), (4, 4), (2, 2)]
    logits, feats, aux, aux_feats = model(torch.randn(2, 3, 32, 32), with_aux=True)
    assert logits.shape == (2, C) and [a.shape for a in aux] == [(2, C)] * 3
    assert [f.shape for f in [feats, *aux_feats]] == [(2, 512)] * 4


# ---- parameter checks ----

@pytest.mark.parametrize("name, key, value", [
    ("ddgsd", "temperature", 0.0), ("ddgsd", "kl_weight", -1.0), ("ddgsd", "mmd_weight", -1e-3),
    ("byot", "temperature", -1.0), ("byot", "alpha", 1.5), ("byot", "alpha", -0.1), ("byot", "beta", -1.0),
    ("cskd_e", "temperature", 0.0), ("cskd_e", "lam", -1.0), ("cskd_e", "lam_e", -0.5),
])
def test_check_params_names_the_key(name, key, value):
    cls = METHODS[name]
    with pytest.raises(ConfigError, match=rf"'{name}\.{key}'"):
        cls.check_params(cls.Params(**{key: value}))
    with pytest.raises(ConfigError, match=rf"'{name}\.{key}'"):
        load_config(None, [f"method={name}", f"{name}.{key}={value}"])


def test_defaults_pass_and_load_from_config():
    for name in ("ddgsd", "byot", "cskd_e"):
        METHODS[name].check_params(METHODS[name].Params())
    cfg = load_config(None, ["method=cskd_e", "cskd_e.lam_e=0.5", "cskd_e.exclude_self=true"])
    assert cfg.method_params.lam_e == 0.5 and cfg.method_params.exclude_self


def test_saved_outputs_finds_the_head_of_a_wrapped_net():
    """BYOT's checkpoint stores the head as `net.head.weight`: the class count of saved weights is read
    under the name the head has in the built net, so eval's and a KD teacher's class checks still apply."""
    from cskd.checkpoint import saved_outputs

    net = METHODS["byot"](METHODS["byot"].Params(), 7).prepare_model(build_model("small_cnn", 7))
    state = net.state_dict()
    assert "net.head.weight" in state and "head.weight" not in state
    assert saved_outputs(net, state) == 7
    assert saved_outputs(build_model("small_cnn", 3), build_model("small_cnn", 3).state_dict()) == 3
    assert saved_outputs(net, {}) is None
