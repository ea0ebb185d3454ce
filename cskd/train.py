"""Train and evaluate one run: `python -m cskd.train --config FILE.yaml [key=value ...]`.

The same code path serves a single process and `torchrun --nproc_per_node=N -m cskd.train ...`.
Each epoch: train (the method computes the loss), evaluate on the test split (sharded over ranks,
gathered exactly), append a line to metrics.jsonl, write checkpoint.pt atomically. At the end,
summary.json holds the final-epoch and best-epoch metrics and reliability.png the final diagram.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from cskd import checkpoint as ckpt
from cskd import distributed as D
from cskd import rundir
from cskd.config import Config, load_config, to_dict
from cskd.data import EvalLoader, TrainLoader, open_dataset
from cskd.device_data import build_loaders
from cskd.errors import ConfigError, CskdError, NonFiniteLossError
from cskd.fileio import write_json
from cskd.methods import METHODS, MethodContext
from cskd.metrics import classification_metrics
from cskd.models import build_model
from cskd.plots import reliability_diagram
from cskd.progress import EpochProgress, log


def lr_milestones(epochs: int, schedule: str) -> list[int]:
    """Epoch indices from which the LR is divided by 10 (once per milestone)."""
    half, three_quarters = math.ceil(epochs / 2), math.ceil(3 * epochs / 4)
    if schedule == "step_reference":  # adjust_learning_rate(epoch) runs after the epoch: one late
        return [half + 1, three_quarters + 1]
    return [half, three_quarters]


def autocast(cfg: Config, device: torch.device):
    if cfg.amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def train_one_epoch(model, method, loader: TrainLoader, optimizer, epoch: int, cfg: Config, env: D.DistEnv) -> dict:
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


@torch.no_grad()
def evaluate(model, loader: EvalLoader, cfg: Config, env: D.DistEnv):
    """Metrics of the whole split on rank 0 (None elsewhere): shards gathered, each sample once."""
    model.eval()
    logits, features, labels, index = [], [], [], []
    with autocast(cfg, env.device):
        for images, y, idx in loader:
            f = model.forward_features(images)
            logits.append(model.head(f).float())
            features.append(f.float())
            labels.append(y)
            index.append(idx)

    logits, features, labels, index = (D.all_gather_rows(torch.cat(parts)) for parts in (logits, features, labels, index))
    if not env.is_main:
        return None, None
    order = index.argsort()  # dataset order, whatever the number of ranks
    metrics, bins = classification_metrics(logits[order], labels[order], features[order], cfg.ece_bins)
    return metrics | {"samples": len(labels)}, bins


def _device_name(env: D.DistEnv) -> str:
    if env.device.type == "cuda":
        return f"{torch.cuda.get_device_name(env.device)} x{env.world_size}"
    return f"cpu ({torch.get_num_threads()} threads/process) x{env.world_size} on {socket.gethostname()}"


def _setup_run_dir(cfg: Config, env: D.DistEnv, force: bool) -> str:
    """Rank 0 decides new/resume/complete (or the error); every rank gets the same answer."""
    decision = None
    if env.is_main:
        try:
            decision = ("ok", rundir.prepare(cfg, force))
        except CskdError as e:
            decision = ("error", str(e))
    kind, value = D.broadcast_object(decision)
    if kind == "error":
        raise ConfigError(value)
    return value


def _restore(cfg: Config, env: D.DistEnv, state: dict, model, optimizer, scheduler, method) -> dict:
    """Load the run dir's checkpoint into the objects; return the saved progress (`state`'s keys)."""
    saved = ckpt.load(os.path.join(cfg.out_dir, rundir.CHECKPOINT))
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    method.load_state_dict(saved["method"])
    if len(saved["rng"]) == env.world_size:
        ckpt.set_rng_state(saved["rng"][env.rank])
    elif env.is_main:
        log(f"warning: resuming a {len(saved['rng'])}-process run with {env.world_size} processes; "
            f"the run will not match an uninterrupted one exactly")
    if env.is_main:
        rundir.rewrite_metrics(cfg.out_dir, saved["history"])  # drop lines of a half-finished epoch
        log(f"resuming {cfg.out_dir} after epoch {saved['epoch'] + 1}/{cfg.epochs}")
    return {k: saved[k] for k in state}


def main(cfg: Config, force: bool = False) -> dict | None:
    """Run (or resume, or report) the training described by `cfg`; returns the summary on rank 0."""
    _, world_size, _ = D.read_env()
    if cfg.batch_size % world_size:
        raise ConfigError(f"batch_size={cfg.batch_size} does not divide by the world size {world_size}; "
                          f"the global batch is split evenly over ranks, so use a multiple of {world_size}")
    env = D.init_distributed(cfg.device)
    try:
        result = _run(cfg, env, force)
        D.barrier()  # leave together: a rank tearing down its process group while rank 0 still writes can abort
        return result
    finally:
        D.shutdown()


def _run(cfg: Config, env: D.DistEnv, force: bool) -> dict | None:
    if cfg.sync_bn and env.device.type != "cuda":
        raise ConfigError("sync_bn=true needs CUDA (SyncBatchNorm has no CPU kernels); set sync_bn=false")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = not cfg.deterministic
    info = open_dataset(cfg.data.path)
    D.check_identical((cfg.seed, len(info.labels["train"])), "(seed, training-set size)")
    status = _setup_run_dir(cfg, env, force)
    summary_path = os.path.join(cfg.out_dir, rundir.SUMMARY)
    if status == "complete":
        if env.is_main:
            log(f"{cfg.out_dir} is already complete ({summary_path}); pass --force to train again")
        return _read_json(summary_path) if env.is_main else None

    channels_last = cfg.channels_last and env.device.type == "cuda"
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank and for every method
    method = METHODS[cfg.method](cfg.method_params, info.num_classes)
    model = method.prepare_model(build_model(cfg.model, info.num_classes))
    if cfg.sync_bn and env.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(env.device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    ckpt.seed_everything(cfg.seed + env.rank)
    method.bind(MethodContext(env.device, info.num_classes, len(info.labels["train"]), env.rank, env.world_size,
                              cfg.epochs))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay, nesterov=cfg.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, lr_milestones(cfg.epochs, cfg.lr_schedule), 0.1)

    train_loader, test_loader = build_loaders(cfg, info, env.world_size, env.rank, env.device, method.sampling(),
                                              method.num_views, channels_last)

    state = {"epoch": -1, "history": [], "best": None, "final_bins": None, "wall_s": 0.0, "train_s": 0.0,
             "train_images": 0}
    if status == "resume":
        state = _restore(cfg, env, state, model, optimizer, scheduler, method)

    net = model
    if env.distributed:
        model = DistributedDataParallel(model, device_ids=[env.device] if env.device.type == "cuda" else None)
    if env.is_main:
        log(f"{cfg.method} / {cfg.model} on {info.path} ({len(info.labels['train'])} train, "
            f"{len(info.labels['test'])} test, {info.num_classes} classes) | {len(train_loader)} steps/epoch | "
            f"{_device_name(env)}")

    for epoch in range(state["epoch"] + 1, cfg.epochs):
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        train_stats = train_one_epoch(model, method, train_loader, optimizer, epoch, cfg, env)
        test_metrics, bins = evaluate(net, test_loader, cfg, env)
        scheduler.step()
        state["epoch"] = epoch
        state["wall_s"] += time.perf_counter() - t0
        state["train_s"] += train_stats["time_s"]
        state["train_images"] += train_stats["images"]
        rng = D.all_gather_objects(ckpt.rng_state())
        if not env.is_main:
            continue
        record = {"epoch": epoch, "lr": lr, "train": train_stats, "test": test_metrics}
        state["history"].append(record)
        state["final_bins"] = bins
        if state["best"] is None or test_metrics["top1_err"] < state["best"]["top1_err"]:
            state["best"] = {**test_metrics, "epoch": epoch}
        ckpt.save(os.path.join(cfg.out_dir, rundir.CHECKPOINT), {
            **state, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "method": method.state_dict(), "rng": rng,
            "config": to_dict(cfg)})
        rundir.append_metrics(cfg.out_dir, record)
        log(f"epoch {epoch + 1}/{cfg.epochs} | lr {lr:.4g} | train loss {train_stats['loss']:.4f} "
            f"err {train_stats['top1_err']:.2f}% | test err {test_metrics['top1_err']:.2f}% "
            f"nll {test_metrics['nll']:.3f} ece {test_metrics['ece']:.2f}% | "
            f"{train_stats['images_per_s']:.0f} img/s")

    if not env.is_main:
        return None
    final, bins = state["history"][-1], state["final_bins"]
    summary = {
        "final": {**final["test"], "epoch": final["epoch"]},
        "best": state["best"],
        "best_note": "best = the epoch of lowest test top1_err; it selects on the test set, like the references",
        "epochs": cfg.epochs, "wall_s": state["wall_s"],
        "train_images_per_s": state["train_images"] / max(state["train_s"], 1e-9),
        "world_size": env.world_size, "device": _device_name(env),
        "method": cfg.method, "model": cfg.model, "dataset": info.meta.get("name", str(info.path)),
        "seed": cfg.seed, "reliability": bins,
    }
    reliability_diagram(bins, os.path.join(cfg.out_dir, rundir.RELIABILITY),
                        f"{cfg.method} / {cfg.model}, epoch {cfg.epochs}: ECE {final['test']['ece']:.2f}%")
    write_json(summary_path, summary)
    log(f"done: final test err {final['test']['top1_err']:.2f}%, best {state['best']['top1_err']:.2f}% "
        f"(epoch {state['best']['epoch'] + 1}) -> {summary_path}")
    return summary


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


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
