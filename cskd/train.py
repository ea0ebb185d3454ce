"""Train and evaluate one run: `python -m cskd.train --config FILE.yaml [key=value ...]`.

The same code path serves a single process and `torchrun --nproc_per_node=N -m cskd.train ...`.
`setup` builds (or restores) the run; `train_loop` trains every remaining epoch, evaluates it on
the test split (`cskd.eval.evaluate`: sharded over ranks, gathered exactly) and has rank 0 append
a line to metrics.jsonl and write checkpoint.pt (and best.pt when the best improves) atomically;
`finish` writes summary.json and reliability.png. The files are those of `cskd.rundir`.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cskd import checkpoint as ckpt
from cskd import distributed as D
from cskd import rundir
from cskd.batch import Shard
from cskd.checkpoint import Progress
from cskd.config import Config, load_config, to_dict
from cskd.dataset import DatasetInfo, open_dataset
from cskd.errors import ConfigError, CskdError, NonFiniteLossError, RunDirError
from cskd.eval import evaluate
from cskd.loaders import EvalBatches, TrainBatches, eval_loader, loader_spec, train_loader
from cskd.methods import METHODS, Method, MethodContext
from cskd.models import build_model
from cskd.plots import reliability_diagram
from cskd.progress import EpochProgress, log


def lr_milestones(epochs: int, schedule: str, milestones: list[int] = ()) -> list[int]:
    """Epoch indices from which the LR is divided by 10 (once per milestone)."""
    if schedule == "milestones":
        return list(milestones)
    half, three_quarters = math.ceil(epochs / 2), math.ceil(3 * epochs / 4)
    if schedule == "step_reference":  # adjust_learning_rate(epoch) runs after the epoch: one late
        return [half + 1, three_quarters + 1]
    return [half, three_quarters]


def autocast(cfg: Config, device: torch.device):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_one_epoch(model, method, loader: TrainBatches, optimizer, epoch: int, cfg: Config, env: D.DistEnv) -> dict:
    """One pass over the training order; returns loss/error/throughput averaged over all ranks."""
    model.train()
    device = env.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    term_sums: dict[str, torch.Tensor] = {}
    seen = 0
    progress = EpochProgress(env.is_main, epoch, cfg.epochs, len(loader), cfg.log_every)
    start = time.perf_counter()
    try:
        for batch in loader.epoch(epoch):
            with autocast(cfg, device):
                out = method.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
            n = len(batch.labels)
            seen += n
            # Accumulate on the device: no host sync per step.
            loss_sum += out.loss.detach().double() * n
            correct += (out.logits.detach().argmax(1) == batch.labels).sum()
            for name, value in out.terms.items():
                term_sums[name] = term_sums.get(name, 0) + value.double() * n
            note = None
            if (batch.step + 1) % cfg.log_every == 0 or batch.step + 1 == len(loader):
                _check_finite(loss_sum, epoch, batch.step, cfg)
                if batch.step + 1 < len(loader):  # the epoch line follows the last step anyway
                    note = f"loss {loss_sum.item() / seen:.4f}"
            progress.update(batch.step, seen * env.world_size, note)
    finally:
        progress.close()
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


@dataclass
class Run:
    """What one training run works with: built by `setup`, used by `train_loop` and `finish`."""

    cfg: Config
    env: D.DistEnv
    dataset: DatasetInfo
    method: Method
    net: nn.Module  # the model itself: what is saved and evaluated
    model: nn.Module  # what a training step calls: `net`, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: TrainBatches
    test_loader: EvalBatches
    progress: Progress


def _main_rank_decides(env: D.DistEnv, decide):
    """`decide()` runs on rank 0 only; every rank returns its result or raises its CskdError, so no
    rank is left waiting in a collective for a rank that gave up."""
    outcome = None
    if env.is_main:
        try:
            outcome = ("ok", decide())
        except CskdError as e:
            outcome = ("error", e)
    kind, value = D.broadcast_object(outcome)
    if kind == "error":
        raise value
    return value


def _warn_unsynced_batchnorm(cfg: Config, env: D.DistEnv, net: nn.Module) -> None:
    if (env.is_main and env.distributed and not cfg.sync_bn
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())):
        log(f"warning: BatchNorm normalises each rank's {cfg.batch_size // env.world_size} anchors (and CS-KD's "
            f"partners) on their own, not the {cfg.batch_size} of the single-GPU reference; the statistics, and "
            f"CS-KD's partner targets, differ from it. sync_bn=true (CUDA) normalises over all ranks")


def _restore(run: Run) -> Progress:
    """Load the run dir's checkpoint into the run's objects; return the saved progress."""
    cfg, env = run.cfg, run.env
    path = os.path.join(cfg.out_dir, rundir.CHECKPOINT)
    saved = ckpt.load(path)
    rundir.check_same_data(cfg.out_dir, saved.get("data_sha256"), run.dataset.sha256())
    try:
        run.net.load_state_dict(saved["model"])
    except (RuntimeError, KeyError) as e:  # config.yaml says the same model, so the checkpoint is foreign
        raise RunDirError(f"{path} does not hold this run's model ({cfg.model}, {run.dataset.num_classes} classes): "
                          f"{str(e).splitlines()[0][:200]}; pass --force to start the run over") from None
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.method.load_state_dict(saved["method"])
    progress = Progress.from_checkpoint(saved)
    if len(saved["rng"]) == env.world_size:
        ckpt.set_rng_state(saved["rng"][env.rank])
    elif env.is_main:
        log(f"warning: resuming a {len(saved['rng'])}-process run with {env.world_size} processes; "
            f"the run will not match an uninterrupted one exactly")
    if env.is_main:
        rundir.rewrite_metrics(cfg.out_dir, progress.history)  # drop lines of a half-finished epoch
        _repair_best(run, progress, saved["model"])
        log(f"resuming {cfg.out_dir} after epoch {progress.epoch + 1}/{cfg.epochs}")
    return progress


def _repair_best(run: Run, progress: Progress, model_state: dict) -> None:
    """best.pt is written just after checkpoint.pt: if a crash fell in between, the checkpoint's
    model is the best one (its epoch is the best epoch), so best.pt is written from it."""
    path = os.path.join(run.cfg.out_dir, rundir.BEST)
    best_epoch = progress.best["epoch"] if progress.best else None
    try:
        saved_epoch = ckpt.load(path).get("epoch") if os.path.exists(path) else None
    except RunDirError:  # unreadable: as good as missing
        saved_epoch = None
    if best_epoch is not None and saved_epoch != best_epoch:
        if best_epoch == progress.epoch:
            ckpt.save_best(run.cfg.out_dir, model_state, best_epoch, progress.best, run.dataset.meta.get("classes"))
        else:
            log(f"warning: {path} does not hold the best epoch ({best_epoch + 1}); it is written when the best "
                f"improves")


def setup(cfg: Config, env: D.DistEnv, dataset: DatasetInfo, resume: bool) -> Run:
    """Model, method, optimizer, schedule and loaders of a run; restored from its checkpoint if `resume`."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every method
    method = METHODS[cfg.method](cfg.method_params, dataset.num_classes)
    net = method.prepare_model(build_model(cfg.model, dataset.num_classes))
    if cfg.sync_bn and env.distributed:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    spec = loader_spec(cfg, dataset, world_size=env.world_size, device=env.device, sampling=method.sampling(),
                       num_views=method.num_views)
    net = net.to(env.device, memory_format=torch.channels_last if spec.channels_last else torch.contiguous_format)
    ckpt.seed_everything(cfg.seed + env.rank)
    method.bind(MethodContext(env.device, dataset.num_classes, len(dataset.labels["train"]), env.rank,
                              env.world_size, cfg.epochs, dataset.meta.get("classes"), spec.batch_per_rank))
    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestones(cfg.epochs, cfg.lr_schedule,
                                                                                    cfg.lr_milestones), 0.1)
    shard = Shard(env.rank, env.world_size)
    run = Run(cfg, env, dataset, method, net, net, optimizer, scheduler, train_loader(spec, shard),
              eval_loader(spec, shard), Progress())
    if resume:
        run.progress = _restore(run)
    if env.distributed:
        run.model = DistributedDataParallel(net, device_ids=[env.device] if env.device.type == "cuda" else None)
    _warn_unsynced_batchnorm(cfg, env, net)
    if env.is_main:
        log(f"{cfg.method} / {cfg.model} on {dataset.path} ({len(dataset.labels['train'])} train, "
            f"{len(dataset.labels['test'])} test, {dataset.num_classes} classes) | {len(run.train_loader)} "
            f"steps/epoch | {D.device_name(env)}")
    return run


