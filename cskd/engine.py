"""The training engine of a run: how the model is spread over processes, its SGD optimizer, and a
full state that does not depend on either.

`build_engine(net, env, engine=..., zero=..., ...)` takes the built model (on its device) and returns
an `Engine`:

- engine=ddp (default): DistributedDataParallel over several processes, the bare model on one;
  optimizer.zero=1 shards the SGD state over the ranks (ZeroRedundancyOptimizer).
- engine=fsdp: FSDP2 `fully_shard` on each top-level block of the model, then on the model:
  parameters, gradients and SGD state sharded. It runs on CPU with gloo as well as on CUDA.
- engine=deepspeed: the DeepSpeed engine with ZeRO stage `zero` (0, 1 or 2), an optional extra
  (`cskd.engine_deepspeed`).

A training step calls `model(x)`, `backward(loss)` for each micro-batch (all but the last under
`no_sync()`), then `step()`: every engine implements them, so the step does not know which one runs.

A checkpoint must resume under any engine and any world size, so `Engine.full_state()` is the same
dict everywhere: the model's full `state_dict()` and the optimizer state dict exactly as a
single-process `torch.optim.SGD(net.parameters())` writes it (parameter ids 0..n-1), on the CPU.
Checkpoints written before this module existed (plain `optimizer.state_dict()`) load unchanged.

The full state goes through torch.distributed.checkpoint.state_dict (DCP), which handles the bare
model, the model under DDP and FSDP2's sharded DTensors alike; ZeroRedundancyOptimizer is the one
exception (DCP calls its `state_dict()`, which needs `consolidate_state_dict` first).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel
from torch.utils._pytree import tree_map_only

from cskd.config import check_engine_choice
from cskd.distributed import DistEnv
from cskd.errors import ConfigError

ENGINES = ("ddp", "fsdp", "deepspeed")
# Gathered onto rank 0 and copied to the CPU; the other ranks get {} (what a checkpoint writes).
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Every rank passes the full state; each keeps what it holds (its shard under FSDP).
_SCATTER = StateDictOptions(full_state_dict=True)
# Optimizer state may leave parameters out (those that never had a gradient hold no momentum).
_SCATTER_PARTIAL = StateDictOptions(full_state_dict=True, strict=False)
# How a step is computed, not what: a loaded state keeps the running optimizer's choice.
_STEP_IMPLEMENTATION = ("foreach", "fused", "differentiable", "capturable")
_DDP_OPTIONS = inspect.signature(DistributedDataParallel.__init__).parameters


@dataclass
class Engine:
    """A built model ready to train: `model(x)` in the training step, `backward(loss)` on each
    micro-batch, `step()` after the last."""

    net: nn.Module  # the model itself: evaluated, exported (under fsdp, the fully_shard'ed module)
    model: nn.Module  # what a training step calls: the DDP or DeepSpeed wrapper, or `net`; compiled if asked
    optimizer: torch.optim.Optimizer  # SGD: its param_groups hold the LR the schedule and warmup set
    env: DistEnv
    layout: str  # what runs, for logs: "single", "ddp", "ddp+zero1", "fsdp" or "deepspeed+zeroN"
    _ddp: DistributedDataParallel | None = field(default=None, repr=False)
    _names: list[str] = field(default_factory=list, repr=False)  # the name of optimizer parameter i

    def backward(self, loss: torch.Tensor) -> None:
        """Add the gradient of `loss` (a micro-batch's share of the step's loss) to the gradients."""
        loss.backward()

    def step(self) -> None:
        """The optimizer step on the accumulated gradients, then the gradients dropped."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def no_sync(self):
        """Context manager for the micro-steps of gradient accumulation but the last: backward adds
        to the local gradients without reducing them over ranks; the backward after it reduces
        the sum. A no-op on one process."""
        if self._ddp is not None:
            return self._ddp.no_sync()
        if self.layout == "fsdp":
            return _fsdp_no_sync(self.net)
        return nullcontext()

    @contextmanager
    def gathered(self):
        """Context manager: every rank holds the whole of `net` inside it, so ranks may run different
        numbers of forwards (evaluation of unequal shards) with no collective. Under FSDP2 each
        unit's forward all-gathers its parameters, a collective every rank must join: a rank with one
        batch more would wait forever. Entering is collective (one all-gather per unit); a no-op
        under ddp and on one process, where every rank holds the whole model anyway."""
        units = [m for m in self.net.modules() if isinstance(m, FSDPModule)] if self.layout == "fsdp" else []
        for unit in units:
            unit.unshard()
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield self.net
        finally:
            for unit in units:
                unit.reshard()
                # FSDP2's defaults: blocks free their parameters after forward, the root keeps its own.
                unit.set_reshard_after_forward(unit is not self.net, recurse=False)

    def full_state(self, with_optimizer: bool = True) -> dict:
        """{"model": full state_dict, "optimizer": single-process SGD state dict}, on the CPU, equal
        (within float rounding) on any world size and engine. Collective: every rank calls it; rank 0
        gets the state, the others {}. The tensors are copies: later steps do not change them.
        `with_optimizer=False`: the model alone (best.pt of an epoch that is not checkpointed)."""
        state = {"model": get_model_state_dict(self.net, options=_GATHER)}
        if with_optimizer:
            state["optimizer"] = self._full_optimizer_state()
        if not self.env.is_main:
            return {}
        if self.env.device.type == "cuda":  # copies to the CPU may be non_blocking (ZeRO's are): let them land
            torch.cuda.synchronize(self.env.device)
        # On the CPU, state dicts hold the live tensors themselves (DCP's cpu_offload moves nothing).
        return _copied(state, self.env.device.type == "cpu")

    def load_full_state(self, state: dict) -> None:
        """Load a `full_state()` (from any world size and engine, on the CPU) on every rank: each
        rank passes the whole state and keeps its part. Keeps no reference to `state`'s tensors.
        A state that does not fit the model raises RuntimeError (model) or ValueError (optimizer)."""
        set_model_state_dict(self.net, state["model"], options=_SCATTER)
        saved = self._fit_optimizer_state(state["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)  # DCP skips its state set-up when gradients exist
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            self.optimizer.load_state_dict(saved)  # takes the global (SGD) layout, keeps its own shard
            self._drop_unsaved(saved)
        elif not saved["state"]:
            # Nothing per parameter (before the first step, or SGD without momentum): DCP fails on
            # it ("Expected device to be set", it looks for a state tensor), the plain load does not.
            self.optimizer.load_state_dict(saved)
        else:
            set_optimizer_state_dict(self.net, self.optimizer, self._by_name(saved), options=_SCATTER_PARTIAL)
            self._drop_unsaved(saved)

    # --- the optimizer state in single-process SGD layout ---------------------------------------

    def _full_optimizer_state(self) -> dict:
        """Collective: the optimizer's state in single-process SGD layout on rank 0, {} elsewhere."""
        return self._zero_state() if isinstance(self.optimizer, ZeroRedundancyOptimizer) else self._sgd_state()

    def _sgd_state(self) -> dict:
        if not self.optimizer.state:
            # Nothing to gather. DCP would first create the state with a zero-lr step, which fills
            # SGD's momentum buffers with weight_decay * p and so changes the next real step
            # (torch/distributed/checkpoint/state_dict.py `_init_optim_state`, pytorch#164929).
            return self.optimizer.state_dict()
        gathered = get_optimizer_state_dict(self.net, self.optimizer, options=_GATHER)
        return self._by_index(gathered) if self.env.is_main else {}

    def _zero_state(self) -> dict:
        self.optimizer.consolidate_state_dict(to=0)  # collective: every rank's shard to rank 0
        if not self.env.is_main:
            return {}
        state = self.optimizer.state_dict()  # indexed over all parameters, as SGD(net.parameters()) is
        self.optimizer._all_state_dicts = []  # drop rank 0's consolidated copy until the next checkpoint
        return state

    def _by_index(self, named: dict) -> dict:
        """DCP's optimizer state (keyed by parameter name) in `optimizer.state_dict()`'s layout."""
        index = {name: i for i, name in enumerate(self._names)}
        return {"state": {index[name]: s for name, s in sorted(named["state"].items(), key=lambda kv: index[kv[0]])},
                "param_groups": [{**g, "params": [index[name] for name in g["params"]]}
                                 for g in named["param_groups"]]}

    def _by_name(self, saved: dict) -> dict:
        """A state in `optimizer.state_dict()`'s layout, keyed by parameter name as DCP takes it."""
        self._check_ids(saved)
        return {"state": {self._names[i]: s for i, s in saved["state"].items()},
                "param_groups": [{**g, "params": [self._names[i] for i in g["params"]]} for g in saved["param_groups"]]}

    def _check_ids(self, saved: dict) -> None:
        """ValueError unless `saved` names parameters of this optimizer only."""
        ids = {i for g in saved["param_groups"] for i in g["params"]} | set(saved["state"])
        if not ids <= set(range(len(self._names))):
            raise ValueError(f"loaded optimizer state names parameter {max(ids)}, the optimizer has "
                             f"{len(self._names)} parameters (0..{len(self._names) - 1})")

    def _fit_optimizer_state(self, saved: dict) -> dict:
        """A copy of `saved` with this optimizer's step implementation (a CUDA run's fused=True
        resumes on the CPU with foreach) and its own tensors (optimizers keep CPU tensors they load,
        and ZeRO overwrites the entries of other ranks' parameters)."""
        live = self.optimizer.param_groups
        if len(saved["param_groups"]) != len(live):
            raise ValueError(f"loaded optimizer state has {len(saved['param_groups'])} parameter groups, the "
                             f"optimizer {len(live)}")
        groups = [{**g, **{k: own[k] for k in _STEP_IMPLEMENTATION if k in own}}
                  for g, own in zip(saved["param_groups"], live)]
        return {"state": _copied(dict(saved["state"]), True), "param_groups": groups}

    def _drop_unsaved(self, saved: dict) -> None:
        """A parameter without saved state (no gradient yet) must have none after the load. DCP and
        ZeRO load into the state they find, which DCP first creates for every parameter (its
        zero-lr step) and which an engine that trained before holds."""
        states = [self.optimizer.state]
        if isinstance(self.optimizer, ZeroRedundancyOptimizer):
            states.append(self.optimizer.optim.state)  # the local optimizer over this rank's shard
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        for i, p in enumerate(params):
            if i not in saved["state"]:
                for state in states:
                    state.pop(p, None)


@contextmanager
def _fsdp_no_sync(net: nn.Module):
    """FSDP2's counterpart of DDP's no_sync: gradients accumulate unsharded, unreduced."""
    net.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        net.set_requires_gradient_sync(True)


def _copied(tree, copy: bool):
    """`tree` with every tensor detached, and cloned if `copy`."""
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone() if copy else t.detach(), tree)


# --- building ------------------------------------------------------------------------------------

def build_engine(net: nn.Module, env: DistEnv, *, engine: str = "ddp", zero: int = 0, lr: float, momentum: float,
                 weight_decay: float, nesterov: bool = False, fused: bool | None = None, compile: bool = False,
                 cuda_graphs: bool = False, batch: tuple[int, int, int] | None = None,
                 autocast: torch.dtype | None = None) -> Engine:
    """Wrap `net` (built identically on every rank, on `env.device`) for `engine` and make its SGD.

    One process has nothing to split: it trains `net` itself, whatever `engine` and `zero` say (its
    state is the same). `fused`: None takes the fused SGD step on CUDA (one kernel for all
    parameters) and the foreach step otherwise. `compile`: torch.compile the training call
    (`model`), with CUDA graphs (mode reduce-overhead) if `cuda_graphs`; `net` stays eager.
    `batch` (global, micro_per_rank, grad_accum) and `autocast` (the dtype the training step's
    forward autocasts to, `cskd.step.autocast_dtype`) are what engine=deepspeed's config states;
    the other engines need neither."""
    _check(env, engine, zero, momentum, nesterov, fused, compile, cuda_graphs)
    ddp = None
    if not env.distributed:
        layout = "single"
    elif engine == "deepspeed":
        layout = "deepspeed"
    elif engine == "fsdp":
        layout = "fsdp"
        _shard(net, env)
    else:
        layout = "ddp+zero1" if zero else "ddp"
        ddp = _wrap_ddp(net, env)
    hyper = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                 **_step_kernel(env, layout, fused))
    if layout == "deepspeed":
        from cskd.engine_deepspeed import build_deepspeed  # imports DeepSpeed: only when it runs

        return build_deepspeed(net, env, zero=zero, sgd=hyper, batch=batch, autocast=autocast)
    if layout == "ddp+zero1":
        optimizer = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.SGD, **hyper)
    else:
        optimizer = torch.optim.SGD(net.parameters(), **hyper)
    model = ddp if ddp is not None else net
    if compile:
        # DDP is compiled around (not inside): TorchDynamo's DDPOptimizer then splits the graph at
        # DDP's bucket boundaries so the all-reduce still overlaps backward (torch docs, "DDP notes").
        model = torch.compile(model, mode="reduce-overhead" if cuda_graphs else None)
    names = {p: name for name, p in net.named_parameters()}
    ordered = [names[p] for g in optimizer.param_groups for p in g["params"]]
    return Engine(net, model, optimizer, env, layout, ddp, _names=ordered)


