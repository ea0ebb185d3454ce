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
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from torch import nn

from cskd import checkpoint as ckpt
from cskd import distributed as D
from cskd import rundir, sample_log
from cskd.batch import Shard
from cskd.checkpoint import Progress
from cskd.config import Config, load_config, resolve_batch, to_dict
from cskd.dataset import DatasetInfo, open_dataset
from cskd.engine import Engine, build_engine
from cskd.errors import ConfigError, CskdError, RunDirError
from cskd.eval import evaluate
from cskd.loaders import EvalBatches, TrainBatches, eval_loader, loader_spec, train_loader
from cskd.methods import METHODS, Method, MethodContext
from cskd.models import build_model
from cskd.plots import reliability_diagram
from cskd.preempt import SignalGate
from cskd.progress import log
from cskd.step import autocast_dtype, peak_lr, train_one_epoch


def lr_milestones(epochs: int, schedule: str, milestones: list[int] = ()) -> list[int]:
    """Epoch indices from which the LR is divided by 10 (once per milestone)."""
    if schedule == "milestones":
        return list(milestones)
    half, three_quarters = math.ceil(epochs / 2), math.ceil(3 * epochs / 4)
    if schedule == "step_reference":  # adjust_learning_rate(epoch) runs after the epoch: one late
        return [half + 1, three_quarters + 1]
    return [half, three_quarters]


@dataclass
class Run:
    """What one training run works with: built by `setup`, used by `train_loop` and `finish`."""

    cfg: Config
    env: D.DistEnv
    dataset: DatasetInfo
    method: Method
    engine: Engine  # net (saved, evaluated), model (what a step calls), optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_loader: TrainBatches
    test_loader: EvalBatches
    progress: Progress
    samples: sample_log.SampleRecorder  # per-sample correctness (and probabilities) of the current epoch
    writer: ckpt.BackgroundWriter = field(default_factory=ckpt.BackgroundWriter)


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
    global_batch, micro, _ = resolve_batch(cfg.batch, env.world_size)
    if (env.is_main and micro < global_batch and not cfg.sync_bn
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())):
        log(f"warning: BatchNorm normalises each micro-batch of {micro} anchors (and CS-KD's partners) on its own, "
            f"not the {global_batch} of the single-GPU reference; the statistics, and CS-KD's partner targets, "
            f"differ from it. sync_bn=true (CUDA) normalises over all ranks")


