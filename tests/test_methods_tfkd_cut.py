"""TF-KD (self, reg), Cutout, CutMix and the CutMix combinations: hand values, geometry, RNG use, teacher."""
import json
import math

import pytest
import torch
from torch import nn

from cskd import rundir
from cskd.batch import Batch
from cskd.config import dump_yaml, load_config
from cskd.errors import ConfigError, RunDirError
from cskd.losses import (cross_entropy, kd_kl_div, label_smoothing_loss, mixup_cross_entropy, tfkd_reg_kl,
                         tfkd_reg_loss, tfkd_self_kl, tfkd_self_loss)
from cskd.methods import METHODS, MethodContext
from cskd.methods.cutmix import box_lambda, draw_cutmix, draw_gate, draw_step, paste_box, rand_box
from cskd.methods.cutout import cutout, draw_centres
from cskd.metrics import METRIC_NAMES
from cskd.models import build_model

CPU = torch.device("cpu")
C = 10
DIGITS = [str(i) for i in range(C)]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def _softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def _kl_mean(p_rows, q_rows):
    """nn.KLDivLoss()'s 'mean' written out: sum of q * log(q / p) over every entry, / (N * C)."""
    total = sum(q * math.log(q / p) for ps, qs in zip(p_rows, q_rows) for p, q in zip(ps, qs))
    return total / (len(p_rows) * len(p_rows[0]))


# --- pure losses ---------------------------------------------------------------------------------

def test_tfkd_self_loss_hand_value():
    # student [1, 0], teacher [0, 1], y = 0, T = 2: p = (s(.5), s(-.5)), q = (s(-.5), s(.5)) with s the
    # sigmoid; sum q log(q/p) = (s(.5) - s(-.5)) * 0.5 = 0.5 * tanh(1/4); KLDivLoss's mean halves it
    # (N*C = 2), T^2 = 4 brings it to tanh(1/4), then the multiplier
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    ce = math.log(1 + math.exp(-1))
    assert tfkd_self_kl(s, t, 2.0, 3.0).item() == pytest.approx(3 * math.tanh(0.25), abs=1e-6)
    assert tfkd_self_loss(s, t, y, 2.0, 0.5, 3.0).item() == pytest.approx(0.5 * ce + 1.5 * math.tanh(0.25), abs=1e-6)
    assert tfkd_self_loss(s, t, y, 6.0, 0.0, 50.0).item() == pytest.approx(ce, abs=1e-6)
    # two rows, three classes: the mean is over N*C = 6 entries (kd_kl_div's is over N)
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 3.0], [1.0, 1.0, -2.0]])
    T, mult = 3.0, 50.0
    kl = _kl_mean([_softmax([v / T for v in r]) for r in s.tolist()],
                  [_softmax([v / T for v in r]) for r in t.tolist()])
    assert tfkd_self_kl(s, t, T, mult).item() == pytest.approx(kl * T * T * mult, rel=1e-5)
    assert tfkd_self_kl(s, t, T, 1.0).item() == pytest.approx(kd_kl_div(s, t, T).item() / 3, rel=1e-5)
    student, teacher = s.clone().requires_grad_(), t.clone().requires_grad_()
    tfkd_self_loss(student, teacher, torch.tensor([0, 1]), T, 0.95, mult).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


def test_tfkd_reg_loss_hand_value():
    # y = 0 of 2 classes: p^d = (0.99, 0.01); the reference's teacher softmax(p^d / T) at T = 1 is
    # (s(0.98), s(-0.98)); the student is not divided by T: p = (s(3), s(-3)); no T^2
    s, y = torch.tensor([[3.0, 0.0]]), torch.tensor([0])
    q, p = [_sigmoid(0.98), _sigmoid(-0.98)], [_sigmoid(3.0), _sigmoid(-3.0)]
    kl = (q[0] * math.log(q[0] / p[0]) + q[1] * math.log(q[1] / p[1])) / 2
    ce = math.log(1 + math.exp(-3))
    assert tfkd_reg_kl(s, y, 1.0, 100.0).item() == pytest.approx(100 * kl, rel=1e-5)
    assert tfkd_reg_loss(s, y, 1.0, 0.1, 100.0).item() == pytest.approx(0.9 * ce + 0.1 * 100 * kl, rel=1e-5)
    # 3 classes, T = 20: p^d = (0.005, 0.99, 0.005) for y = 1; other correct_prob values
    s, y = torch.tensor([[0.3, -1.0, 2.0]]), torch.tensor([1])
    for correct, T in ((0.99, 20.0), (0.6, 2.0)):
        off = (1 - correct) / 2
        q = _softmax([off / T, correct / T, off / T])
        kl = _kl_mean([_softmax(s[0].tolist())], [q])
        ce = -math.log(_softmax(s[0].tolist())[1])
        assert tfkd_reg_loss(s, y, T, 0.3, 7.0, correct).item() == pytest.approx(0.7 * ce + 0.3 * 7 * kl, rel=1e-5)


