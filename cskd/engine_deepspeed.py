"""engine=deepspeed: the DeepSpeed engine (ZeRO stage 0, 1 or 2) behind `cskd.engine.Engine`, an
optional extra (`pip install '.[deepspeed]'`).

`deepspeed_config` writes DeepSpeed's config from the run's settings
(https://www.deepspeed.ai/docs/config-json/). `build_deepspeed` hands DeepSpeed the model and the
run's torch SGD inside the process group `cskd.distributed` started (torchrun launches the ranks, not
the `deepspeed` launcher; `deepspeed.comm` wraps that group), and the rest of the run stays as under
the other engines:

- The LR: `MultiStepLR` (stepped per epoch by the trainer) and the warmup set the SGD's
  param_groups, which ZeRO steps; DeepSpeed is given no scheduler.
- Accumulation: the training step cuts, weights and counts the micro-batches itself. `no_sync()`
  marks a micro-batch as not the last (`set_gradient_accumulation_boundary(False)`: no reduction
  under stages 0 and 1, no optimizer step), and `backward` does not divide the loss by
  gradient_accumulation_steps (`scale_wrt_gas=False`): it is already weighted by the micro-batch's
  share of the rank's batch, which also holds for a short last step. DeepSpeed's own `no_sync()`
  refuses stage 2, the boundary works under every stage
  (https://deepspeed.readthedocs.io/en/latest/training.html, `set_gradient_accumulation_boundary`).
- The checkpoint: `full_state()` is the single-process SGD layout every engine writes, so a
  DeepSpeed run resumes under ddp or fsdp and the other way round, on any world size. DeepSpeed's
  own checkpoints (`save_checkpoint`, files per rank) are not used.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import set_model_state_dict

from cskd.config import DEEPSPEED_MISSING
from cskd.distributed import DistEnv
from cskd.engine import _SCATTER, Engine
from cskd.errors import ConfigError

MOMENTUM = "momentum_buffer"  # torch SGD's one state per parameter
# ZeRO's gradient bucket, in elements: DDP's 25 MiB of fp32. DeepSpeed's default, 5e8 elements
# (2 GB of fp32), is allocated anew at every backward under stages 1 and 2 (contiguous_gradients);
# with deterministic=true torch fills each new tensor with NaN, which measured 0.85 s per backward
# on a CPU (and a training run 25 times slower than DDP's).
BUCKET_ELEMENTS = 25 * 2**20 // 4


def deepspeed_config(batch: tuple[int, int, int], zero: int, autocast: torch.dtype | None = None) -> dict:
    """DeepSpeed's config for `batch` = (global, micro_per_rank, grad_accum) (`resolve_batch`), ZeRO
    stage `zero` and the training forward's autocast dtype (`cskd.step.autocast_dtype`; None: none)."""
    global_, micro, accum = batch
    config = {
        "train_batch_size": global_,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": zero, "reduce_bucket_size": BUCKET_ELEMENTS,
                              "allgather_bucket_size": BUCKET_ELEMENTS},
        # torch.optim.SGD is not on DeepSpeed's list of ZeRO-tested optimizers: without this key,
        # stages 1 and 2 stop with "You are using an untested ZeRO Optimizer" (an AssertionError;
        # https://github.com/deepspeedai/DeepSpeed/pull/173). SGD's state, one momentum buffer per
        # parameter, is elementwise: ZeRO partitions it exactly.
        "zero_allow_untested_optimizer": True,
        # DeepSpeed clips the gradient norm at 1.0 unless told otherwise (its default since
        # https://github.com/deepspeedai/DeepSpeed/pull/8068; 0 before): the recipes do not clip.
        "gradient_clipping": 0.0,
    }
    if autocast is not None:
        # Without this section DeepSpeed's forward turns an outer CUDA autocast off, with one warning,
        # and the model runs in fp32 (deepspeed/runtime/torch_autocast.py `autocast_if_enabled`,
        # https://github.com/deepspeedai/DeepSpeed/pull/7543). DeepSpeed's "bf16" mode is not the
        # same thing: it casts the whole model, BatchNorm's weights and statistics included, to bf16;
        # under autocast the parameters stay fp32 and BatchNorm keeps fp32 statistics.
        # lower_precision_safe_modules=[]: gradients are reduced in fp32, as DDP reduces them
        # (DeepSpeed's default list reduces Linear and Conv gradients in the autocast dtype,
        # https://github.com/deepspeedai/DeepSpeed/pull/6993).
        config["torch_autocast"] = {"enabled": True, "dtype": str(autocast).removeprefix("torch."),
                                    "lower_precision_safe_modules": []}
    return config