def _restore(run: Run) -> Progress:
    """Load the run dir's checkpoint into the run's objects; return the saved progress.

    The checkpoint holds full (unsharded) state, so it resumes on any number of ranks and under any
    engine; only the random streams are per rank, and they are restored when the count matches."""
    cfg, env = run.cfg, run.env
    path = os.path.join(cfg.out_dir, rundir.CHECKPOINT)
    saved = ckpt.load(path)
    rundir.check_same_data(cfg.out_dir, saved.get("data_sha256"), run.dataset.sha256())
    try:
        run.engine.load_full_state({"model": saved["model"], "optimizer": saved["optimizer"]})
    except (RuntimeError, KeyError, ValueError) as e:  # config.yaml says the same model: the checkpoint is foreign
        raise RunDirError(f"{path} does not hold this run's model ({cfg.model}, {run.dataset.num_classes} classes): "
                          f"{str(e).splitlines()[0][:200]}; pass --force to start the run over") from None
    run.scheduler.load_state_dict(saved["scheduler"])
    run.method.load_state_dict(saved["method"])
    progress = Progress.from_checkpoint(saved)
    saved_world = len(saved["rng"])
    if saved_world == env.world_size:
        ckpt.set_rng_state(saved["rng"][env.rank], env.device)
    if env.is_main:
        rundir.rewrite_metrics(cfg.out_dir, progress.history)  # drop lines of epochs after the checkpoint
        restarted = sample_log.cut_to(cfg.out_dir, progress.epoch + 1, len(run.dataset.labels["train"]))
        if restarted:
            log(f"{', '.join(restarted)} did not hold every epoch up to the checkpoint; kept from epoch "
                f"{progress.epoch + 2} on")
        _repair_best(run, progress, saved["model"])
        log(f"resuming {cfg.out_dir} after epoch {progress.epoch + 1}/{cfg.epochs}")
        if saved_world != env.world_size:
            log(f"resuming a {saved_world}-process run on {env.world_size} processes: the weights, optimizer and "
                f"schedule continue; the data order and random streams are those of {env.world_size} processes, so "
                f"the run will not match an uninterrupted one exactly")
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
        elif saved_epoch is not None and saved_epoch > progress.epoch:  # checkpoint_every > 1
            log(f"warning: {path} holds epoch {saved_epoch + 1}, which ran after the last checkpoint (epoch "
                f"{progress.epoch + 1}) and is trained again; it is replaced when the best improves")
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
                       num_views=method.num_views, local_world_size=D.local_world_size())
    net = net.to(env.device, memory_format=torch.channels_last if spec.channels_last else torch.contiguous_format)
    ckpt.seed_everything(cfg.seed + env.rank)
    batch = resolve_batch(cfg.batch, env.world_size)  # (global, micro_per_rank, grad_accum)
    method.bind(MethodContext(env.device, dataset.num_classes, len(dataset.labels["train"]), env.rank,
                              env.world_size, cfg.epochs, dataset.meta.get("classes"), batch[1]))
    # A compiled model (`compile`) serves the anchors' forward and the no-grad partner forward alike
    # (one more graph, compiled once), and the short last step (its shape, once).
    engine = build_engine(net, env, engine=cfg.engine, zero=cfg.optimizer.zero, lr=peak_lr(cfg),
                          momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
                          compile=cfg.compile, cuda_graphs=cfg.cuda_graphs,
                          batch=batch, autocast=autocast_dtype(cfg, env.device))
    scheduler = torch.optim.lr_scheduler.MultiStepLR(engine.optimizer, lr_milestones(cfg.epochs, cfg.lr_schedule,
                                                                                           cfg.lr_milestones), 0.1)
    shard = Shard(env.rank, env.world_size)
    samples = sample_log.SampleRecorder(len(dataset.labels["train"]), env.device, cfg.log_per_sample)
    run = Run(cfg, env, dataset, method, engine, scheduler, train_loader(spec, shard), eval_loader(spec, shard),
              Progress(), samples)
    if resume:
        run.progress = _restore(run)
    _warn_unsynced_batchnorm(cfg, env, net)
    if env.is_main:
        log(f"{cfg.method} / {cfg.model} on {dataset.path} ({len(dataset.labels['train'])} train, "
            f"{len(dataset.labels['test'])} test, {dataset.num_classes} classes) | {len(run.train_loader)} "
            f"steps/epoch | {D.device_name(env)} | {engine.layout}{' compiled' if cfg.compile else ''} | "
            f"{spec.loader} loader ({spec.why})")
    return run


def _epoch_is(every: int, epoch: int, cfg: Config) -> bool:
    """Whether `epoch` is one of every `every`-th epochs (counting from 1), or the last one."""
    return (epoch + 1) % every == 0 or epoch + 1 == cfg.epochs


def _record_epoch(run: Run, epoch: int, lr: float, train: dict, test: dict | None, bins: dict | None,
                  outputs: dict | None, sample_rows: dict[str, bytes], wall_s: float, state: dict) -> None:
    """Rank 0: record the epoch and hand its files to the background writer: the per-sample rows and
    the test logits, then checkpoint.pt (when `state` holds the optimizer: a checkpoint epoch),
    metrics.jsonl and best.pt (when the best improves; from `state["model"]`). The rows and logits go
    first: a checkpoint never names an epoch newer than they are."""
    cfg, out = run.cfg, run.cfg.out_dir
    record, improved = run.progress.record(epoch, lr, train, test, bins, wall_s)
    classes = run.dataset.meta.get("classes")
    checkpoint = None
    if "optimizer" in state:  # a checkpoint epoch; `state` (engine.full_state) is a CPU copy already
        checkpoint = {**state, **ckpt.to_cpu({  # a snapshot: training goes on changing the method's tensors
            **dataclasses.asdict(run.progress), "scheduler": run.scheduler.state_dict(),
            "method": run.method.state_dict(), "config": to_dict(cfg), "classes": classes,
            "data_sha256": run.dataset.sha256()})}

    def write() -> None:
        sample_log.append_rows(out, epoch, len(run.dataset.labels["train"]), sample_rows)
        if outputs is not None:
            ckpt.save_test_logits(os.path.join(out, rundir.TEST_LOGITS), epoch, outputs)
            if improved:
                ckpt.save_test_logits(os.path.join(out, rundir.BEST_TEST_LOGITS), epoch, outputs)
        if checkpoint is not None:
            ckpt.save(os.path.join(out, rundir.CHECKPOINT), checkpoint)
        rundir.append_metrics(out, record)
        if improved:
            ckpt.save_best(out, state["model"], epoch, test, classes)

    run.writer.submit(write) if cfg.async_checkpoint else write()
    test_note = (f"test err {test['top1_err']:.2f}% nll {test['nll']:.3f} ece {test['ece']:.2f}%" if test
                 else "not evaluated (eval_every)")
    log(f"epoch {epoch + 1}/{cfg.epochs} | lr {lr:.4g} | train loss {train['loss']:.4f} "
        f"err {train['top1_err']:.2f}% | {test_note} | {train['images_per_s']:.0f} img/s")


