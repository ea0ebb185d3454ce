"""engine=deepspeed (cskd/engine_deepspeed.py): the DeepSpeed config it writes, the refusal where
DeepSpeed is not installed, and, where it is, 2 gloo ranks under ZeRO stages 0, 1 and 2 training as
DDP does, with full states that any engine loads; end to end, a 2-rank torchrun CS-KD run SIGKILLed
in its last checkpoint resumes, under DeepSpeed or DDP, to DDP's uninterrupted run exactly.

The config and refusal tests run everywhere. The others skip without DeepSpeed; their first run on
a machine waits for DeepSpeed to compile its CPU communication op (about 70-100 s on 2 cores, once:
it is cached under ~/.cache/torch_extensions).
"""
from __future__ import annotations

import gc
import shutil
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import cskd.config
from cskd.config import load_config
from cskd.distributed import DistEnv, broadcast_object
from cskd.engine import build_engine
from cskd.engine_deepspeed import deepspeed_config
from cskd.errors import ConfigError
from conftest import assert_refused, file_tree, run_cli, train_args
from test_engine import (CPU, HYPER, MICRO, ONE, ROWS, STEPS, assert_same_state, batches, make_net, reference_params,
                         single)
from test_scale_runs import ENGINE_RUN, KILL, _assert_close_weights, _run, _summary

INSTALLED = cskd.config.deepspeed_installed()
# A mark, not importorskip in the fixtures: pytest would first set up the session's shared runs.
needs_deepspeed = pytest.mark.skipif(not INSTALLED, reason="DeepSpeed is not installed: pip install '.[deepspeed]'")
ENGINES = {"ddp": {"engine": "ddp"}, **{f"zero{z}": {"engine": "deepspeed", "zero": z} for z in (0, 1, 2)}}
DEEPSPEED = [name for name in ENGINES if name != "ddp"]


# --- the config DeepSpeed is given (no DeepSpeed needed) -----------------------------------------

@pytest.mark.parametrize("batch, zero", [((128, 64, 1), 0), ((256, 32, 4), 1), ((1024, 16, 8), 2)])
def test_deepspeed_config_states_the_batch_triple_and_the_zero_stage(batch, zero):
    config = deepspeed_config(batch, zero)
    assert config == {"train_batch_size": batch[0], "train_micro_batch_size_per_gpu": batch[1],
                      "gradient_accumulation_steps": batch[2], "zero_allow_untested_optimizer": True,
                      "gradient_clipping": 0.0,
                      "zero_optimization": {"stage": zero, "reduce_bucket_size": 6553600,
                                            "allgather_bucket_size": 6553600}}


def test_deepspeed_config_autocasts_as_the_training_step_does():
    """bf16 through DeepSpeed's torch_autocast (parameters and BatchNorm stay fp32), gradients reduced in fp32."""
    from cskd.step import autocast_dtype

    cfg = load_config(None, [])
    assert cfg.amp and autocast_dtype(cfg, torch.device("cpu")) is None  # amp is CUDA-only
    dtype = autocast_dtype(cfg, torch.device("cuda", 0))
    assert dtype is torch.bfloat16
    assert deepspeed_config((64, 32, 1), 1, dtype)["torch_autocast"] == {
        "enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "torch_autocast" not in deepspeed_config((64, 32, 1), 1, None)
    assert autocast_dtype(load_config(None, ["amp=false"]), torch.device("cuda", 0)) is None


# --- refusals ------------------------------------------------------------------------------------

def test_engine_deepspeed_without_deepspeed_is_a_one_line_config_error(monkeypatch):
    monkeypatch.setattr(cskd.config, "deepspeed_installed", lambda: False)  # both refusals ask cskd.config
    for refuse in (lambda: load_config(None, ["engine=deepspeed"]),
                   lambda: build_engine(make_net(), ONE, engine="deepspeed", **HYPER)):
        with pytest.raises(ConfigError, match=r"pip install '\.\[deepspeed\]'") as e:
            refuse()
        assert "\n" not in str(e.value)


@pytest.mark.skipif(INSTALLED, reason="DeepSpeed is installed here")
def test_the_trainer_refuses_engine_deepspeed_before_writing_anything(tmp_path):
    before = file_tree(tmp_path)
    res = run_cli(train_args(tmp_path / "data", tmp_path / "run", "engine=deepspeed"), timeout=120)
    assert_refused(res, "pip install '.[deepspeed]'", before, tmp_path)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.zero=2"], "optimizer.zero=2 (gradients sharded as well) needs engine=deepspeed"),
    (["engine=fsdp", "optimizer.zero=2"], "needs engine=deepspeed"),
    (["engine=deepspeed", "optimizer.zero=3"], "config key 'optimizer.zero' must be one of 0, 1, 2"),
    (["engine=deepspeed", "compile=true"], "compile=true is not supported under engine=deepspeed"),
])
def test_combinations_deepspeed_cannot_run_are_one_line_config_errors(monkeypatch, overrides, message):
    monkeypatch.setattr(cskd.config, "deepspeed_installed", lambda: True)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