@dataclass
class DeepSpeedEngine(Engine):
    """`Engine` over a `deepspeed.DeepSpeedEngine` (`model`). `optimizer` is the run's torch SGD, which
    DeepSpeed steps: under ZeRO its parameter is this rank's flat fp32 partition."""

    _ds: Any = field(default=None, repr=False)  # the deepspeed.DeepSpeedEngine
    _zero: int = 0  # the ZeRO stage

    def backward(self, loss: torch.Tensor) -> None:
        # scale_wrt_gas=False: the step weighted the loss by the micro-batch's share already.
        self._ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        # Outside no_sync() the boundary is set: DeepSpeed reduces (stages 0, 1), steps the SGD, and
        # drops the gradients.
        self._ds.step()

    @contextmanager
    def no_sync(self):
        self._ds.set_gradient_accumulation_boundary(False)
        try:
            yield
        finally:
            self._ds.set_gradient_accumulation_boundary(True)

    # --- full state: stage 0 is our SGD over the model's own parameters (the base class's DCP
    # path); ZeRO keeps SGD's state in flat per-rank partitions, read and written per parameter
    # through DeepSpeed's documented accessors
    # (https://deepspeed.readthedocs.io/en/latest/zero3.html, safe_get/safe_set_full_optimizer_state).

    def _full_optimizer_state(self) -> dict:
        if not self._zero:
            return super()._full_optimizer_state()
        from deepspeed.utils import safe_get_full_optimizer_state

        state = {}
        if self._has_momentum():
            for i, p in enumerate(self.net.parameters()):
                # Collective: an all-reduce of each rank's fragment (the others add zeros: exact).
                momentum = safe_get_full_optimizer_state(p, MOMENTUM)
                if self.env.is_main:
                    state[i] = {MOMENTUM: momentum.cpu()}
        if not self.env.is_main:
            return {}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(range(len(self._names)))}
                  for g in self.optimizer.param_groups]
        return {"state": state, "param_groups": groups}

    def load_full_state(self, state: dict) -> None:
        if not self._zero:
            super().load_full_state(state)
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        set_model_state_dict(self.net, state["model"], options=_SCATTER)
        # ZeRO steps an fp32 copy of this rank's partition (a copy even of an fp32 model): it must
        # take the loaded weights too, or the next step would write the old ones back.
        self._ds.optimizer.refresh_fp32_params()
        saved = self._fit_optimizer_state(state["optimizer"])
        self._check_ids(saved)
        for live, group in zip(self.optimizer.param_groups, saved["param_groups"]):
            live.update({k: v for k, v in group.items() if k != "params"})
        if not saved["state"]:  # no momentum saved (before the first step, or momentum=0): none here
            self._reset_momentum(create=False)
            return
        if not self._has_momentum():
            self._reset_momentum(create=True)
        for i, p in enumerate(self.net.parameters()):
            # A parameter without saved state gets a zero buffer: with SGD's dampening 0, the next
            # step makes it the gradient, as a missing buffer would be.
            value = saved["state"][i][MOMENTUM] if i in saved["state"] else torch.zeros_like(p)
            safe_set_full_optimizer_state(p, value, MOMENTUM)

    def _has_momentum(self) -> bool:
        return any(MOMENTUM in s for s in self.optimizer.state.values())

    def _reset_momentum(self, create: bool) -> None:
        """Drop the SGD's state; with `create`, zero momentum buffers over the flat partitions. ZeRO
        links each parameter to its fragment of the buffers after its first step
        (`_lazy_init_hp_params_optimizer_state`, which safe_set_full_optimizer_state needs): done
        here for new buffers, left to the next step otherwise."""
        zero = self._ds.optimizer
        self.optimizer.state.clear()
        zero._hp_optimizer_states_linked = False
        if create:
            for flat in (p for g in self.optimizer.param_groups for p in g["params"]):
                self.optimizer.state[flat][MOMENTUM] = torch.zeros_like(flat)
            zero._lazy_init_hp_params_optimizer_state()


def build_deepspeed(net: nn.Module, env: DistEnv, *, zero: int, sgd: dict, batch: tuple[int, int, int] | None,
                    autocast: torch.dtype | None) -> DeepSpeedEngine:
    """`net` under DeepSpeed with ZeRO stage `zero` and `torch.optim.SGD(net.parameters(), **sgd)`.

    `batch`: (global, micro_per_rank, grad_accum) for DeepSpeed's config. It only counts samples for
    DeepSpeed's logs: the step sets the accumulation boundaries and weights the loss itself. None
    states one micro-batch per rank, (world size, 1, 1)."""
    deepspeed = _import_deepspeed()
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator().device_name()
    if accelerator != env.device.type:  # DeepSpeed would move the model to its accelerator
        raise ConfigError(f"DeepSpeed chose the accelerator {accelerator!r} but the run is on {env.device.type}: set "
                          f"the environment variable DS_ACCELERATOR={env.device.type} (DeepSpeed picks its "
                          f"accelerator itself), or device={accelerator}")
    # DeepSpeed reads the local rank from LOCAL_RANK, which torchrun sets and a bare srun does not.
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    names = [name for name, _ in net.named_parameters()]  # before ZeRO makes them views of flat buffers
    optimizer = torch.optim.SGD(net.parameters(), **sgd)
    config = deepspeed_config(batch or (env.world_size, 1, 1), zero, autocast)
    # DeepSpeed takes the device LOCAL_RANK names unless told: the run's own (a GPU shared by runs).
    args = SimpleNamespace(device_rank=env.device.index) if env.device.type == "cuda" else None
    ds, *_ = deepspeed.initialize(args=args, model=net, optimizer=optimizer, config=config, dist_init_required=False)
    ds.set_gradient_accumulation_boundary(True)  # every backward is the last of its step unless no_sync says not
    return DeepSpeedEngine(net, ds, optimizer, env, f"deepspeed+zero{zero}", _names=names, _ds=ds, _zero=zero)


def _import_deepspeed():
    try:
        import deepspeed
    except ModuleNotFoundError as e:
        if e.name == "deepspeed":
            raise ConfigError(DEEPSPEED_MISSING) from None
        raise ConfigError(f"DeepSpeed is installed but cannot be imported ({e}); reinstall it: pip install "
                          f"'.[deepspeed]'") from None
    except ImportError as e:
        raise ConfigError(f"DeepSpeed is installed but cannot be imported ({str(e).splitlines()[0]}); reinstall "
                          f"it: pip install '.[deepspeed]'") from None
    return deepspeed
