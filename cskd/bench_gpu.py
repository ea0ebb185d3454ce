"""The GPU benchmarks of `python -m cskd.bench --gpu`, sized to finish in about 5 minutes on one H100/H200.

1. PreAct ResNet-18, CIFAR-shaped (batch 128, 32 px, 100 classes; a synthetic uint8 split held on the
   GPU and augmented there by the device loader): CE img/s and CS-KD anchors/s, eager in fp32 and
   bf16 autocast, NCHW and channels_last, and torch.compile'd in bf16 + channels_last (one compiled
   setting: each compile costs about a minute); MFU of each.
2. The projected time of 200 CIFAR-100 epochs (50k training images, the 10k test images evaluated
   after every epoch, one checkpoint per epoch) at the fastest setting.
3. A CUDA-event breakdown of the step (data / forward / backward / optimizer), with the per-epoch
   evaluation and checkpoint.
4. ResNet-50 at 224 px (RandomResizedCrop from stored 256 px images on the GPU): CE img/s, CS-KD anchors/s.
5. Total img/s of K = 1, 2, 4 concurrent processes, each training PreAct ResNet-18 on the same GPU.

FLOPs = 2 x MACs, the multiply-adds of the Conv2d and Linear layers counted by forward hooks (He et
al. 2016 and fvcore count MACs as "FLOPs"; hardware peaks count an FMA as 2). A training step costs 3
forwards per anchor for CE and 4 for CS-KD (the partners' no-grad forward). MFU is measured against
the dense bf16 peak, 989.4 TFLOP/s for H100 SXM and H200 (NVIDIA's datasheets), whatever the setting's
precision; other GPUs print n/a.
"""
from __future__ import annotations

import math
import queue as queue_lib
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from cskd.bench import (PHASES, PhaseClock, compare_methods, first_steps, say, setup_runs, shown, stamp, summary,
                        train_steps)
from cskd.models import build_model

CIFAR = {"train": 50_000, "test": 10_000, "epochs": 200, "batch": 128, "classes": 100, "size": 32}
BF16_PEAK = 989.4e12  # dense, H100 SXM / H200
FORWARDS = {"ce": 3, "cskd": 4}  # forward-equivalents per anchor and step (backward = 2 forwards)
SETTINGS = (  # label, bf16 autocast, channels_last, torch.compile
    ("eager fp32 NCHW", False, False, False),
    ("eager fp32 channels_last", False, True, False),
    ("eager bf16 NCHW", True, False, False),
    ("eager bf16 channels_last", True, True, False),
    ("compiled bf16 channels_last", True, True, True),
)


def bf16_peak(name: str) -> float | None:
    """Dense bf16 FLOP/s of the GPUs we know by name, else None (the PCIe and NVL parts have lower peaks)."""
    if ("H100" in name or "H200" in name) and "PCIe" not in name and "NVL" not in name:
        return BF16_PEAK
    return None


def synthetic(n_train: int, n_test: int, size: int, classes: int, device: torch.device):
    """(DatasetInfo, train split, test split) of random uint8 images and labels held on `device`, as
    the device loader holds a prepared dataset."""
    from cskd.dataset import DatasetInfo

    torch.manual_seed(0)
    labels = {"train": torch.randint(0, classes, (n_train,)), "test": torch.randint(0, classes, (n_test,))}
    meta = {"name": "synthetic", "num_classes": classes, "mean": [0.5] * 3, "std": [0.25] * 3}
    info = DatasetInfo(Path("synthetic"), meta, {k: v.numpy() for k, v in labels.items()},
                       {"train": (size, size), "test": (size, size)})
    splits = [(torch.randint(0, 256, (len(y), size, size, 3), dtype=torch.uint8, device=device), y.to(device),
               torch.arange(len(y), device=device)) for y in labels.values()]
    return info, splits[0], splits[1]