def _check(env: DistEnv, engine: str, zero: int, momentum: float, nesterov: bool, fused: bool | None,
           compile: bool, cuda_graphs: bool) -> None:
    """Every combination that cannot run, as one line naming the key and the fix."""
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r} is not one of {', '.join(ENGINES)}: set engine=ddp "
                          f"(DistributedDataParallel), engine=fsdp (FSDP2, parameters sharded) or engine=deepspeed")
    check_engine_choice(engine, zero, compile, cuda_graphs)
    if nesterov and momentum <= 0:
        raise ConfigError(f"nesterov=true needs momentum > 0 (Nesterov's step is a momentum step), got "
                          f"momentum={momentum}: set momentum (e.g. 0.9) or nesterov=false")
    if fused and engine == "fsdp" and env.distributed:
        # NotImplementedError: Operator aten._fused_sgd_.default does not have a sharding strategy
        # registered (torch 2.14 registers DTensor rules for the fused Adam/AdamW ops only).
        raise ConfigError("fused SGD cannot step FSDP2's sharded parameters (torch has no DTensor rule for "
                          "aten._fused_sgd_): leave fused unset under engine=fsdp (foreach step)")
    if cuda_graphs and env.device.type != "cuda":
        raise ConfigError(f"cuda_graphs=true needs CUDA, the run is on {env.device.type}: set cuda_graphs=false")
    if cuda_graphs and env.distributed:
        raise ConfigError(f"cuda_graphs=true is for a run on one GPU, this one has {env.world_size} processes: "
                          f"set cuda_graphs=false (compile=true alone still compiles)")