# --- cutout --------------------------------------------------------------------------------------

def test_cutout_hole_geometry():
    x = torch.randn(3, 2, 8, 10)
    before = x.clone()
    out = cutout(x, 4, torch.tensor([[4, 5], [0, 9], [7, 1]]))
    assert torch.equal(x, before)  # a new tensor
    zero = torch.zeros(3, 8, 10, dtype=torch.bool)
    zero[0, 2:6, 3:7] = True  # inside: rows/cols centre - 2 .. centre + 1, a 4 x 4 hole
    zero[1, 0:2, 7:10] = True  # top-right corner: clipped to 2 x 3
    zero[2, 5:8, 0:3] = True  # bottom-left: clipped to 3 x 3
    assert torch.equal(out == 0, zero[:, None].expand_as(out))  # every channel, nothing else touched
    assert torch.equal(out[~zero[:, None].expand_as(out)], x[~zero[:, None].expand_as(x)])
    # an odd size cuts size - 1, as the reference (2 * (size // 2))
    assert (cutout(torch.ones(1, 1, 9, 9), 5, torch.tensor([[4, 4]])) == 0).sum() == 16
    cl = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    assert cutout(cl, 2, torch.tensor([[1, 1], [2, 2]])).is_contiguous(memory_format=torch.channels_last)


def test_cutout_centres_cover_the_image():
    torch.manual_seed(0)
    c = draw_centres(2000, 3, 5)
    assert c.shape == (2000, 2) and c.dtype == torch.int64
    assert set(c[:, 0].tolist()) == {0, 1, 2} and set(c[:, 1].tolist()) == {0, 1, 2, 3, 4}


# --- cutmix --------------------------------------------------------------------------------------

def test_cutmix_box_matches_the_reference_rand_bbox():
    torch.manual_seed(0)
    for lam in (0.0, 0.19, 0.75, 0.999):
        for _ in range(20):
            top, left, bottom, right = rand_box(32, 24, lam)
            cut = math.sqrt(1 - lam)
            half_h, half_w = int(32 * cut) // 2, int(24 * cut) // 2
            assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 24
            assert bottom - top <= 2 * half_h and right - left <= 2 * half_w
            if 0 < top and bottom < 32:  # not clipped: exactly the reference's 2 * (side // 2)
                assert bottom - top == 2 * half_h
    # lam = 0.75 on 32 x 32: sides 16, centre (row, col) = the next two CPU draws
    torch.manual_seed(4)
    row, col = int(torch.randint(32, ())), int(torch.randint(32, ()))
    torch.manual_seed(4)
    assert rand_box(32, 32, 0.75) == (max(row - 8, 0), max(col - 8, 0), min(row + 8, 32), min(col + 8, 32))
    assert box_lambda((2, 3, 6, 5), 8, 4) == pytest.approx(1 - 8 / 32)


def test_draw_cutmix_lambda_is_the_pasted_area():
    torch.manual_seed(1)
    for _ in range(30):
        lam, perm, (top, left, bottom, right) = draw_cutmix(5, 1.0, 12, 16, CPU)
        assert lam == pytest.approx(1 - (bottom - top) * (right - left) / (12 * 16))
        assert sorted(perm.tolist()) == list(range(5))
        x = torch.randn(5, 3, 12, 16)
        mixed = paste_box(x, perm, (top, left, bottom, right))
        from_partner = torch.zeros(12, 16, dtype=torch.bool)
        from_partner[top:bottom, left:right] = True
        share = (mixed == x[perm]).all(1).all(0) & ~(mixed == x).all(1).all(0)
        assert torch.equal(share, from_partner)  # random data: exactly the box came from x[perm]