def macs_per_image(net: nn.Module, size: int, device: torch.device) -> float:
    """Multiply-adds of one forward per image, Conv2d and Linear layers, counted by forward hooks."""
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        else:
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        net.eval()  # leaves the BatchNorm running statistics alone
        with torch.no_grad():
            net(torch.zeros(2, 3, size, size, device=device))
    finally:
        for hook in hooks:
            hook.remove()
    return total / 2


def rates(result: dict, macs: float, peak: float | None) -> dict:
    """Anchors/s per method (median and single values) and MFU at the median, from `compare_methods`."""
    out = {}
    for name, r in result.items():
        rate = summary([r["anchors"] / s for s in r["epoch_s"]["values"]])
        mfu = rate["median"] * FORWARDS[name] * 2 * macs / peak if peak else None
        out[name] = {**r, "rate": rate, "mfu": mfu}
    return out


def rate_line(label: str, r: dict) -> str:
    def mfu(x):
        return "n/a" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"

    ratio = r["cskd"]["epoch_s"]["median"] / r["ce"]["epoch_s"]["median"]
    return (f"  {label:28s} CE {shown(r['ce']['rate'])} img/s, MFU {mfu(r['ce'])} | CS-KD {shown(r['cskd']['rate'])} "
            f"anchors/s, MFU {mfu(r['cskd'])} | cskd/ce time {ratio:.2f}")


