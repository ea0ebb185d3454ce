"""PS-KD's cost per training step against CE's, and the memory of its two teachers.

    python benchmarks/bench_pskd.py [--model preact_resnet18] [--batch 128] [--size 32] [--steps 5]

Each method trains the same model on the same random batches (a fixed set of `--samples` images)
through `Method.loss`, backward and an SGD step, as the trainer does; the epoch is 1, so PS-KD reads
a past prediction (the table's row, or the epoch-start copy's forward) on every step. Prints the
median time per step after a warm-up step, the method's own memory (the prediction table, the
teacher copy), the peak device memory on CUDA, and the table's size for ImageNet-1k per rank.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cskd.batch import Batch  # noqa: E402
from cskd.config import load_config  # noqa: E402
from cskd.methods import METHODS, MethodContext  # noqa: E402
from cskd.models import build_model  # noqa: E402

IMAGENET = (1_281_167, 1000)  # ILSVRC-2012 training images, classes
VARIANTS = {"ce": ["method=ce"], "pskd table": ["method=pskd", "pskd.teacher=table"],
            "pskd model": ["method=pskd", "pskd.teacher=model"]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def method_bytes(method) -> int:
    """What the method itself holds: its prediction table, or its teacher copy's parameters and buffers."""
    if getattr(method, "table", None) is not None:
        return method.table.nbytes
    snapshot = getattr(getattr(method, "snapshot", None), "model", None)
    if snapshot is not None:
        return sum(t.nbytes for t in (*snapshot.parameters(), *snapshot.buffers()))
    return 0


def measure(name: str, args, device: torch.device) -> dict:
    cfg = load_config(None, VARIANTS[name] + [f"model={args.model}"])
    torch.manual_seed(0)
    method = METHODS[cfg.method](cfg.method_params, args.classes)
    model = method.prepare_model(build_model(args.model, args.classes)).to(device)
    method.bind(MethodContext(device, args.classes, args.samples, 0, 1, 10, None, args.batch))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(args.samples, 3, args.size, args.size, device=device)
    labels = torch.randint(0, args.classes, (args.samples,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    model.train()
    for step in range(args.steps + 1):
        index = torch.randperm(args.samples, device=device)[:args.batch]
        batch = Batch(images[index], labels[index], index, epoch=1, step=step)
        _sync(device)
        start = time.perf_counter()
        out = method.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        _sync(device)
        if step:  # the first step warms up (allocations, the teacher copy)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return {"step_s": statistics.median(times), "method_mib": method_bytes(method) / 2**20,
            "peak_mib": None if peak is None else peak / 2**20}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench_pskd.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--samples", type=int, default=50_000, help="training-set size (rows of the table)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    args.samples = max(args.samples, args.batch)
    print(f"{args.model}, {args.classes} classes, {args.size}x{args.size}, batch {args.batch}, "
          f"{args.samples} samples, {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'})")
    print("| variant | s / step | vs CE | method state (MiB) | peak device memory (MiB) |")
    print("|---|---|---|---|---|")
    base = None
    for name in VARIANTS:
        r = measure(name, args, device)
        base = base or r["step_s"]
        peak = "–" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(f"| {name} | {r['step_s']:.4f} | {r['step_s'] / base:.2f} | {r['method_mib']:.1f} | {peak} |")
    rows, classes = IMAGENET
    for dtype, size in (("float16", 2), ("bfloat16", 2), ("float32", 4)):
        print(f"ImageNet-1k table, {dtype}: {rows} x {classes} x {size} B = {rows * classes * size / 2**30:.2f} GiB "
              f"per rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())