def test_engine_deepspeed_and_zero_2_are_runtime_keys(monkeypatch):
    """A run may resume under another engine: they compute the same run."""
    monkeypatch.setattr(cskd.config, "deepspeed_installed", lambda: True)
    a = load_config(None, ["engine=deepspeed", "optimizer.zero=2"])
    assert cskd.config.identity_dict(a) == cskd.config.identity_dict(load_config(None, []))


# --- two ranks (DeepSpeed needed) ----------------------------------------------------------------

def step(engine, x, y) -> None:
    """A training step through the engine interface cskd.step uses."""
    engine.backward(F.cross_entropy(engine.model(x), y))
    engine.step()


def accumulated_step(engine, x, y) -> None:
    for i, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
        with engine.no_sync() if i < MICRO - 1 else nullcontext():
            engine.backward(F.cross_entropy(engine.model(xm), ym) / MICRO)
    engine.step()


def _rank(rank: int, init_file: str, out: str, start: dict, fresh: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        env = DistEnv(rank, 2, rank, CPU)
        results = {name: _train(env, rank, kw, start, fresh) for name, kw in ENGINES.items()}
        for name in DEEPSPEED:  # each DeepSpeed state resumed under DDP, DDP's under each DeepSpeed stage
            results[name]["to_ddp"] = _resume(env, rank, ENGINES["ddp"], broadcast_object(results[name]["saved"]))
            results[name]["from_ddp"] = _resume(env, rank, ENGINES[name], broadcast_object(results["ddp"]["saved"]))
        results["autocast"] = _autocast(env)
        results["large_gradients"] = {name: _large_gradient_step(env, kw) for name, kw in ENGINES.items()}
        gc.collect()
        dist.barrier()
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _rows(rank: int) -> slice:
    return slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)


