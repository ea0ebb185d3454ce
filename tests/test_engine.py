"""cskd.engine: DDP, DDP + ZeRO-1 and FSDP2 on 2 gloo ranks train as one process on the whole batch
does, and their full states are one format whatever the world size and the engine.

One spawn of 2 ranks runs every layout (module fixture `two_ranks`); the tests compare what it
saved with a single-process SGD run of the same tiny BatchNorm-free net on the same batches.
"""
from __future__ import annotations

import gc
from contextlib import nullcontext

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from cskd.distributed import DistEnv, all_gather_objects, broadcast_buffers
from cskd.engine import build_engine
from cskd.errors import ConfigError

ROWS, STEPS, MICRO = 12, 3, 3  # global batch, steps before the checkpoint, micro-steps of accumulation
HYPER = dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
LAYOUTS = {"ddp": {"engine": "ddp"}, "ddp+zero1": {"engine": "ddp", "zero": 1}, "fsdp": {"engine": "fsdp"}}
CPU = torch.device("cpu")
ONE = DistEnv(0, 1, 0, CPU)


def make_net(seed: int = 0) -> nn.Module:
    """Two top-level blocks (two FSDP units); 7 and 3 rows do not split evenly over 2 ranks."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Sequential(nn.Linear(6, 7), nn.Tanh()), nn.Linear(7, 3))


def batches() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(STEPS + 1, ROWS, 6, generator=g), torch.randint(0, 3, (STEPS + 1, ROWS), generator=g)


def step(engine, x, y) -> None:
    engine.optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(engine.model(x), y).backward()
    engine.optimizer.step()


def accumulated_step(engine, x, y) -> list:
    """MICRO micro-batches, all but the last under no_sync: one step on their concatenation.
    Returns the gradients this rank holds after the first micro-step and after the last."""
    engine.optimizer.zero_grad(set_to_none=True)
    held = []
    for i, (xm, ym) in enumerate(zip(x.chunk(MICRO), y.chunk(MICRO))):
        with engine.no_sync() if i < MICRO - 1 else nullcontext():
            (F.cross_entropy(engine.model(xm), ym) / MICRO).backward()
        if i in (0, MICRO - 1):
            held.append(local_grads(engine.net))
    engine.optimizer.step()
    return held


def local_grads(net: nn.Module) -> list:
    """Each parameter's gradient as this rank holds it (its shard under FSDP), None if it has none."""
    grads = [p.grad for p in net.parameters()]
    return [None if g is None else getattr(g, "_local_tensor", g).clone() for g in grads]


def single(steps: int, net: nn.Module | None = None, **hyper):
    """A single-process engine after `steps` steps on the whole batches."""
    engine = build_engine(net or make_net(), ONE, **(hyper or HYPER))
    xs, ys = batches()
    for i in range(steps):
        step(engine, xs[i], ys[i])
    return engine


def reference_params(steps: int) -> dict:
    """Plain torch: SGD over the net's parameters on the whole batches, no engine."""
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), **HYPER)
    xs, ys = batches()
    for i in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(net(xs[i]), ys[i]).backward()
        optimizer.step()
    return net.state_dict()


def assert_same_state(got: dict, want: dict) -> None:
    """Same keys, same parameter ids and hyperparameters, tensors equal within float rounding."""
    assert got.keys() == want.keys() == {"model", "optimizer"}
    torch.testing.assert_close(got["model"], want["model"])
    assert got["optimizer"]["param_groups"] == want["optimizer"]["param_groups"]
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    torch.testing.assert_close(got["optimizer"]["state"], want["optimizer"]["state"])


# --- two ranks -----------------------------------------------------------------------------------

