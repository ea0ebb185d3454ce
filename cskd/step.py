"""One training epoch: optimizer steps of the global batch, each made of micro-batches.

A step's per-rank batch (`batch.global / world size` anchors, as the order gives it) is cut into
`grad_accum` micro-batches (`cskd.batch.split_batch`). Each micro-batch's mean loss is weighted by
its share of the rank's batch, so the accumulated gradient is the gradient of the rank's mean loss;
DDP averages it over ranks as without accumulation. Gradients are reduced on the last micro-batch
only (`engine.no_sync()` around the others), as DeepSpeed and DDP's `no_sync` intend. The engine
(`cskd.engine.Engine`) runs the backward and the optimizer step, whichever engine it is.

The learning rate is a function of the optimizer step: the epoch's value from the schedule
(`MultiStepLR`, stepped per epoch) times a linear warmup factor over the first `warmup_epochs`.
Nothing here waits for the device: losses and counts are summed on it and read once per
`log_every` steps.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext

import torch

from cskd import distributed as D
from cskd import rundir
from cskd.batch import split_batch
from cskd.config import Config, resolve_batch
from cskd.errors import NonFiniteLossError
from cskd.loaders import TrainBatches
from cskd.progress import EpochProgress
from cskd.sample_log import SampleRecorder


def peak_lr(cfg: Config) -> float:
    """The LR of the first epoch after warmup: `lr`, or `lr x global / 256` with lr_scaling=linear."""
    return cfg.lr * cfg.batch.global_ / 256 if cfg.lr_scaling == "linear" else cfg.lr


def warmup_factor(cfg: Config, epoch: int, step: int, steps_per_epoch: int) -> float:
    """The multiplier of the scheduled LR at (epoch, step): rises linearly over `warmup_epochs`.

    With linear scaling it starts from the unscaled `lr` (Goyal et al. 2017, sec. 2.2: from eta to
    k eta in 5 epochs); otherwise from 1/(warmup steps), reaching 1 at the end of the warmup."""
    total = cfg.warmup_epochs * steps_per_epoch
    done = epoch * steps_per_epoch + step + 1
    if done >= total:
        return 1.0
    start = min(1.0, cfg.lr / peak_lr(cfg)) if cfg.lr_scaling == "linear" else 0.0
    return start + (1.0 - start) * done / total


def autocast_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The dtype the training forward autocasts to: bf16 on CUDA when `amp`; None (no autocast) on CPU."""
    return torch.bfloat16 if cfg.amp and device.type == "cuda" else None


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast on CUDA when `amp` (BatchNorm stays float32 under autocast); nothing on CPU."""
    dtype = autocast_dtype(cfg, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def train_one_epoch(engine, method, loader: TrainBatches, epoch: int, cfg: Config, env: D.DistEnv,
                    samples: SampleRecorder) -> dict:
    """One pass over the training order with `engine` (`cskd.engine.Engine`: model, backward, step,
    no_sync, and the optimizer whose LR the warmup sets); returns loss/error/throughput averaged over
    all ranks. `samples` records each sample's correctness (and probabilities) from the step's logits."""
    engine.model.train()
    device, optimizer = env.device, engine.optimizer
    _, _, accum = resolve_batch(cfg.batch, env.world_size)
    epoch_lrs = [group["lr"] for group in optimizer.param_groups]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    term_sums: dict[str, torch.Tensor] = {}
    seen = 0
    progress = EpochProgress(env.is_main, epoch, cfg.epochs, len(loader), cfg.log_every)
    start = time.perf_counter()
    try:
        for batch in loader.epoch(epoch):
            if epoch < cfg.warmup_epochs:
                factor = warmup_factor(cfg, epoch, batch.step, len(loader))
                for group, lr in zip(optimizer.param_groups, epoch_lrs):
                    group["lr"] = lr * factor
            n = len(batch.labels)
            micro = split_batch(batch, accum)
            for i, part in enumerate(micro):
                with engine.no_sync() if i < len(micro) - 1 else nullcontext():
                    with autocast(cfg, device):
                        out = method.loss(engine.model, part)
                    engine.backward(out.loss * (len(part.labels) / n))
                k = len(part.labels)
                loss_sum += out.loss.detach().double() * k  # on the device: no host sync per step
                right = out.logits.detach().argmax(1) == part.labels
                correct += right.sum()
                samples.observe(part.index, right, out.logits, part.labels)
                for name, value in out.terms.items():
                    term_sums[name] = term_sums.get(name, 0) + value.double() * k
            engine.step()
            seen += n
            note = None
            if (batch.step + 1) % cfg.log_every == 0 or batch.step + 1 == len(loader):
                _check_finite(loss_sum, epoch, batch.step, cfg)
                if batch.step + 1 < len(loader):  # the epoch line follows the last step anyway
                    note = f"loss {loss_sum.item() / seen:.4f}"
            progress.update(batch.step, seen * env.world_size, note)
    finally:
        progress.close()
        for group, lr in zip(optimizer.param_groups, epoch_lrs):  # the schedule multiplies the epoch's LR
            group["lr"] = lr
    elapsed = time.perf_counter() - start
    totals = D.all_reduce_sum(torch.stack([loss_sum, correct.double(), torch.tensor(float(seen), device=device),
                                           *[term_sums[k] for k in sorted(term_sums)]]))
    total_seen = totals[2].item()
    stats = {"loss": totals[0].item() / total_seen, "top1_err": 100.0 * (1 - totals[1].item() / total_seen),
             "images": int(total_seen), "time_s": elapsed, "images_per_s": total_seen / elapsed}
    stats |= {name: totals[3 + i].item() / total_seen for i, name in enumerate(sorted(term_sums))}
    return stats


def _check_finite(loss_sum: torch.Tensor, epoch: int, step: int, cfg: Config) -> None:
    """Stop on a NaN/Inf loss, agreed by all ranks so none is left waiting in a collective."""
    bad = D.all_reduce_sum((~torch.isfinite(loss_sum)).double())
    if bad.item() > 0:
        raise NonFiniteLossError(
            f"training loss became non-finite in epoch {epoch} (by step {step}); the last good checkpoint "
            f"is kept in {os.path.join(cfg.out_dir, rundir.CHECKPOINT)} (if any epoch finished); lower lr "
            f"(now {cfg.lr}) or check the data, then re-run with --force")