def test_paste_box():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    before = x.clone()
    out = paste_box(x, torch.tensor([1, 0]), (1, 2, 3, 5))
    assert torch.equal(x, before)
    assert torch.equal(out[0, :, 1:3, 2:5], x[1, :, 1:3, 2:5]) and torch.equal(out[1, :, 1:3, 2:5], x[0, :, 1:3, 2:5])
    keep = torch.ones(4, 5, dtype=torch.bool)
    keep[1:3, 2:5] = False
    assert torch.equal(out[:, :, keep], x[:, :, keep])
    assert torch.equal(paste_box(x, torch.tensor([1, 0]), (2, 2, 2, 4)), x)  # an empty box pastes nothing


def test_cutmix_gate():
    torch.manual_seed(0)
    assert not any(draw_gate(0.0) for _ in range(100)) and all(draw_gate(1.0) for _ in range(100))
    assert 70 < sum(draw_gate(0.5) for _ in range(200)) < 130
    state = torch.get_rng_state()
    draw_gate(0.0)  # r is drawn at every step, as the reference draws it whatever cutmix_prob is
    assert not torch.equal(state, torch.get_rng_state())
    images = torch.zeros(4, 3, 8, 8)
    assert draw_step(images, 0.0, 1.0) is None and draw_step(images, 1.0, 1.0) is not None


def test_draws_repeat_under_the_same_cpu_rng_state():
    """Every draw comes from torch's global CPU generator, which the checkpoint saves: restoring that
    state alone repeats them (and, where a GPU is present, the device generator is never used)."""
    def draws():
        centres = draw_centres(6, 8, 8)
        step = draw_step(torch.zeros(6, 3, 8, 8), 0.5, 1.0)
        lam, perm, box = draw_cutmix(6, 1.0, 8, 8, CPU)
        return centres.tolist(), step and (step[0], step[1].tolist(), step[2]), (lam, perm.tolist(), box)

    torch.manual_seed(7)
    first = draws()
    state = torch.get_rng_state()
    second = draws()
    torch.manual_seed(7)
    assert draws() == first
    torch.set_rng_state(state)
    assert draws() == second
    assert first != second
    if torch.cuda.is_available():
        device_state = torch.cuda.get_rng_state()
        x = torch.randn(6, 3, 8, 8).cuda()
        lam, perm, box = draw_cutmix(6, 1.0, 8, 8, x.device)
        cutout(x, 4, draw_centres(6, 8, 8))
        paste_box(x, perm, box)
        draw_step(x, 1.0, 1.0)
        assert perm.device.type == "cuda" and torch.equal(device_state, torch.cuda.get_rng_state())


# --- the methods ---------------------------------------------------------------------------------

class Recorder(nn.Module):
    """A linear classifier that records each input it is called on, its grad mode and train mode."""

    def __init__(self, features: int = 48):
        super().__init__()
        self.fc = nn.Linear(features, C)
        self.calls = []

    def forward(self, x):
        self.calls.append((x.detach().clone(), torch.is_grad_enabled(), self.training))
        return self.fc(x.flatten(1))


def _batch(n=6, size=4, paired=False):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % C
    images = torch.randn(n, 3, size, size, generator=g)
    if not paired:
        return Batch(images, labels, torch.arange(n))
    return Batch(images, labels, torch.arange(n), torch.randn(n, 3, size, size, generator=g), labels.clone(),
                 torch.arange(n) + n)


def _method(name, *overrides):
    cfg = load_config(None, [f"method={name}", *overrides])
    return METHODS[name](cfg.method_params, C)


def test_cutout_method_trains_on_the_cut_images():
    method, model, batch = _method("cutout", "cutout.size=2"), Recorder(), _batch()
    torch.manual_seed(3)
    out = method.loss(model, batch)
    torch.manual_seed(3)
    (x, _, _), = model.calls
    assert torch.equal(x, cutout(batch.images, 2, draw_centres(6, 4, 4)))
    assert out.loss.item() == pytest.approx(cross_entropy(out.logits, batch.labels).item(), abs=1e-6)