def train_loop(run: Run, gate: SignalGate) -> bool:
    """Train every epoch after the last saved one; evaluate every `eval_every`-th and checkpoint every
    `checkpoint_every`-th (and the last); rank 0 writes the files, on a thread if `async_checkpoint`.
    If the scheduler's signal reached any rank (`gate`), checkpoint the epoch it came in, hand the
    signal over to the launcher and return False (the run continues after its requeue); else True."""
    cfg, env, engine = run.cfg, run.env, run.engine
    try:
        for epoch in range(run.progress.epoch + 1, cfg.epochs):
            start = time.perf_counter()
            lr = engine.optimizer.param_groups[0]["lr"]
            train_stats = train_one_epoch(engine, run.method, run.train_loader, epoch, cfg, env, run.samples)
            sample_rows = run.samples.end_epoch(env.is_main)
            test, bins, outputs = None, None, None
            if _epoch_is(cfg.eval_every, epoch, cfg):
                with engine.gathered() as net:  # FSDP: whole on every rank, no collective per forward
                    test, bins, outputs = evaluate(net, run.test_loader, env, cfg.ece_bins,
                                                   run.dataset.meta.get("superclass_of_class"))
                if outputs is not None:  # what figures name the classes and domains with
                    outputs |= {key: run.dataset.meta.get(key) for key in ("classes", "superclass_of_class")}
            run.scheduler.step()
            wall_s = time.perf_counter() - start
            stopping = gate.requested_anywhere(env.device) and epoch + 1 < cfg.epochs
            state = {}  # collectives: every rank takes part
            if stopping or _epoch_is(cfg.checkpoint_every, epoch, cfg):
                state = {**engine.full_state(), "rng": D.all_gather_objects(ckpt.rng_state(env.device))}
            elif _epoch_is(cfg.eval_every, epoch, cfg):
                state = engine.full_state(with_optimizer=False)  # the weights best.pt needs if the best improved
            if env.is_main:
                _record_epoch(run, epoch, lr, train_stats, test, bins, outputs, sample_rows, wall_s, state)
            if stopping:
                run.writer.join()
                D.barrier()  # every rank hands over only once the checkpoint is on disk
                if env.is_main:
                    log(f"epoch {epoch + 1}/{cfg.epochs} checkpointed after the scheduler's signal; "
                        "handing over to the launcher (requeue)")
                gate.hand_over()
                return False
    finally:
        run.writer.join()  # the last epoch's files are on disk (or its error raised) before anything else
    return True


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
    resolve_batch(cfg.batch, world_size)  # the batch triple fits this world size, before anything starts
    with D.session(cfg.device) as env:
        return _run(cfg, env, force)


def _check_batch_size(cfg: Config, dataset: DatasetInfo) -> None:
    """A global batch larger than the training split is one step over every sample, with buffers
    (and memory) for all the samples it does not have: a typo, refused before the run dir is written."""
    n = len(dataset.labels["train"])
    if cfg.batch.global_ > n:
        raise ConfigError(f"batch.global={cfg.batch.global_} is larger than the {n} training samples of "
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
        gate = held.enter_context(SignalGate())  # the scheduler's warning waits for the epoch's checkpoint
        run = setup(cfg, env, dataset, resume=status == "resume")
        return finish(run) if train_loop(run, gate) else None


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
