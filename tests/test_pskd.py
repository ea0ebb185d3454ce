"""PS-KD: its loss and alpha schedule on hand values, the prediction table (1 and 2 ranks), the
epoch-start model teacher, and the half-and-half combinations with Cutout and CutMix."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cskd.batch import Batch
from cskd.config import load_config
from cskd.errors import ConfigError, RunDirError
from cskd.losses import pskd_alpha, pskd_loss
from cskd.methods import METHODS, MethodContext

CPU = torch.device("cpu")


# --- the pure loss and schedule ------------------------------------------------------------------

def test_pskd_loss_hand_value():
    # log_softmax([0, ln 3]) = [ln 1/4, ln 3/4]; target 0.5 * [1, 0] + 0.5 * [0.5, 0.5] = [0.75, 0.25]
    logits = torch.tensor([[0.0, math.log(3.0)]])
    loss = pskd_loss(logits, torch.tensor([0]), torch.tensor([[0.5, 0.5]]), 0.5)
    assert loss.item() == pytest.approx(-(0.75 * math.log(0.25) + 0.25 * math.log(0.75)), abs=1e-6)
    # alpha = 0 is plain cross-entropy, whatever the teacher says
    assert pskd_loss(logits, torch.tensor([1]), torch.tensor([[1.0, 0.0]]), 0.0).item() == pytest.approx(
        -math.log(0.75), abs=1e-6)


def test_pskd_loss_on_a_sequence_skips_the_ignore_index():
    """(tokens, vocabulary) logits of a translation batch: padding positions count nowhere."""
    torch.manual_seed(0)
    logits, teacher = torch.randn(5, 7), torch.softmax(torch.randn(5, 7), dim=1)
    tokens = torch.tensor([3, 1, -100, 6, -100])
    kept = tokens != -100
    want = pskd_loss(logits[kept], tokens[kept], teacher[kept], 0.3)
    assert pskd_loss(logits, tokens, teacher, 0.3, ignore_index=-100).item() == pytest.approx(want.item(), abs=1e-6)
    logits.requires_grad_(True)
    pskd_loss(logits, tokens, teacher, 0.3, ignore_index=-100).backward()
    assert logits.grad[~kept].abs().sum() == 0


def test_alpha_grows_linearly_to_alpha_T_in_the_last_epoch():
    assert pskd_alpha(0.8, 0, 300) == pytest.approx(0.8 / 300)
    assert pskd_alpha(0.8, 149, 300) == pytest.approx(0.4)
    assert pskd_alpha(0.8, 299, 300) == pytest.approx(0.8)


# --- the method ----------------------------------------------------------------------------------

class Net(nn.Module):
    """A BatchNorm and a linear layer: enough to tell train-mode from eval-mode forwards."""

    def __init__(self, features: int = 4, classes: int = 3):
        super().__init__()
        self.bn = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, classes)

    def forward(self, x):
        return self.fc(self.bn(x))


def make_method(name="pskd", num_train=10, batch_per_rank=4, rank=0, world_size=1, **params):
    cfg = load_config(None, [f"method={name}", *[f"{name}.{k}={v}" for k, v in params.items()]])
    method = METHODS[name](cfg.method_params, 3)
    method.bind(MethodContext(CPU, 3, num_train, rank, world_size, 10, None, batch_per_rank))
    return method


def batch(index, epoch, seed=0, features=4):
    g = torch.Generator().manual_seed(seed)
    index = torch.tensor(index)
    return Batch(torch.randn(len(index), features, generator=g), index % 3, index, epoch=epoch)


def test_the_table_after_one_step_holds_that_steps_softmax_for_exactly_those_samples():
    torch.manual_seed(0)
    method, net = make_method(table_dtype="float32"), Net()
    b = batch([7, 2, 5, 0], epoch=0)
    out = method.loss(net, b)
    table = method.table
    torch.testing.assert_close(table.probs[b.index], torch.softmax(out.logits.detach(), 1))
    assert table.written.nonzero().flatten().tolist() == [0, 2, 5, 7]
    assert table.probs[[1, 3, 4, 6, 8, 9]].abs().sum() == 0
    # epoch 0 trains on the one-hot labels: plain cross-entropy
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, b.labels).item(), abs=1e-6)


def test_the_next_epoch_reads_the_stored_rows_before_overwriting_them():
    torch.manual_seed(0)
    method, net = make_method(), Net()
    first = method.loss(net, batch([7, 2, 5, 0], epoch=0))
    stored = torch.softmax(first.logits.detach(), 1).half().float()
    b = batch([7, 2, 5, 0], epoch=1, seed=1)
    out = method.loss(net, b)
    alpha = pskd_alpha(0.8, 1, 10)
    assert out.loss.item() == pytest.approx(pskd_loss(out.logits, b.labels, stored, alpha).item(), abs=1e-6)
    assert method.table.probs.dtype == torch.float16  # the compact default


def test_unwritten_rows_read_as_one_hot_labels():
    method = make_method()
    labels = torch.tensor([2, 0])
    torch.testing.assert_close(method.table.lookup(torch.tensor([4, 9]), labels), F.one_hot(labels, 3).float())


def test_the_table_is_checkpointed_and_restored_exactly():
    torch.manual_seed(0)
    method, net = make_method(), Net()
    method.loss(net, batch([1, 2, 3], epoch=0))
    state = method.state_dict()
    again = make_method()
    again.load_state_dict(state)
    for name in ("probs", "written"):  # all but the scratch row, which only padding writes
        assert torch.equal(getattr(again.table, name)[:-1], getattr(method.table, name)[:-1])
    with pytest.raises(RunDirError, match="not one of 12 samples"):
        make_method(num_train=12).load_state_dict(state)
    with pytest.raises(RunDirError, match="no PS-KD prediction table"):
        make_method().load_state_dict({})


def test_the_model_teacher_equals_the_table_teacher_without_augmentation_and_with_eval_mode_batchnorm():
    """lr 0, the same images every epoch and BatchNorm in eval mode: the network of the end of epoch 0
    predicts exactly what the table stored during epoch 0."""
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2)
    net.eval()
    table, snapshot = make_method(table_dtype="float32"), make_method(teacher="model")
    assert snapshot.table is None and snapshot.state_dict() == {}
    for epoch in (0, 1):
        b = batch([3, 1, 4, 9], epoch=epoch)
        got = {name: m.past_predictions(net, b.images, b.labels, b.index, epoch) for name, m in
               (("table", table), ("model", snapshot))}
        torch.testing.assert_close(got["table"], got["model"])
        table.loss(net, b)
    frozen = snapshot.snapshot.model
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_the_model_teacher_is_the_network_as_the_epoch_started():
    torch.manual_seed(0)
    method, net = make_method(teacher="model"), Net()
    b = batch([0, 1, 2, 3], epoch=1)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    method.past_predictions(net, b.images, b.labels, b.index, 1)
    with torch.no_grad():
        net.fc.weight.add_(1.0)  # a step within the epoch: the teacher must not follow
    teacher = method.snapshot.model
    assert torch.equal(teacher.fc.weight, start["fc.weight"])
    method.past_predictions(net, b.images, b.labels, b.index, 2)  # the next epoch: the new weights
    assert torch.equal(teacher.fc.weight, net.fc.weight)


@pytest.mark.parametrize("override, message", [
    ("pskd.alpha_T=1.5", "pskd.alpha_T' must be in"),
    ("pskd.teacher=disk", "pskd.teacher' must be one of table, model"),
    ("pskd.table_dtype=int8", "pskd.table_dtype' must be one of"),
])
def test_bad_parameters_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["method=pskd", override])


def test_pskd_cutout_refuses_a_patch_that_cuts_nothing_as_cutout_does():
    for method in ("cutout", "pskd_cutout"):
        with pytest.raises(ConfigError, match=rf"'{method}.size' must be >= 2"):
            load_config(None, [f"method={method}", f"{method}.size=1"])


# --- two ranks -----------------------------------------------------------------------------------

def _two_rank_update(rank: int, init_file: str, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(rank)
        method = make_method(table_dtype="float32", num_train=10, batch_per_rank=3, rank=rank, world_size=2)
        index = [[8, 1, 5], [0, 6]][rank]  # a short last step: rank 1 holds one sample fewer
        logits = torch.randn(len(index), 3)
        method.remember(torch.tensor(index), logits)
        results[rank] = (method.table.probs.clone(), method.table.written.clone(), index, torch.softmax(logits, 1))
    finally:
        dist.destroy_process_group()


def test_every_rank_stores_every_ranks_rows_of_the_step(tmp_path):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_two_rank_update, args=(str(tmp_path / "init"), results), nprocs=2)
        results = dict(results)
    (probs0, written0, _, _), (probs1, written1, _, _) = results[0], results[1]
    assert torch.equal(probs0, probs1) and torch.equal(written0, written1)
    for _, _, index, softmax in results.values():
        torch.testing.assert_close(probs0[index], softmax)
    assert written0.nonzero().flatten().tolist() == [0, 1, 5, 6, 8, 10]  # 10: the scratch row of the padding


# --- PS-KD on half of the batch, Cutout or CutMix on the other -----------------------------------

@pytest.mark.parametrize("name", ["pskd_cutmix", "pskd_cutout"])
def test_half_and_half_refreshes_only_the_pskd_half_and_returns_logits_in_batch_order(name):
    torch.manual_seed(0)
    method = make_method(name, num_train=20, batch_per_rank=6, table_dtype="float32")
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    images = torch.randn(6, 3, 12, 12)
    b = Batch(images, torch.tensor([0, 1, 2, 0, 1, 2]), torch.tensor([11, 3, 7, 0, 19, 5]), epoch=0)
    state = torch.get_rng_state()
    out = method.loss(net, b)
    torch.set_rng_state(state)
    plain = torch.randperm(6)[:3]  # the PS-KD half, as the method drew it
    assert method.table.written[:-1].nonzero().flatten().tolist() == sorted(b.index[plain].tolist())
    with torch.no_grad():
        torch.testing.assert_close(out.logits[plain], net(images[plain]))  # unaltered images, in batch order
    assert torch.isfinite(out.loss) and set(out.terms) == {"pskd", "aug"}
    # the loss is the batch mean of the per-sample losses: 3 PS-KD samples, 3 augmented ones
    assert out.loss.item() == pytest.approx((out.terms["pskd"].item() + out.terms["aug"].item()) / 2, abs=1e-6)
