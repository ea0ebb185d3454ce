"""The batch triple (global = micro_per_rank x grad_accum x world size), its alias, the LR rules of
large batches (linear scaling, warmup) and the micro-batch split: pure functions, tiny tensors."""
import re

import pytest
import torch

from cskd.batch import Batch, split_batch
from cskd.config import identity_dict, load_config, resolve_batch, to_dict
from cskd.errors import ConfigError
from cskd.step import peak_lr, warmup_factor


@pytest.mark.parametrize("overrides, world, expected", [
    ([], 1, (128, 128, 1)),
    ([], 4, (128, 32, 1)),
    (["batch.global=64", "batch.micro_per_rank=16"], 1, (64, 16, 4)),
    (["batch.global=64", "batch.grad_accum=4"], 1, (64, 16, 4)),
    (["batch.global=64", "batch.micro_per_rank=32"], 2, (64, 32, 1)),
    (["batch.global=64", "batch.micro_per_rank=8", "batch.grad_accum=2"], 4, (64, 8, 2)),
    (["batch_size=256", "batch.grad_accum=2"], 8, (256, 16, 2)),
])
def test_two_numbers_fix_the_third(overrides, world, expected):
    assert resolve_batch(load_config(None, overrides).batch, world) == expected


@pytest.mark.parametrize("overrides, world", [
    (["batch.global=64", "batch.micro_per_rank=16", "batch.grad_accum=2"], 1),  # 16 x 2 x 1 = 32
    (["batch.global=64", "batch.micro_per_rank=24"], 1),
    (["batch.global=100", "batch.grad_accum=3"], 1),
    (["batch.global=128"], 3),
])
def test_a_triple_that_does_not_fit_names_all_four_numbers(overrides, world):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as e:
        resolve_batch(cfg.batch, world)
    message = str(e.value)
    assert f"batch.global={cfg.batch.global_}" in message and f"world size {world}" in message
    assert "batch.micro_per_rank=" in message and "batch.grad_accum=" in message and "\n" not in message


def test_batch_size_is_an_alias_of_batch_global_and_keeps_run_identities():
    alias, canonical = load_config(None, ["batch_size=64"]), load_config(None, ["batch.global=64"])
    assert to_dict(alias) == to_dict(canonical) and to_dict(alias)["batch"]["global"] == 64
    # Runs made before the triple existed stored `batch_size`: their identity is unchanged.
    assert identity_dict(alias)["batch_size"] == 64 and "batch" not in identity_dict(alias)
    micro = load_config(None, ["batch.global=64", "batch.micro_per_rank=16"])
    assert identity_dict(micro)["batch"] == {"micro_per_rank": 16}  # changes BatchNorm's batches: identity
    runtime = load_config(None, ["engine=fsdp", "compile=true", "checkpoint_every=5"])
    assert identity_dict(runtime) == identity_dict(load_config(None, []))  # how a run executes, not what


@pytest.mark.parametrize("overrides, message", [
    (["engine=fsdp", "optimizer.zero=1"], "drop optimizer.zero"),
    (["cuda_graphs=true"], "set compile=true as well"),
    (["warmup_epochs=200"], "must be below epochs (200)"),
    (["engine=deepspeed_x"], "config key 'engine' must be one of ddp, fsdp"),
    (["optimizer.zero=2"], "config key 'optimizer.zero' must be one of 0, 1"),
    (["batch.grad_accum=-1"], "'batch.grad_accum' must be >= 0"),
    (["eval_every=0"], "'eval_every' must be > 0"),
])
def test_bad_combinations_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_linear_scaling_and_warmup_follow_goyal_et_al():
    cfg = load_config(None, ["lr=0.1", "batch.global=1024", "lr_scaling=linear", "warmup_epochs=5", "epochs=90"])
    assert peak_lr(cfg) == pytest.approx(0.4)
    steps = 10
    factors = [warmup_factor(cfg, e, s, steps) for e in range(6) for s in range(steps)]
    assert factors[0] == pytest.approx(0.25 + 0.75 / 50)  # from lr (0.1 of 0.4) towards 0.4, step by step
    assert factors[49] == 1.0 and factors[50:] == [1.0] * 10
    assert all(a < b for a, b in zip(factors[:49], factors[1:50]))
    plain = load_config(None, ["warmup_epochs=2", "epochs=10"])
    assert peak_lr(plain) == 0.1 and warmup_factor(plain, 0, 0, 5) == pytest.approx(1 / 10)


def _batch(n: int, paired: bool, views: int = 0) -> Batch:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1)
    y, i = torch.arange(n) % 3, torch.arange(n)
    b = Batch(x, y, i, x + 100, y, i + 100, epoch=2, step=5) if paired else Batch(x, y, i, epoch=2, step=5)
    b.views = [x + 1000 * (v + 1) for v in range(views)]
    return b


@pytest.mark.parametrize("paired", [False, True])
def test_split_batch_keeps_pairs_views_and_order(paired):
    parts = split_batch(_batch(10, paired, views=1), 4)
    assert [len(p.labels) for p in parts] == [3, 3, 2, 2]
    assert torch.equal(torch.cat([p.index for p in parts]), torch.arange(10))
    for p in parts:
        assert torch.equal(p.images.flatten(), p.index.float()) and (p.epoch, p.step) == (2, 5)
        assert torch.equal(p.views[0].flatten(), p.index.float() + 1000)
        if paired:
            assert torch.equal(p.pair_index, p.index + 100) and torch.equal(p.pair_labels, p.labels)
        else:
            assert p.pair_images is None
    assert split_batch(_batch(3, paired), 1)[0].labels.shape == (3,)
    assert len(split_batch(_batch(2, paired), 4)) == 2  # a shard smaller than the parts: one per anchor


def test_background_writer_runs_jobs_in_order_and_raises_their_error():
    from cskd.checkpoint import BackgroundWriter, to_cpu

    done, writer = [], BackgroundWriter()
    for i in range(3):
        writer.submit(lambda i=i: done.append(i))
    writer.join()
    assert done == [0, 1, 2]

    def fail():
        raise OSError("disk full")

    writer.submit(fail)
    with pytest.raises(OSError, match="disk full"):
        writer.join()
    writer.join()  # raised once
    live = {"w": torch.ones(2), "nested": [torch.zeros(1)]}
    snapshot = to_cpu(live)
    live["w"].add_(1)
    assert snapshot["w"].tolist() == [1.0, 1.0] and snapshot["nested"][0].tolist() == [0.0]
