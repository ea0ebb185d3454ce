"""Mixup, Mixup + CS-KD, KD and KD + CS-KD: their losses on hand values, their RNG use, and the teacher."""
import json
import math
import shutil

import pytest
import torch
from conftest import assert_refused, run_cli, train_args
from torch import nn

from cskd import rundir
from cskd.batch import Batch
from cskd.config import dump_yaml, load_config
from cskd.errors import ConfigError, DataError, RunDirError
from cskd.losses import cross_entropy, kd_kl_div, kd_loss, mixup_cross_entropy
from cskd.methods import METHODS, MethodContext
from cskd.methods.mixup import draw_mix
from cskd.metrics import METRIC_NAMES
from cskd.models import build_model

CPU = torch.device("cpu")
DIGITS = [str(i) for i in range(10)]


# --- pure losses ---------------------------------------------------------------------------------

def test_mixup_cross_entropy_hand_value():
    # logits [1, 0]: CE(y=0) = log(1 + e^-1), CE(y=1) = log(1 + e^1) = 1 + log(1 + e^-1);
    # 0.25 * CE0 + 0.75 * CE1 = log(1 + e^-1) + 0.75
    logits = torch.tensor([[1.0, 0.0]])
    loss = mixup_cross_entropy(logits, torch.tensor([0]), torch.tensor([1]), 0.25)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)) + 0.75, abs=1e-6)
    # lam = 1 is plain CE; equal targets make lam irrelevant
    assert mixup_cross_entropy(logits, torch.tensor([1]), torch.tensor([0]), 1.0).item() == pytest.approx(
        1 + math.log(1 + math.exp(-1)), abs=1e-6)
    assert mixup_cross_entropy(logits, torch.tensor([0]), torch.tensor([0]), 0.3).item() == pytest.approx(
        math.log(1 + math.exp(-1)), abs=1e-6)


def test_kd_loss_hand_value():
    # student [1, 0], teacher [0, 1], y = 0: CE = log(1 + e^-1); at T=1 KL(q || p) = tanh(1/2)
    # (see test_losses); at T=2 the logit gap halves: KL = 1/2 * tanh(1/4), times T^2 = 4
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([0])
    ce = math.log(1 + math.exp(-1))
    assert kd_loss(s, t, y, 1.0, 0.5).item() == pytest.approx(0.5 * ce + 0.5 * math.tanh(0.5), abs=1e-6)
    assert kd_loss(s, t, y, 2.0, 0.9).item() == pytest.approx(0.1 * ce + 0.9 * 4 * 0.5 * math.tanh(0.25), abs=1e-6)
    assert kd_loss(s, t, y, 4.0, 0.0).item() == pytest.approx(ce, abs=1e-6)
    student = s.clone().requires_grad_()
    teacher = t.clone().requires_grad_()
    kd_loss(student, teacher, y, 4.0, 0.9).backward()
    assert student.grad.abs().sum() > 0 and teacher.grad is None


# --- mixup's RNG ---------------------------------------------------------------------------------

def test_mixup_draws_repeat_under_the_same_global_seed():
    """lambda and the permutation come from torch's global CPU RNG, which the checkpoint saves: the
    same RNG state gives the same draws (what makes a resumed run equal an uninterrupted one)."""
    torch.manual_seed(7)
    lam1, perm1 = draw_mix(16, 1.0, CPU)
    state = torch.get_rng_state()
    lam2, perm2 = draw_mix(16, 1.0, CPU)
    torch.manual_seed(7)
    lam, perm = draw_mix(16, 1.0, CPU)
    assert lam == lam1 and torch.equal(perm, perm1)
    torch.set_rng_state(state)
    lam3, perm3 = draw_mix(16, 1.0, CPU)
    assert lam3 == lam2 and torch.equal(perm3, perm2)
    assert 0 <= lam1 <= 1 and sorted(perm1.tolist()) == list(range(16))
    assert (lam1, perm1.tolist()) != (lam2, perm2.tolist())


class Recorder(nn.Module):
    """A linear classifier that records each input it is called on, its grad mode and train mode."""

    def __init__(self, features: int = 12, classes: int = 3):
        super().__init__()
        self.fc = nn.Linear(features, classes)
        self.calls = []

    def forward(self, x):
        self.calls.append((x.detach().clone(), torch.is_grad_enabled(), self.training))
        return self.fc(x.flatten(1))


def _batch(n=6, paired=False, classes=3):
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(n) % classes
    images = torch.randn(n, 3, 2, 2, generator=g)
    if not paired:
        return Batch(images, labels, torch.arange(n))
    return Batch(images, labels, torch.arange(n), torch.randn(n, 3, 2, 2, generator=g), labels.clone(),
                 torch.arange(n) + n)


def _method(name, *overrides):
    cfg = load_config(None, [f"method={name}", *overrides])
    return METHODS[name](cfg.method_params, 3)