def _train(env: DistEnv, rank: int, kw: dict, start: dict, fresh: dict) -> dict:
    """STEPS steps on this rank's half of each batch, the state, one step more; `start` (a single
    process's state) loaded into other weights, then one step; `fresh` (its state before any step)
    loaded into the trained engine, then one step; one step of MICRO accumulated micro-batches."""
    xs, ys = batches()
    rows = _rows(rank)
    engine = build_engine(make_net(), env, **kw, **HYPER, batch=(ROWS, ROWS // 2, 1))
    for i in range(STEPS):
        step(engine, xs[i, rows], ys[i, rows])
    saved = engine.full_state()
    step(engine, xs[STEPS, rows], ys[STEPS, rows])
    continued = engine.full_state()
    resumed = _resume(env, rank, kw, start)
    engine.load_full_state(fresh)  # no momentum saved: the trained engine drops its own
    step(engine, xs[0, rows], ys[0, rows])
    accumulating = build_engine(make_net(), env, **kw, **HYPER, batch=(ROWS, ROWS // 2 // MICRO, MICRO))
    accumulated_step(accumulating, xs[0, rows], ys[0, rows])
    return {"layout": engine.layout, "saved": saved, "continued": continued, "resumed": resumed,
            "restarted": engine.full_state(), "accumulated": accumulating.full_state(),
            "other_ranks": broadcast_object(bool(continued), src=1)}


def _resume(env: DistEnv, rank: int, kw: dict, state: dict) -> dict:
    """`state` (after STEPS steps) loaded into an engine of other weights, one step, its state."""
    xs, ys = batches()
    engine = build_engine(make_net(seed=5), env, **kw, **HYPER, batch=(ROWS, ROWS // 2, 1))
    engine.load_full_state(state)
    step(engine, xs[STEPS, _rows(rank)], ys[STEPS, _rows(rank)])
    return engine.full_state()


def _autocast(env: DistEnv) -> dict:
    """DeepSpeed's forward with the run's autocast dtype: computes in bf16 (DeepSpeed autocasts on its
    accelerator, the CPU here), with BatchNorm's weights and statistics kept in fp32."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 7), nn.BatchNorm1d(7), nn.Linear(7, 3))
    engine = build_engine(net, env, engine="deepspeed", zero=1, **HYPER, batch=(8, 4, 1), autocast=torch.bfloat16)
    out = engine.model(torch.randn(4, 6))
    engine.backward(out.float().sum())
    engine.step()
    return {"out": out.dtype, "bn": {k: v.dtype for k, v in net[1].state_dict().items()},
            "grads_reduced_in": sorted(str(d) for d in engine._ds.optimizer.ipg_buckets)}


def _large_gradient_step(env: DistEnv, kw: dict) -> dict:
    """One step on a loss whose gradient norm is far above 1 (DeepSpeed's default clipping norm)."""
    engine = build_engine(make_net(), env, **kw, **HYPER, batch=(ROWS, ROWS // 2, 1))
    xs, ys = batches()
    loss = 1000 * F.cross_entropy(engine.model(xs[0, _rows(env.rank)]), ys[0, _rows(env.rank)])
    engine.backward(loss)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in engine.net.parameters()])).item() \
        if kw["engine"] == "ddp" else None
    engine.step()
    return {"model": engine.full_state(with_optimizer=False).get("model"), "grad_norm": norm}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deepspeed")
    states = single(STEPS).full_state(), single(0).full_state()
    mp.spawn(_rank, args=(str(tmp / "init"), str(tmp / "out.pt"), *states), nprocs=2)
    return torch.load(tmp / "out.pt", weights_only=True)


@needs_deepspeed
@pytest.mark.parametrize("name", DEEPSPEED)
def test_deepspeed_reaches_ddps_parameters(two_ranks, name):
    assert two_ranks[name]["layout"] == f"deepspeed+{name}"
    torch.testing.assert_close(two_ranks[name]["continued"], two_ranks["ddp"]["continued"])
    torch.testing.assert_close(two_ranks[name]["continued"]["model"], reference_params(STEPS + 1))


@needs_deepspeed
@pytest.mark.parametrize("name", DEEPSPEED)
def test_deepspeed_full_state_is_the_single_process_state(two_ranks, name):
    assert_same_state(two_ranks[name]["saved"], single(STEPS).full_state())
    assert two_ranks[name]["other_ranks"] is False  # rank 1 gets {}


@needs_deepspeed
@pytest.mark.parametrize("name", DEEPSPEED)
def test_deepspeed_state_resumes_under_ddp_and_ddps_under_deepspeed(two_ranks, name):
    continued = single(STEPS + 1).full_state()
    for key in ("resumed", "to_ddp", "from_ddp"):
        assert_same_state(two_ranks[name][key], continued)
    engine = build_engine(make_net(seed=5), ONE, **HYPER)  # and on one process
    engine.load_full_state(two_ranks[name]["saved"])
    xs, ys = batches()
    step(engine, xs[STEPS], ys[STEPS])
    assert_same_state(engine.full_state(), continued)


@needs_deepspeed
@pytest.mark.parametrize("name", DEEPSPEED)
def test_a_state_without_momentum_restarts_a_trained_deepspeed_engine(two_ranks, name):
    assert_same_state(two_ranks[name]["restarted"], single(1).full_state())


@needs_deepspeed
@pytest.mark.parametrize("name", DEEPSPEED)
def test_deepspeed_micro_steps_under_no_sync_are_one_step_on_the_concatenated_batch(two_ranks, name):
    assert_same_state(two_ranks[name]["accumulated"], single(1).full_state())


@needs_deepspeed
def test_deepspeed_autocasts_the_forward_and_keeps_batchnorm_and_reductions_fp32(two_ranks):
    got = two_ranks["autocast"]
    assert got["out"] == torch.bfloat16
    assert set(got["bn"].values()) == {torch.float32, torch.int64}  # num_batches_tracked is int64
    assert got["grads_reduced_in"] == ["torch.float32"]


@needs_deepspeed
@pytest.mark.parametrize("name", DEEPSPEED)
def test_deepspeed_does_not_clip_gradients(two_ranks, name):
    """DeepSpeed 0.19.8 clips at norm 1.0 by default; the config turns that off, as DDP does not clip."""
    got = two_ranks["large_gradients"]
    assert got["ddp"]["grad_norm"] > 100
    torch.testing.assert_close(got[name]["model"], got["ddp"]["model"])


# --- end to end: torchrun, SIGKILL, resume (DeepSpeed needed; about 30 s per run on 2 CPU cores) --

@pytest.fixture(scope="module")
def killed_deepspeed_run(mnist_dir, tmp_path_factory):
    """A 2-rank ZeRO-1 CS-KD run SIGKILLed in its last checkpoint (epoch 1's is on disk)."""
    out = tmp_path_factory.mktemp("deepspeed_run") / "killed"
    res = _run(2, mnist_dir, out, *ENGINE_RUN, "engine=deepspeed", "optimizer.zero=1", kill=KILL)
    assert res.returncode == 1, res.stderr[-3000:]
    return out


@needs_deepspeed
@pytest.mark.parametrize("resume_with", [("engine=deepspeed", "optimizer.zero=1"), ("engine=ddp",)])
def test_a_killed_deepspeed_run_resumes_to_ddps_uninterrupted_run(killed_deepspeed_run, ddp_cskd_run, mnist_dir,
                                                                   tmp_path, resume_with):
    """On 2 ranks DeepSpeed computes DDP's steps bit for bit, so the resumed run must end exactly
    where DDP's uninterrupted one does, whichever engine resumes it."""
    killed = tmp_path / "killed"
    shutil.copytree(killed_deepspeed_run, killed)
    res = _run(2, mnist_dir, killed, *ENGINE_RUN, *resume_with)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming" in res.stdout + res.stderr
    straight = _summary(ddp_cskd_run[0])
    assert _summary(killed)["final"] == straight["final"] and _summary(killed)["best"] == straight["best"]
    _assert_close_weights(killed, ddp_cskd_run[0], atol=0)