def _save_epoch(run: Run, epoch: int, lr: float, train: dict, test: dict, bins: dict, outputs: dict,
                wall_s: float, rng: list) -> None:
    """Rank 0: record the epoch, then the test logits, metrics.jsonl, checkpoint.pt and (if it is the
    best) best.pt. The logits go first: a checkpoint never names an epoch newer than they are."""
    cfg = run.cfg
    record, improved = run.progress.record(epoch, lr, train, test, bins, wall_s)
    ckpt.save_test_logits(os.path.join(cfg.out_dir, rundir.TEST_LOGITS), epoch, outputs)
    if improved:
        ckpt.save_test_logits(os.path.join(cfg.out_dir, rundir.BEST_TEST_LOGITS), epoch, outputs)
    model_state = run.net.state_dict()
    ckpt.save(os.path.join(cfg.out_dir, rundir.CHECKPOINT), {
        **dataclasses.asdict(run.progress), "model": model_state, "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "method": run.method.state_dict(), "rng": rng,
        "config": to_dict(cfg), "classes": run.dataset.meta.get("classes"), "data_sha256": run.dataset.sha256()})
    rundir.append_metrics(cfg.out_dir, record)
    if improved:
        ckpt.save_best(cfg.out_dir, model_state, epoch, test, run.dataset.meta.get("classes"))
    log(f"epoch {epoch + 1}/{cfg.epochs} | lr {lr:.4g} | train loss {train['loss']:.4f} "
        f"err {train['top1_err']:.2f}% | test err {test['top1_err']:.2f}% "
        f"nll {test['nll']:.3f} ece {test['ece']:.2f}% | {train['images_per_s']:.0f} img/s")