def test_mixup_loss_mixes_inputs_and_labels():
    method, model, batch = _method("mixup", "mixup.alpha=0.5"), Recorder(), _batch()
    torch.manual_seed(3)
    out = method.loss(model, batch)
    torch.manual_seed(3)
    lam, perm = draw_mix(6, 0.5, CPU)
    (x, _, _), = model.calls
    assert torch.allclose(x, lam * batch.images + (1 - lam) * batch.images[perm])
    assert torch.equal(out.logits, model.fc(x.flatten(1)))  # the mixed batch's logits
    expected = mixup_cross_entropy(out.logits, batch.labels, batch.labels[perm], lam)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_mixup_cskd_mixes_anchors_and_partners_with_the_same_lambda_and_permutation():
    method, model, batch = _method("mixup_cskd", "mixup_cskd.lam=2"), Recorder(), _batch(paired=True)
    assert method.sampling().kind == "class_pairs"
    torch.manual_seed(5)
    out = method.loss(model, batch)
    torch.manual_seed(5)
    lam, perm = draw_mix(6, 1.0, CPU)
    (anchors, anchor_grad, _), (partners, partner_grad, partner_train) = model.calls
    assert torch.allclose(anchors, lam * batch.images + (1 - lam) * batch.images[perm])
    assert torch.allclose(partners, lam * batch.pair_images + (1 - lam) * batch.pair_images[perm])
    assert anchor_grad and not partner_grad and partner_train  # partners: no_grad, train mode, as CS-KD
    with torch.no_grad():
        logits, pair_logits = model.fc(anchors.flatten(1)), model.fc(partners.flatten(1))
    ce = mixup_cross_entropy(logits, batch.labels, batch.labels[perm], lam)
    assert out.loss.item() == pytest.approx((ce + 2 * kd_kl_div(logits, pair_logits, 4.0)).item(), abs=1e-5)
    assert set(out.terms) == {"ce", "cls"}