def grid(args, device, info, train, macs, peak) -> tuple[dict, dict]:
    """The settings' rates, and the objects of the fastest CE setting (for the breakdown)."""
    results, best, best_rate = {}, None, 0.0
    for label, amp, channels_last, compiled in SETTINGS:
        try:
            net, optimizer, runs = setup_runs("preact_resnet18", info, CIFAR["batch"], device, channels_last, train)
            model = torch.compile(net, dynamic=False) if compiled else net  # one static shape: no short last step
            start = time.perf_counter()
            r = rates(compare_methods(model, optimizer, runs, 0, args.repeats, device, amp), macs, peak)
        except Exception as e:  # a setting that cannot run (a compiler missing, memory) must not end the report
            say(f"  {label:28s} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            results[label] = {"error": f"{type(e).__name__}: {e}"}
            continue
        r["total_s"] = time.perf_counter() - start  # with warm-up (and compile) epochs
        results[label] = r
        say(rate_line(label, r) + (f" | {r['total_s']:.0f} s with compile" if compiled else ""))
        if r["ce"]["rate"]["median"] > best_rate:
            best_rate = r["ce"]["rate"]["median"]
            best = {"label": label, "amp": amp, "channels_last": channels_last, "net": net, "model": model,
                    "optimizer": optimizer, "runs": runs}
    return results, best


def checkpoint_seconds(net: nn.Module, optimizer, device: torch.device) -> tuple[float, int]:
    """Wall seconds and bytes of one torch.save of the model and optimizer state (host I/O)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "checkpoint.pt"
        start = stamp(device)
        torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, path)
        return stamp(device) - start, path.stat().st_size


def breakdown(best: dict, info, test, device: torch.device) -> dict:
    """Per-epoch seconds of each phase at the fastest setting, scaled to CIFAR-100's 50k / 10k images."""
    from cskd import distributed as D
    from cskd.batch import LoaderSpec
    from cskd.device_loader import DeviceEvalLoader
    from cskd.eval import evaluate

    out = {}
    for name, (method, loader) in best["runs"].items():
        clock = PhaseClock(device)
        anchors = train_steps(best["model"], method, first_steps(loader, 99, 0), best["optimizer"], clock,
                              best["amp"])
        out[name] = {p: s * CIFAR["train"] / anchors for p, s in clock.totals().items()}
    spec = LoaderSpec(dataset=info, batch_per_rank=CIFAR["batch"], device=device, channels_last=best["channels_last"],
                      loader="device")
    evaluator = DeviceEvalLoader(spec, data=test)
    env = D.DistEnv(0, 1, 0, device)
    evaluate(best["net"], evaluator, env)  # warm-up: autotuning of the eval shapes
    clock = PhaseClock(device)
    clock.start()
    evaluate(best["net"], evaluator, env)  # the trainer's evaluation: float32 forwards and every metric
    clock.mark("eval")
    eval_s = clock.totals()["eval"] * CIFAR["test"] / len(test[1])
    ckpt_s, ckpt_bytes = checkpoint_seconds(best["net"], best["optimizer"], device)
    return {"train_phase_s": out, "eval_s": eval_s, "checkpoint_s": ckpt_s, "checkpoint_bytes": ckpt_bytes}


def projection(results: dict, parts: dict) -> dict:
    """Minutes of 200 CIFAR-100 epochs per method at its fastest setting: train + eval + checkpoint."""
    out = {}
    for name in ("ce", "cskd"):
        label, rate = max(((k, r[name]["rate"]["median"]) for k, r in results.items() if "error" not in r),
                          key=lambda kv: kv[1])
        train_s = CIFAR["train"] / rate
        epoch_s = train_s + parts["eval_s"] + parts["checkpoint_s"]
        out[name] = {"setting": label, "train_s_per_epoch": train_s, "minutes": CIFAR["epochs"] * epoch_s / 60}
    return out


def resnet50(args, device, peak) -> dict:
    """ResNet-50 at 224 px, bf16 + channels_last, eager: CE img/s and CS-KD anchors/s."""
    batch, n = 256, 512 if args.quick else 2048
    info, train, _ = synthetic(n, 0, 256, 1000, device)
    net, optimizer, runs = setup_runs("resnet50", info, batch, device, True, train, pipeline="imagenet224")
    macs = macs_per_image(net, 224, device)
    r = rates(compare_methods(net, optimizer, runs, 0, args.repeats, device, amp=True), macs, peak)
    say(rate_line(f"resnet50 224 px, batch {batch}", r) + f" | {macs / 1e9:.3f} GMACs")
    return {"batch": batch, "gmacs": macs / 1e9, **r}


def concurrent_worker(device_type: str, model: str, epochs: int, n_train: int, barrier, results) -> None:
    """One of K processes: CE on CIFAR-shaped data, bf16 + channels_last, on the shared device; puts
    (anchors, seconds after the common start, error or None)."""
    try:
        device = torch.device(device_type)
        torch.backends.cudnn.benchmark = True
        info, train, _ = synthetic(n_train, 0, CIFAR["size"], CIFAR["classes"], device)
        net, optimizer, runs = setup_runs(model, info, CIFAR["batch"], device, True, train, methods=("ce",))
        method, loader = runs["ce"]
        off = PhaseClock(device, enabled=False)
        train_steps(net, method, first_steps(loader, 0, 0), optimizer, off, amp=True)  # warm-up
        barrier.wait(timeout=300)
        start = stamp(device)
        seen = sum(train_steps(net, method, first_steps(loader, e, 0), optimizer, off, amp=True)
                   for e in range(1, epochs + 1))
        results.put((seen, stamp(device) - start, None))
    except Exception as e:  # reported by the parent, which must not wait for a dead worker
        barrier.abort()
        results.put((0, 0.0, f"{type(e).__name__}: {e}"))


def concurrent(args, device: torch.device, model: str = "preact_resnet18", counts=(1, 2, 4)) -> dict:
    """Total img/s of K processes training `model` at once on `device` (torch.multiprocessing, spawn)."""
    ctx = torch.multiprocessing.get_context("spawn")
    n_train, epochs = (2_560, 2) if args.quick else (10_240, 2)
    out = {}
    for k in counts:
        barrier, results = ctx.Barrier(k), ctx.Queue()
        work = (device.type, model, epochs, n_train, barrier, results)
        procs = [ctx.Process(target=concurrent_worker, args=work) for _ in range(k)]
        for p in procs:
            p.start()
        try:
            got = [results.get(timeout=300) for _ in procs]
        except queue_lib.Empty:
            got = [(0, 0.0, "no result within 300 s")]
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.kill()
        errors = [e for _, _, e in got if e]
        if errors:
            say(f"  K={k}: failed: {errors[0]}")
            out[k] = {"error": errors[0]}
            continue
        total = sum(n for n, _, _ in got) / max(s for _, s, _ in got)
        each = [n / s for n, s, _ in got]
        out[k] = {"total_img_s": total, "per_process_img_s": each}
        say(f"  K={k}: total {total:,.0f} img/s (per process {', '.join(f'{r:,.0f}' for r in each)})")
    return out


def run_gpu(args, report, device: torch.device = torch.device("cuda")) -> None:
    """All GPU sections, printed as they finish and added to `report` one by one."""
    begin = time.perf_counter()
    torch.backends.cudnn.benchmark = True  # as the trainer (cskd.distributed.configure_torch)
    name = torch.cuda.get_device_name(device)
    peak = bf16_peak(name)
    gpu = {"name": name, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "bf16_peak_tflops": peak and peak / 1e12, "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
           "matmul_precision": torch.get_float32_matmul_precision()}
    report.add("gpu", gpu)
    say(f"GPU {name}, CUDA {gpu['cuda']}, cuDNN {gpu['cudnn']}; dense bf16 peak "
        f"{'n/a' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'}; fp32 convolutions "
        f"{'may use TF32 (torch default)' if gpu['cudnn_allow_tf32'] else 'in full fp32'}")
    n_train = 2_560 if args.quick else 10_240  # a multiple of 128: every step has the same shape
    info, train, test = synthetic(n_train, CIFAR["test"], CIFAR["size"], CIFAR["classes"], device)
    macs = macs_per_image(build_model("preact_resnet18", CIFAR["classes"]).to(device), CIFAR["size"], device)
    say(f"[{time.perf_counter() - begin:.0f} s] 1. preact_resnet18, {CIFAR['classes']} classes, batch "
        f"{CIFAR['batch']} (CS-KD: + as many partners), {n_train} synthetic images on the GPU per epoch, "
        f"{macs / 1e9:.4f} GMACs/image; medians of {args.repeats} epochs:")
    results, best = grid(args, device, info, train, macs, peak)
    report.add("cifar_grid", {"macs": macs, "settings": results})
    if best is None:
        say("no setting ran; skipping the projection and the breakdown")
    else:
        parts = breakdown(best, info, test, device)
        proj = projection(results, parts)
        report.add("cifar_breakdown", {"setting": best["label"], **parts})
        report.add("cifar_200_epochs", proj)
        say(f"[{time.perf_counter() - begin:.0f} s] 2. 200 CIFAR-100 epochs (50k train + 10k eval + a checkpoint "
            f"per epoch):")
        for m, p in proj.items():
            say(f"  {m}: {p['minutes']:.1f} min at {p['setting']} (train {p['train_s_per_epoch']:.2f} s + eval "
                f"{parts['eval_s']:.2f} s + checkpoint {parts['checkpoint_s']:.2f} s per epoch)")
        say(f"  3. breakdown per 50k-image epoch at {best['label']} (CUDA events; checkpoint by the host clock, "
            f"{parts['checkpoint_bytes'] / 2**20:.0f} MiB):")
        for m, phases in parts["train_phase_s"].items():
            total = sum(phases.values())
            cells = " | ".join(f"{p} {phases.get(p, 0.0):.2f} s ({100 * phases.get(p, 0.0) / total:.0f}%)"
                               for p in PHASES)
            say(f"  {m}: {cells} | eval {parts['eval_s']:.2f} s | checkpoint {parts['checkpoint_s']:.2f} s")
    say(f"[{time.perf_counter() - begin:.0f} s] 4. resnet50, 1000 classes, synthetic 256 px images on the GPU, "
        f"RandomResizedCrop(224) + flip, bf16 + channels_last, eager:")
    report.add("resnet50_224", resnet50(args, device, peak))
    say(f"[{time.perf_counter() - begin:.0f} s] 5. concurrent processes on this GPU, each preact_resnet18 CE, "
        f"bf16 + channels_last, eager:")
    report.add("concurrent", concurrent(args, device))
    say(f"[{time.perf_counter() - begin:.0f} s] GPU benchmarks done")
    report.add("gpu_wall_s", time.perf_counter() - begin)