def _rank(rank: int, init_file: str, out: str, start: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        env = DistEnv(rank, 2, 0, CPU)
        results = {name: _train_layout(env, rank, kw, start) for name, kw in LAYOUTS.items()}
        results["buffers"] = _synced_buffers(env, rank)
        gc.collect()  # the engines (FSDP's hold reference cycles) go while the process group exists
        dist.barrier()
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _train_layout(env: DistEnv, rank: int, kw: dict, start: dict) -> dict:
    """One layout on this rank's half of every batch: STEPS steps, its state, one more step; the
    single-process state `start` loaded into other weights and one step; one accumulated step."""
    xs, ys = batches()
    rows = slice(rank * ROWS // 2, (rank + 1) * ROWS // 2)
    engine = build_engine(make_net(), env, **kw, **HYPER)
    for i in range(STEPS):
        step(engine, xs[i, rows], ys[i, rows])
    saved = engine.full_state()
    step(engine, xs[STEPS, rows], ys[STEPS, rows])
    resumed = build_engine(make_net(seed=5), env, **kw, **HYPER)  # other weights: the load must set them
    resumed.load_full_state(start)
    step(resumed, xs[STEPS, rows], ys[STEPS, rows])
    accumulating = build_engine(make_net(), env, **kw, **HYPER)
    held = accumulated_step(accumulating, xs[0, rows], ys[0, rows])
    with engine.gathered() as net, torch.no_grad():  # rank 1 runs one forward more than rank 0
        outputs = [net[1](net[0](xs[0])) for _ in range(rank + 1)] + [net(xs[0])]
    return {"layout": engine.layout, "saved": saved, "continued": engine.full_state(),
            "outputs": all_gather_objects(outputs),
            "resumed": resumed.full_state(), "accumulated": accumulating.full_state(),
            "grads": all_gather_objects(held), "other_ranks": all_gather_objects(bool(engine.full_state()))}


def _synced_buffers(env: DistEnv, rank: int) -> dict:
    """Each layout's BatchNorm running mean on every rank after each rank set its own and rank 0's were broadcast."""
    out = {}
    for name, kw in LAYOUTS.items():
        torch.manual_seed(0)
        engine = build_engine(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), env, **kw, **HYPER)
        engine.net[1].running_mean.fill_(rank + 1.0)
        broadcast_buffers(engine.net)  # what evaluation does first, under every layout
        out[name] = all_gather_objects(engine.net[1].running_mean.tolist())
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What 2 ranks saved per layout; they resume from `single(STEPS)`'s state."""
    tmp = tmp_path_factory.mktemp("engine")
    start = single(STEPS).full_state()
    mp.spawn(_rank, args=(str(tmp / "init"), str(tmp / "out.pt"), start), nprocs=2)
    return torch.load(tmp / "out.pt", weights_only=True)


@pytest.mark.parametrize("name", LAYOUTS)
def test_two_ranks_train_as_one_process_on_the_whole_batch(two_ranks, name):
    result = two_ranks[name]
    assert result["layout"] == name
    torch.testing.assert_close(result["continued"]["model"], reference_params(STEPS + 1))


@pytest.mark.parametrize("name", LAYOUTS)
def test_ranks_evaluate_different_numbers_of_batches_in_gathered(two_ranks, name):
    net = make_net()
    net.load_state_dict(reference_params(STEPS + 1))
    with torch.no_grad():
        want = net(batches()[0][0])
    torch.testing.assert_close(two_ranks[name]["outputs"], [[want] * 2, [want] * 3])


@pytest.mark.parametrize("name", LAYOUTS)
def test_full_state_of_two_ranks_is_the_single_process_state(two_ranks, name):
    assert_same_state(two_ranks[name]["saved"], single(STEPS).full_state())
    assert two_ranks[name]["other_ranks"] == [True, False]  # rank 1 gets {}


@pytest.mark.parametrize("name", LAYOUTS)
def test_two_rank_state_resumes_on_one_process_and_one_process_state_on_two_ranks(two_ranks, name):
    continued = single(STEPS + 1).full_state()
    engine = build_engine(make_net(seed=5), ONE, **LAYOUTS[name], **HYPER)
    engine.load_full_state(two_ranks[name]["saved"])
    xs, ys = batches()
    step(engine, xs[STEPS], ys[STEPS])
    assert_same_state(engine.full_state(), continued)
    assert_same_state(two_ranks[name]["resumed"], continued)


@pytest.mark.parametrize("name", LAYOUTS)
def test_micro_steps_under_no_sync_are_one_step_on_the_concatenated_batch(two_ranks, name):
    assert_same_state(two_ranks[name]["accumulated"], single(1).full_state())


@pytest.mark.parametrize("name", LAYOUTS)
def test_no_sync_reduces_nothing_until_the_last_micro_step(two_ranks, name):
    (first0, last0), (first1, last1) = two_ranks[name]["grads"]
    if name == "fsdp":  # the unsharded gradients wait inside FSDP: no shard has one yet
        assert first0 == first1 == [None] * 4 and None not in last0 + last1
    else:  # each rank holds its own sum, then the same mean
        assert not any(torch.allclose(a, b) for a, b in zip(first0, first1))
        torch.testing.assert_close(last0, last1)


@pytest.mark.parametrize("name", LAYOUTS)
def test_broadcast_buffers_gives_every_rank_rank_0s_batchnorm_statistics(two_ranks, name):
    assert two_ranks["buffers"][name] == [[1.0] * 3, [1.0] * 3]


# --- one process ---------------------------------------------------------------------------------

def test_full_state_before_the_first_step_changes_nothing():
    """DCP would create the state with a zero-lr step: momentum buffers of weight_decay * p."""
    engine = single(0)
    assert engine.full_state()["optimizer"]["state"] == {}
    assert not engine.optimizer.state
    xs, ys = batches()
    for i in range(STEPS):
        step(engine, xs[i], ys[i])
    torch.testing.assert_close(engine.full_state()["model"], reference_params(STEPS))


def test_parameters_without_saved_state_have_none_after_a_load():
    """A step where only the first block had gradients: the head has no momentum buffer."""
    engine = single(0)
    engine.net[0](torch.randn(4, 6)).sum().backward()
    engine.optimizer.step()
    saved = engine.full_state()
    assert sorted(saved["optimizer"]["state"]) == [0, 1]
    trained = single(2, make_net(seed=5))  # holds momentum for every parameter before the load
    trained.load_full_state(saved)
    assert sorted(trained.full_state()["optimizer"]["state"]) == [0, 1]
    assert_same_state(trained.full_state(), saved)


def test_stateless_sgd_state_loads():
    """SGD without momentum keeps no state per parameter (DCP alone fails on it)."""
    hyper = {**HYPER, "momentum": 0.0, "nesterov": False}
    saved = single(2, **hyper).full_state()
    assert saved["optimizer"]["state"] == {}
    engine = single(0, make_net(seed=5), **hyper)
    engine.load_full_state(saved)
    assert_same_state(engine.full_state(), saved)


def test_a_plain_sgd_checkpoint_loads_and_keeps_the_running_step_implementation():
    """Checkpoints of before the engine: `optimizer.state_dict()` of SGD(net.parameters())."""
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), **HYPER)
    xs, ys = batches()
    for i in range(STEPS):
        optimizer.zero_grad()
        F.cross_entropy(net(xs[i]), ys[i]).backward()
        optimizer.step()
    saved = {"model": net.state_dict(), "optimizer": optimizer.state_dict()}
    before = {k: v.clone() for k, v in saved["optimizer"]["state"][0].items()}
    engine = single(0, make_net(seed=5))
    engine.load_full_state(saved)
    assert saved["optimizer"]["param_groups"][0]["foreach"] is None
    assert engine.optimizer.param_groups[0]["foreach"] is True
    step(engine, xs[STEPS], ys[STEPS])
    torch.testing.assert_close(engine.full_state()["model"], reference_params(STEPS + 1))
    torch.testing.assert_close(saved["optimizer"]["state"][0], before)  # the loaded tensors were copied