@pytest.mark.parametrize("overrides, key", [
    (["method=mixup", "mixup.alpha=0"], "mixup.alpha"),
    (["method=mixup_cskd", "mixup_cskd.alpha=-1"], "mixup_cskd.alpha"),
    (["method=mixup_cskd", "mixup_cskd.temperature=0"], "mixup_cskd.temperature"),
    (["method=mixup_cskd", "mixup_cskd.lam=-0.5"], "mixup_cskd.lam"),
    (["method=kd", "kd.teacher=t", "kd.alpha=1.5"], "kd.alpha"),
    (["method=kd", "kd.teacher=t", "kd.temperature=-4"], "kd.temperature"),
    (["method=kd", "kd.teacher=t", "kd.teacher_weights=last"], "kd.teacher_weights"),
    (["method=kd_cskd", "kd_cskd.teacher=t", "kd_cskd.lam=-1"], "kd_cskd.lam"),
])
def test_bad_params_are_one_line_config_errors(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert f"'{key}'" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("method", ["kd", "kd_cskd"])
def test_an_empty_teacher_is_refused_by_the_input_check(method):
    cfg = load_config(None, [f"method={method}", f"{method}.teacher= "])  # valid config: a grid rule may set it
    with pytest.raises(RunDirError) as e:
        METHODS[method].check_inputs(cfg.method_params)
    assert f"'{method}.teacher' is empty" in str(e.value) and "\n" not in str(e.value)


# --- the KD teacher ------------------------------------------------------------------------------

def _fake_run(path, classes=DIGITS, finished=True, seed=0):
    """A run dir as the trainer leaves it (config.yaml, checkpoint.pt, summary.json), without training."""
    path.mkdir(parents=True)
    cfg = load_config(None, ["model=small_cnn", "method=ce", f"out_dir={path}"])
    (path / rundir.CONFIG).write_text(dump_yaml(cfg))
    torch.manual_seed(seed)
    state = build_model("small_cnn", len(classes)).state_dict()
    torch.save({"model": state, "epoch": 0, "classes": classes}, path / rundir.CHECKPOINT)
    if finished:
        metrics = {name: 1.0 for name in METRIC_NAMES}
        (path / rundir.SUMMARY).write_text(json.dumps({
            "dataset": "mnist5k", "model": "small_cnn", "method": "ce", "seed": 0,
            "final": {**metrics, "epoch": 0}, "best": {**metrics, "epoch": 0}}))
    return path


def _ctx(classes=DIGITS, num_classes=10):
    return MethodContext(CPU, num_classes, 100, 0, 1, 1, classes)


def _kd(name, teacher, *overrides):
    cfg = load_config(None, [f"method={name}", f"{name}.teacher={teacher}", *overrides])
    return METHODS[name](cfg.method_params, 10)


def test_kd_teacher_is_frozen_and_outside_the_student(tmp_path):
    method = _kd("kd", _fake_run(tmp_path / "teacher"))
    method.bind(_ctx())
    teacher = method.teacher.model
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    torch.manual_seed(1)
    student = build_model("small_cnn", 10)
    keys = set(student.state_dict())
    batch = Batch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    out = method.loss(student, batch)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    assert set(student.state_dict()) == keys  # nothing of the teacher's was attached to the student
    assert not any(p is q for p in student.parameters() for q in teacher.parameters())
    state = method.state_dict()  # what the student's checkpoint holds of the method: no tensors
    assert set(state) == {"teacher", "teacher_weights", "teacher_sha256"}
    assert all(isinstance(v, str) for v in state.values())
    with torch.no_grad():
        expected = kd_loss(out.logits, teacher(batch.images), batch.labels, 4.0, 0.9)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_kd_cskd_adds_the_partner_term(tmp_path):
    method = _kd("kd_cskd", _fake_run(tmp_path / "teacher"), "kd_cskd.lam=3", "kd_cskd.alpha=0.5")
    method.bind(_ctx())
    assert method.sampling().kind == "class_pairs"
    torch.manual_seed(2)
    student = build_model("small_cnn", 10)
    labels = torch.tensor([0, 1, 2, 3])
    batch = Batch(torch.randn(4, 3, 32, 32), labels, torch.arange(4), torch.randn(4, 3, 32, 32), labels,
                  torch.arange(4) + 4)
    out = method.loss(student, batch)
    with torch.no_grad():
        pair = student(batch.pair_images)
        teacher = method.teacher.model(batch.images)
    kd = kd_loss(out.logits, teacher, labels, 4.0, 0.5)
    assert out.loss.item() == pytest.approx((kd + 3 * kd_kl_div(out.logits, pair, 4.0)).item(), abs=1e-5)
    assert set(out.terms) == {"ce", "kd", "cls"}
    assert out.terms["ce"].item() == pytest.approx(cross_entropy(out.logits, labels).item(), abs=1e-6)


def _refused(method, ctx, error, *fragments):
    with pytest.raises(error) as e:
        method.bind(ctx)
    message = str(e.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_kd_teacher_problems_are_one_line_errors(tmp_path):
    missing = tmp_path / "missing"
    _refused(_kd("kd", missing), _ctx(), RunDirError, str(missing), "not a directory", "kd.teacher=runs/")
    (tmp_path / "empty").mkdir()
    _refused(_kd("kd", tmp_path / "empty"), _ctx(), RunDirError, "no config.yaml", "kd.teacher=")
    unfinished = _fake_run(tmp_path / "unfinished", finished=False)
    _refused(_kd("kd_cskd", unfinished), _ctx(), RunDirError, "has not finished", "kd_cskd.teacher=runs/")
    _refused(_kd("kd", unfinished, "kd.teacher_weights=best"), _ctx(), RunDirError,
             "has not finished")
    nobest = _fake_run(tmp_path / "nobest")
    _refused(_kd("kd", nobest, "kd.teacher_weights=best"), _ctx(), RunDirError, "no best.pt")
    broken = _fake_run(tmp_path / "broken")
    (broken / rundir.CHECKPOINT).write_bytes(b"")  # a write that never completed
    _refused(_kd("kd", broken), _ctx(), RunDirError, str(broken), "is empty")


def test_kd_teacher_must_predict_the_students_classes(tmp_path):
    three = _fake_run(tmp_path / "three", classes=["a", "b", "c"])
    _refused(_kd("kd", three), _ctx(), DataError, "predicts 3 classes", "has 10")
    letters = _fake_run(tmp_path / "letters", classes=list("abcdefghij"))
    _refused(_kd("kd", letters), _ctx(), DataError, "class 0 'a'", "'0'")
    method = _kd("kd", letters)
    method.bind(_ctx(classes=None))  # a dataset that records no names: only the count is checked
    assert method.teacher is not None


def test_kd_resume_refuses_a_changed_teacher(tmp_path):
    teacher = _fake_run(tmp_path / "teacher")
    first = _kd("kd", teacher)
    first.bind(_ctx())
    saved = first.state_dict()
    again = _kd("kd", teacher)
    again.bind(_ctx())
    again.load_state_dict(saved)  # unchanged: resumes
    shutil.rmtree(teacher)
    _fake_run(teacher, seed=1)  # the teacher retrained into the same dir
    changed = _kd("kd", teacher)
    changed.bind(_ctx())
    with pytest.raises(RunDirError) as e:
        changed.load_state_dict(saved)
    assert "changed since this run started" in str(e.value) and "\n" not in str(e.value)


def test_kd_loads_a_real_teacher_and_the_trainer_refuses_an_unfinished_one(mnist_dir, tmp_path):
    """End to end on a real 1-epoch run: it loads as a teacher; without its summary.json (a run
    still training, or killed) the student's trainer stops with one line and exit status 2."""
    teacher = tmp_path / "teacher"
    res = run_cli(train_args(mnist_dir, teacher))
    assert res.returncode == 0, res.stderr[-2000:]
    method = _kd("kd", teacher)
    method.bind(_ctx())
    assert "ce / small_cnn, final weights (epoch 1" in method.teacher.description
    (teacher / rundir.SUMMARY).unlink()
    res = run_cli(train_args(mnist_dir, tmp_path / "student", "method=kd", f"kd.teacher={teacher}"))
    assert_refused(res, "has not finished")
    assert not (tmp_path / "student").exists()  # checked before the run dir is written: a fixed path just works