def train_loop(run: Run) -> None:
    """Train and evaluate every epoch after the last saved one; rank 0 saves each."""
    cfg, env = run.cfg, run.env
    for epoch in range(run.progress.epoch + 1, cfg.epochs):
        start = time.perf_counter()
        lr = run.optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(run.model, run.method, run.train_loader, run.optimizer, epoch, cfg, env)
        test_metrics, bins, outputs = evaluate(run.net, run.test_loader, env, cfg.ece_bins,
                                               run.dataset.meta.get("superclass_of_class"))
        run.scheduler.step()
        wall_s = time.perf_counter() - start
        rng = D.all_gather_objects(ckpt.rng_state())
        if env.is_main:
            _save_epoch(run, epoch, lr, train_stats, test_metrics, bins, outputs, wall_s, rng)


def finish(run: Run) -> dict | None:
    """Rank 0: write summary.json and the final reliability diagram; return the summary."""
    cfg, env, progress = run.cfg, run.env, run.progress
    if not env.is_main:
        return None
    final = progress.history[-1]
    summary = rundir.build_summary(
        cfg, dataset=run.dataset.name, data_sha256=run.dataset.sha256(),
        final={**final["test"], "epoch": final["epoch"]}, best=progress.best,
        reliability=progress.final_bins, wall_s=progress.wall_s,
        train_images_per_s=progress.train_images / max(progress.train_s, 1e-9), world_size=env.world_size,
        device=D.device_name(env))
    reliability_diagram(progress.final_bins, os.path.join(cfg.out_dir, rundir.RELIABILITY),
                        f"{cfg.method} / {cfg.model}, epoch {cfg.epochs}: ECE {final['test']['ece']:.2f}%")
    path = rundir.write_summary(cfg.out_dir, summary)
    log(f"done: final test err {final['test']['top1_err']:.2f}%, best {progress.best['top1_err']:.2f}% "
        f"(epoch {progress.best['epoch'] + 1}) -> {path}")
    return summary


def main(cfg: Config, force: bool = False) -> dict | None:
    """Run (or resume, or report) the training described by `cfg`; returns the summary on rank 0."""
    _, world_size, _ = D.read_env()
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} does not divide by the world size {world_size}; "
                          f"the global batch is split evenly over ranks, so use a multiple of {world_size}")
    with D.session(cfg.device) as env:
        return _run(cfg, env, force)


def _check_batch_size(cfg: Config, dataset: DatasetInfo) -> None:
    """A global batch larger than the training split is one step over every sample, with buffers
    (and memory) for all the samples it does not have: a typo, refused before the run dir is written."""
    n = len(dataset.labels["train"])
    if cfg.batch_size > n:
        raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {n} training samples of "
                          f"{dataset.path}; use at most {n}")


def _run(cfg: Config, env: D.DistEnv, force: bool) -> dict | None:
    if cfg.sync_bn and env.device.type != "cuda":
        raise ConfigError("sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernels); set sync_bn=false")
    D.configure_torch(cfg.threads, cfg.deterministic)
    with ExitStack() as held:
        def lock_run_dir() -> None:  # held until the run returns or fails; the OS drops it if we die
            held.enter_context(rundir.run_dir_lock(cfg.out_dir))

        # First of all, before the slow dataset checks: a second writer of this run dir stops here.
        _main_rank_decides(env, lock_run_dir)
        dataset = open_dataset(cfg.data.path)
        _check_batch_size(cfg, dataset)
        _main_rank_decides(env, lambda: METHODS[cfg.method].check_inputs(cfg.method_params))
        D.check_identical((cfg.seed, len(dataset.labels["train"])), "(seed, training-set size)")
        status = _main_rank_decides(env, lambda: rundir.prepare(cfg, force))
        if status == "complete":
            if env.is_main:
                path = os.path.join(cfg.out_dir, rundir.SUMMARY)
                log(f"{cfg.out_dir} is already complete ({path}); pass --force to train again")
                return rundir.read_summary(path).raw
            return None
        run = setup(cfg, env, dataset, resume=status == "resume")
        train_loop(run)
        return finish(run)


def parse_args(argv=None) -> tuple[Config, bool]:
    parser = argparse.ArgumentParser(prog="python -m cskd.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML config file (keys as in cskd/config.py)")
    parser.add_argument("--force", action="store_true", help="overwrite a run dir that holds another run")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. method=cskd cskd.lam=3")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the flags
    return load_config(args.config, args.overrides), args.force


def cli(argv=None) -> int:
    try:
        cfg, force = parse_args(argv)
        main(cfg, force)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