def test_full_state_is_a_copy():
    engine = single(1)
    saved = engine.full_state()
    kept = {k: v.clone() for k, v in saved["model"].items()}
    xs, ys = batches()
    step(engine, xs[1], ys[1])
    torch.testing.assert_close(saved["model"], kept)


def test_a_state_of_another_model_is_refused():
    saved = single(1).full_state()
    other = build_engine(nn.Linear(6, 3), ONE, **HYPER)
    with pytest.raises(RuntimeError):
        other.load_full_state(saved)
    with pytest.raises(ValueError, match="names parameter 3, the optimizer has 2"):
        other.load_full_state({"model": other.net.state_dict(), "optimizer": saved["optimizer"]})


def test_one_process_trains_the_net_itself_whatever_the_engine():
    for kw in LAYOUTS.values():
        engine = build_engine(make_net(), ONE, **kw, **HYPER)
        assert engine.layout == "single" and engine.model is engine.net
        assert isinstance(engine.no_sync(), nullcontext)
        assert type(engine.optimizer) is torch.optim.SGD and engine.optimizer.param_groups[0]["foreach"]


TWO = DistEnv(0, 2, 0, CPU)  # refused before any process group is needed


@pytest.mark.parametrize("env, kw, message", [
    (ONE, {"engine": "horovod"}, "engine='horovod' is not one of ddp, fsdp, deepspeed"),
    (ONE, {"zero": 2}, "config key 'optimizer.zero' must be one of 0, 1 under engine=ddp, got 2"),
    (ONE, {"engine": "fsdp", "zero": 1}, "fsdp already shards it: drop optimizer.zero"),
    (ONE, {"momentum": 0.0}, "nesterov=true needs momentum > 0"),
    (TWO, {"engine": "fsdp", "fused": True}, "aten._fused_sgd_"),
    (ONE, {"cuda_graphs": True}, "set compile=true as well"),
    (ONE, {"cuda_graphs": True, "compile": True}, "cuda_graphs=true needs CUDA"),
])
def test_bad_combinations_are_one_line_config_errors(env, kw, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as e:
        build_engine(make_net(), env, **{**HYPER, **kw})
    assert "\n" not in str(e.value)