@pytest.mark.parametrize("prob", [0.0, 1.0])
def test_cutmix_method(prob):
    method, model, batch = _method("cutmix", f"cutmix.prob={prob}"), Recorder(), _batch()
    torch.manual_seed(5)
    out = method.loss(model, batch)
    (x, _, _), = model.calls
    if prob == 0:
        assert torch.equal(x, batch.images)
        assert out.loss.item() == pytest.approx(cross_entropy(out.logits, batch.labels).item(), abs=1e-6)
        return
    torch.manual_seed(5)
    draw_gate(1.0)
    lam, perm, box = draw_cutmix(6, 1.0, 4, 4, CPU)
    assert torch.equal(x, paste_box(batch.images, perm, box))
    expected = mixup_cross_entropy(out.logits, batch.labels, batch.labels[perm], lam)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def _replay(seed, n=6, size=4):
    torch.manual_seed(seed)
    assert draw_gate(1.0)
    return draw_cutmix(n, 1.0, size, size, CPU)


def test_ls_cutmix_smooths_both_labels():
    method, model, batch = _method("ls_cutmix", "ls_cutmix.prob=1", "ls_cutmix.epsilon=0.2"), Recorder(), _batch()
    torch.manual_seed(6)
    out = method.loss(model, batch)
    lam, perm, box = _replay(6)
    (x, _, _), = model.calls
    assert torch.equal(x, paste_box(batch.images, perm, box))
    y = batch.labels
    expected = (lam * label_smoothing_loss(out.logits, y, 0.2)
                + (1 - lam) * label_smoothing_loss(out.logits, y[perm], 0.2))
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_cskd_cutmix_cuts_anchors_and_partners_with_the_same_box_and_permutation():
    method, model = _method("cskd_cutmix", "cskd_cutmix.prob=1", "cskd_cutmix.lam=2"), Recorder()
    batch = _batch(paired=True)
    assert method.sampling().kind == "class_pairs"
    torch.manual_seed(8)
    out = method.loss(model, batch)
    lam, perm, box = _replay(8)
    (anchors, anchor_grad, _), (partners, partner_grad, partner_train) = model.calls
    assert torch.equal(anchors, paste_box(batch.images, perm, box))
    assert torch.equal(partners, paste_box(batch.pair_images, perm, box))
    assert anchor_grad and not partner_grad and partner_train  # partners: no_grad, train mode, as CS-KD
    with torch.no_grad():
        logits, pair_logits = model.fc(anchors.flatten(1)), model.fc(partners.flatten(1))
    ce = mixup_cross_entropy(logits, batch.labels, batch.labels[perm], lam)
    assert out.loss.item() == pytest.approx((ce + 2 * kd_kl_div(logits, pair_logits, 4.0)).item(), abs=1e-5)
    assert set(out.terms) == {"ce", "cls"}


def test_tfkd_reg_needs_no_teacher():
    method = _method("tfkd", "tfkd.mode=reg")
    METHODS["tfkd"].check_inputs(method.params)  # no teacher given: nothing to check
    method.bind(MethodContext(CPU, C, 100, 0, 1, 1, DIGITS))
    assert method.teacher is None and method.state_dict() == {}
    method.load_state_dict({})
    model, batch = Recorder(), _batch()
    out = method.loss(model, batch)
    assert out.loss.item() == pytest.approx(tfkd_reg_loss(out.logits, batch.labels, 20.0, 0.1, 100.0).item(), abs=1e-5)
    assert set(out.terms) == {"ce", "kd"}


def test_tfkd_cutmix_reg_mixes_the_hand_made_teachers():
    method, model, batch = _method("tfkd_cutmix", "tfkd_cutmix.mode=reg", "tfkd_cutmix.prob=1"), Recorder(), _batch()
    torch.manual_seed(9)
    out = method.loss(model, batch)
    lam, perm, box = _replay(9)
    (x, _, _), = model.calls
    assert torch.equal(x, paste_box(batch.images, perm, box))
    y, s = batch.labels, out.logits
    expected = lam * tfkd_reg_loss(s, y, 20.0, 0.1, 100.0) + (1 - lam) * tfkd_reg_loss(s, y[perm], 20.0, 0.1, 100.0)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert out.terms["kd"].item() == pytest.approx(
        (lam * tfkd_reg_kl(s, y, 20.0, 100.0) + (1 - lam) * tfkd_reg_kl(s, y[perm], 20.0, 100.0)).item(), abs=1e-5)