def _step_kernel(env: DistEnv, layout: str, fused: bool | None) -> dict:
    """fused: the whole SGD step in one kernel (CUDA); foreach: a few batched kernels. FSDP2's
    sharded DTensor parameters take foreach only (see `_check`). Under DeepSpeed's ZeRO the SGD
    steps this rank's flat fp32 partition: one tensor, either way."""
    if fused is None:
        fused = env.device.type == "cuda" and layout != "fsdp"
    return {"fused": True} if fused else {"foreach": True}


def _wrap_ddp(net: nn.Module, env: DistEnv) -> DistributedDataParallel:
    """DDP with its gradients in the all-reduce buckets themselves.

    gradient_as_bucket_view=True: `param.grad` is a view into DDP's bucket, so no second copy of
    the gradients is kept. With zero_grad(set_to_none=True) the view is dropped every step, and
    each parameter's gradient is copied into its bucket one kernel at a time; batched_grad_copy
    defers those copies to one `_foreach_copy_` and one division per bucket (DDP docs; passed only
    to a DDP that has it, as torch 2.14's does). bucket_cap_mb keeps its default (25 MiB, a small
    first bucket): these models fill a few buckets, and nothing measured here argues for another
    size. Buffers keep DDP's default sync
    from rank 0 at each forward (`forward_sync_buffers`; `broadcast_buffers` is deprecated since
    torch 2.13 and warns)."""
    options = dict(device_ids=[env.device] if env.device.type == "cuda" else None, gradient_as_bucket_view=True,
                   static_graph=False)
    if "batched_grad_copy" in _DDP_OPTIONS:
        options["batched_grad_copy"] = True
    return DistributedDataParallel(net, **options)


def _shard(net: nn.Module, env: DistEnv) -> None:
    """FSDP2 in place: each block becomes one unit (all-gathered and reduce-scattered together),
    then the root takes the rest (fully_shard is applied bottom-up; calling it on the root alone
    would gather the whole model at once: FSDP2 docs).

    A unit's parameters are gathered by a hook on its `forward`, so a unit must be a module that is
    *called*. Models iterate their containers (`for stage in self.body: x = stage(x)`), which calls
    the items but never the container: containers (Sequential, ModuleList, ModuleDict) are opened and
    their items sharded instead."""
    # FSDP2 shards each rank's own copy: unlike DDP it does not start from rank 0's weights.
    for tensor in [*net.parameters(), *net.buffers()]:
        dist.broadcast(tensor.data, 0)
    mesh = init_device_mesh(env.device.type, (env.world_size,))
    for block in _blocks(net):
        fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)


def _blocks(module: nn.Module):
    """The called sub-modules with trainable parameters one level below `module`, looking through containers."""
    for child in module.children():
        if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
            yield from _blocks(child)
        elif any(p.requires_grad for p in child.parameters()):
            yield child