# --- the self teacher ----------------------------------------------------------------------------

def _fake_run(path, seed=0):
    """A finished run dir as the trainer leaves it (config.yaml, checkpoint.pt, summary.json), without training."""
    path.mkdir(parents=True)
    cfg = load_config(None, ["model=small_cnn", "method=ce", f"out_dir={path}"])
    (path / rundir.CONFIG).write_text(dump_yaml(cfg))
    torch.manual_seed(seed)
    torch.save({"model": build_model("small_cnn", C).state_dict(), "epoch": 0, "classes": DIGITS},
               path / rundir.CHECKPOINT)
    metrics = {name: 1.0 for name in METRIC_NAMES}
    (path / rundir.SUMMARY).write_text(json.dumps({
        "dataset": "mnist5k", "model": "small_cnn", "method": "ce", "seed": 0,
        "final": {**metrics, "epoch": 0}, "best": {**metrics, "epoch": 0}}))
    return path


def _ctx():
    return MethodContext(CPU, C, 100, 0, 1, 1, DIGITS)


def _self(name, teacher, *overrides):
    method = _method(name, f"{name}.teacher={teacher}", *overrides)
    method.bind(_ctx())
    return method


def test_tfkd_self_distils_from_the_frozen_teacher(tmp_path):
    teacher_dir = _fake_run(tmp_path / "teacher")
    method = _self("tfkd", teacher_dir, "tfkd.self_alpha=0.5", "tfkd.self_temperature=3", "tfkd.self_multiplier=10")
    teacher = method.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(1)
    student = build_model("small_cnn", C)
    batch = Batch(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    out = method.loss(student, batch)
    with torch.no_grad():
        expected = tfkd_self_loss(out.logits, teacher(batch.images), batch.labels, 3.0, 0.5, 10.0)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert set(method.state_dict()) == {"teacher", "teacher_weights", "teacher_sha256"}
    method.load_state_dict(method.state_dict())
    with pytest.raises(RunDirError, match="changed since this run started"):
        method.load_state_dict({**method.state_dict(), "teacher_sha256": "0" * 64})


def test_tfkd_cutmix_self_scores_the_teacher_on_the_cut_images(tmp_path):
    method = _self("tfkd_cutmix", _fake_run(tmp_path / "teacher"), "tfkd_cutmix.prob=1")
    model, batch = Recorder(), _batch()
    torch.manual_seed(2)
    out = method.loss(model, batch)
    lam, perm, box = _replay(2)
    (x, _, _), = model.calls
    assert torch.equal(x, paste_box(batch.images, perm, box))
    with torch.no_grad():
        t = method.teacher.model(x)
    ce = mixup_cross_entropy(out.logits, batch.labels, batch.labels[perm], lam)
    expected = 0.05 * ce + 0.95 * tfkd_self_kl(out.logits, t, 6.0, 50.0)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("name", ["tfkd", "tfkd_cutmix"])
def test_tfkd_self_refuses_a_missing_teacher_before_training(name, tmp_path):
    cfg = load_config(None, [f"method={name}"])  # a valid config: a grid rule may supply the teacher
    with pytest.raises(RunDirError) as e:
        METHODS[name].check_inputs(cfg.method_params)
    assert f"'{name}.teacher' is empty" in str(e.value) and "\n" not in str(e.value)
    cfg = load_config(None, [f"method={name}", f"{name}.teacher={tmp_path / 'missing'}"])
    with pytest.raises(RunDirError) as e:
        METHODS[name].check_inputs(cfg.method_params)
    assert "not a directory" in str(e.value) and f"{name}.teacher=runs/" in str(e.value)


@pytest.mark.parametrize("name, overrides, paired, teacher", [
    ("cutout", [], False, False),
    ("cutmix", ["cutmix.prob=1"], False, False),
    ("ls_cutmix", ["ls_cutmix.prob=1"], False, False),
    ("cskd_cutmix", ["cskd_cutmix.prob=1"], True, False),
    ("tfkd", ["tfkd.mode=reg"], False, False),
    ("tfkd", [], False, True),
    ("tfkd_cutmix", ["tfkd_cutmix.prob=1"], False, True),
    ("tfkd_cutmix", ["tfkd_cutmix.mode=reg", "tfkd_cutmix.prob=1"], False, False),
])
def test_each_method_backprops_finite_gradients_on_a_small_cnn(name, overrides, paired, teacher, tmp_path):
    method = _method(name, *overrides, *([f"{name}.teacher={_fake_run(tmp_path / 't')}"] if teacher else []))
    method.bind(_ctx())
    torch.manual_seed(0)
    model = build_model("small_cnn", C)
    out = method.loss(model, _batch(n=4, size=16, paired=paired))
    out.loss.backward()
    assert out.logits.shape == (4, C) and torch.isfinite(out.loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("overrides, key", [
    (["method=tfkd", "tfkd.mode=teacher"], "tfkd.mode"),
    (["method=tfkd", "tfkd.teacher_weights=last"], "tfkd.teacher_weights"),
    (["method=tfkd", "tfkd.self_alpha=1.5"], "tfkd.self_alpha"),
    (["method=tfkd", "tfkd.reg_alpha=-0.1"], "tfkd.reg_alpha"),
    (["method=tfkd", "tfkd.self_temperature=0"], "tfkd.self_temperature"),
    (["method=tfkd", "tfkd.reg_temperature=-20"], "tfkd.reg_temperature"),
    (["method=tfkd", "tfkd.reg_multiplier=-1"], "tfkd.reg_multiplier"),
    (["method=tfkd", "tfkd.reg_correct_prob=0"], "tfkd.reg_correct_prob"),
    (["method=cutout", "cutout.size=1"], "cutout.size"),
    (["method=cutmix", "cutmix.beta=0"], "cutmix.beta"),
    (["method=cutmix", "cutmix.prob=1.5"], "cutmix.prob"),
    (["method=ls_cutmix", "ls_cutmix.epsilon=1"], "ls_cutmix.epsilon"),
    (["method=ls_cutmix", "ls_cutmix.convention=all"], "ls_cutmix.convention"),
    (["method=ls_cutmix", "ls_cutmix.prob=-0.5"], "ls_cutmix.prob"),
    (["method=cskd_cutmix", "cskd_cutmix.temperature=0"], "cskd_cutmix.temperature"),
    (["method=cskd_cutmix", "cskd_cutmix.lam=-1"], "cskd_cutmix.lam"),
    (["method=cskd_cutmix", "cskd_cutmix.beta=-1"], "cskd_cutmix.beta"),
    (["method=tfkd_cutmix", "tfkd_cutmix.self_alpha=2"], "tfkd_cutmix.self_alpha"),
    (["method=tfkd_cutmix", "tfkd_cutmix.prob=2"], "tfkd_cutmix.prob"),
])
def test_bad_params_are_one_line_config_errors(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


def test_defaults_and_sections():
    p = load_config(None, ["method=tfkd"]).method_params
    assert (p.mode, p.self_alpha, p.self_temperature, p.self_multiplier) == ("self", 0.95, 6.0, 50.0)
    assert (p.reg_alpha, p.reg_temperature, p.reg_multiplier, p.reg_correct_prob) == (0.1, 20.0, 100.0, 0.99)
    assert load_config(None, ["method=cutout"]).method_params.size == 8
    p = load_config(None, ["method=cutmix"]).method_params
    assert (p.beta, p.prob) == (1.0, 0.5)
    p = load_config(None, ["method=cskd_cutmix", "cskd_cutmix.lam=3", "cskd_cutmix.exclude_self=true"]).method_params
    assert (p.lam, p.temperature, p.exclude_self, p.beta, p.prob) == (3.0, 4.0, True, 1.0, 0.5)
    p = load_config(None, ["method=ls_cutmix", "ls_cutmix.convention=others"]).method_params
    assert (p.epsilon, p.convention, p.prob) == (0.1, "others", 0.5)
    p = load_config(None, ["method=tfkd_cutmix", "tfkd_cutmix.mode=reg", "tfkd_cutmix.beta=0.5"]).method_params
    assert (p.mode, p.reg_alpha, p.beta) == ("reg", 0.1, 0.5)
