"""Speed benchmarks (figures, not tests): `python -m cskd.bench [--quick] [--gpu] [--json PATH]` (`make bench`).

CPU mode (the default):
(a) training-loader throughput, same images and augmentation, three ways: the device-resident loader
    (`data.loader=device`: the split held as one uint8 tensor, batched torch augmentation), the FFCV
    loader (FFCV decode threads + the same torch augmentation) and a torch DataLoader with
    torchvision transforms on PIL images. At 32x32 (`--data`, pad-4 crop + flip) and at 224x224 (a
    synthetic set of `--large` stored 256x256 images, RandomResizedCrop(224) + flip).
(b) time per training epoch of CS-KD against CE: same model, data and anchors per step, epochs
    alternating CE, CS-KD, CE, ... so that a change in machine load hits both alike. Ideal about
    1.33 (one extra no-grad forward per anchor, Yun et al. CVPR 2020), plus CS-KD's second image per
    anchor in the loader.
GPU mode (`--gpu`, `cskd.bench_gpu`): throughput grid, MFU, 200-epoch projection, step breakdown,
ResNet-50 at 224 px and concurrent runs on one GPU.

Each figure is the median of `--repeats` measurements taken after a warm-up (FFCV's JIT,
DataLoader workers, allocator and autotuning), and the single values are listed with it. The
torch thread count is fixed (`--threads`) and printed: the ratios swing with it.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cskd.errors import ConfigError, CskdError
from cskd.fileio import write_json

CPU = torch.device("cpu")
PHASES = ("data", "forward", "backward", "optimizer")
MIN_WINDOW_S = 1.0  # shortest loader measurement


def say(text: str) -> None:
    print(text, flush=True)  # a long run is watched as it goes


def summary(values: list[float]) -> dict:
    """The median and the single measurements."""
    return {"median": statistics.median(values), "values": values}


def shown(s: dict, fmt: str = ",.0f") -> str:
    return f"{s['median']:{fmt}} ({', '.join(f'{v:{fmt}}' for v in s['values'])})"


def machine(threads: int) -> dict:
    """What the figures depend on: CPU model, cores, torch version and threads, load."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        model = names[0] if names else model
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": threads,
            "load_avg_1m": round(os.getloadavg()[0], 2), "python": platform.python_version()}


def warn_if_busy(threads: int, own: float = 0.0) -> None:
    """Say when other processes compete for the cores (`own`: this run's share of the 1-minute load
    average). A parallel region of torch waits for its slowest thread, so one descheduled thread
    stalls it: measured on 2 cores, loader epochs 10-30x slower than on an idle machine."""
    load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
    if load - own > cores - threads + 0.5:
        say(f"warning: load average {load:.1f} on {cores} cores with {threads} torch threads: other processes "
            f"compete for the cores and the figures are noisy (--threads 1 is steadier on a shared machine)")


class PhaseClock:
    """Time per phase of training steps. On a GPU, CUDA events (no host sync until `totals`); on a
    CPU, the host clock (every op there is synchronous). Disabled, `mark` costs nothing."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.cuda, self.enabled = device.type == "cuda", enabled
        self.marks: list[tuple[str, object, object]] = []
        self.last = None

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        if self.enabled:
            self.last = self._now()

    def mark(self, phase: str) -> None:
        """Charge the time since the previous mark to `phase`."""
        if self.enabled:
            now = self._now()
            self.marks.append((phase, self.last, now))
            self.last = now

    def totals(self) -> dict[str, float]:
        """Seconds per phase, summed over the marks so far."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for phase, a, b in self.marks:
            out[phase] = out.get(phase, 0.0) + (a.elapsed_time(b) / 1e3 if self.cuda else b - a)
        return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(model, method, batches, optimizer, clock: PhaseClock, amp: bool = False) -> int:
    """The trainer's step (`Method.loss`, backward, SGD step) over `batches`; returns the anchors seen.
    `forward` is the method's whole loss: for CS-KD both the anchors' and the partners' forwards."""
    model.train()
    device = next(model.parameters()).device
    seen = 0
    clock.start()
    for batch in batches:
        clock.mark("data")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = method.loss(model, batch)
        clock.mark("forward")
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        clock.mark("backward")
        optimizer.step()
        clock.mark("optimizer")
        seen += len(batch.labels)
    return seen


def stamp(device: torch.device) -> float:
    """The host clock once `device` has finished its queued work."""
    sync(device)
    return time.perf_counter()


def first_steps(loader, epoch: int, steps: int):
    """The first `steps` batches of `loader.epoch(epoch)` (all if 0); the epoch's iterator is closed after."""
    it = loader.epoch(epoch)
    try:
        yield from itertools.islice(it, steps or None)
    finally:
        it.close()


# --- CPU (a): loaders ------------------------------------------------------------------------------

def dataloader_epochs(info, pipeline: str, batch: int, workers: int):
    """An epoch function of a torch DataLoader doing the pipeline with torchvision on PIL images."""
    from PIL import Image
    from torchvision import transforms as T

    from cskd.augment import PIPELINES
    from cskd.device_loader import read_split

    spec = PIPELINES[pipeline]
    images, labels, _ = (t.numpy() for t in read_split(info, "train", CPU))
    crop = T.RandomResizedCrop(spec.rrc) if spec.rrc else T.RandomCrop(images.shape[1], padding=spec.pad)
    transform = T.Compose([crop, T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(spec.mean or info.meta["mean"], spec.std or info.meta["std"])])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), int(labels[i])

    loader = torch.utils.data.DataLoader(Images(), batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    return lambda epoch: [x.sum() for x, _ in loader]


def loader_rates(info, pipeline: str, batch: int, repeats: int, workers: int) -> dict:
    """Images/s of the three loaders: a warm-up epoch each, then `repeats` rounds of one measurement of
    each, in turn; a measurement runs whole epochs for at least MIN_WINDOW_S (a 4,000-image epoch
    can take 0.07 s, short enough for one descheduling to halve its rate)."""
    from cskd.batch import LoaderSpec, Shard
    from cskd.loaders import train_loader

    def ours(kind):
        loader = train_loader(LoaderSpec(dataset=info, batch_per_rank=batch, pipeline=pipeline, device=CPU,
                                         loader=kind), Shard())
        return lambda epoch: [b.images.sum() for b in loader.epoch(epoch)]

    runs = {"device": ours("device"), "ffcv": ours("ffcv"), "dataloader": dataloader_epochs(info, pipeline, batch,
                                                                                              workers)}
    n, epoch = len(info.labels["train"]), 1
    for run in runs.values():
        run(0)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start, images = stamp(CPU), 0
            while not images or stamp(CPU) - start < MIN_WINDOW_S:
                run(epoch)
                epoch, images = epoch + 1, images + n
            rates[name].append(images / (stamp(CPU) - start))
    return {name: summary(r) for name, r in rates.items()}


def synthetic_dataset(root: Path, n: int, size: int):
    """A prepared dataset of `n` random size x size training images stored raw (one fixed size) and 10 test
    images, written with FFCV directly (the package does not depend on `datasets_prep`)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    from cskd.dataset import open_dataset

    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, k in (("train", n), ("test", 10)):
        samples = [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), i % 10, i) for i in range(k)]
        fields = {"image": RGBImageField(write_mode="raw"), "label": IntField(), "index": IntField()}
        with contextlib.redirect_stderr(io.StringIO()):  # FFCV's progress bar
            DatasetWriter(str(root / f"{split}.beton"), fields, num_workers=1).from_indexed_dataset(samples)
    meta = {"name": "synthetic", "num_classes": 10, "files": {}, "mean": [0.5] * 3, "std": [0.25] * 3}
    (root / "meta.json").write_text(json.dumps(meta))
    return open_dataset(str(root))


def loader_line(rates: dict, workers: int) -> str:
    plain = rates["dataloader"]["median"]
    return (f"device {shown(rates['device'])} | FFCV {shown(rates['ffcv'])} | torch DataLoader ({workers} workers, "
            f"torchvision) {shown(rates['dataloader'])} | device/DataLoader {rates['device']['median'] / plain:.1f}x, "
            f"FFCV/DataLoader {rates['ffcv']['median'] / plain:.1f}x")


# --- CPU (b): CS-KD against CE ---------------------------------------------------------------------

def setup_runs(model_name: str, info, batch: int, device: torch.device, channels_last: bool = False,
               data: tuple | None = None, pipeline: str = "cifar", methods: tuple = ("ce", "cskd")):
    """(net, optimizer, {method: (method, device loader)}) as the trainer builds them: one network and
    SGD shared by methods that leave the network as it is (CE, CS-KD), so a compiled network is
    compiled once for all of them. `data`: a synthetic split already on `device`."""
    from cskd.batch import LoaderSpec
    from cskd.device_loader import DeviceTrainLoader
    from cskd.methods import METHODS
    from cskd.models import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_model(model_name, info.num_classes).to(device, memory_format=fmt)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    runs = {}
    for name in methods:
        method = METHODS[name](METHODS[name].Params(), info.num_classes)
        spec = LoaderSpec(dataset=info, batch_per_rank=batch, sampling=method.sampling(), pipeline=pipeline,
                          device=device, channels_last=channels_last, loader="device")
        runs[name] = (method, DeviceTrainLoader(spec, data=data))
    return net, optimizer, runs


def compare_methods(model, optimizer, runs: dict, steps: int, repeats: int, device: torch.device,
                    amp: bool = False) -> dict:
    """Seconds per epoch (its first `steps` steps; 0: all) and per phase of each of `runs` ({name:
    (method, loader)}) training `model`, after a warm-up epoch each; the timed epochs alternate
    between the runs (ABAB...), so a change in machine load hits all of them alike."""
    for method, loader in runs.values():
        train_steps(model, method, first_steps(loader, 0, steps), optimizer, PhaseClock(device, False), amp)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    phases: dict[str, list[dict]] = {name: [] for name in runs}
    anchors: dict[str, int] = {}
    for epoch in range(1, repeats + 1):
        for name, (method, loader) in runs.items():
            clock = PhaseClock(device, device.type == "cpu")  # host marks are free; CUDA events are not
            start = stamp(device)
            anchors[name] = train_steps(model, method, first_steps(loader, epoch, steps), optimizer, clock, amp)
            seconds[name].append(stamp(device) - start)
            phases[name].append(clock.totals())
    return {name: {"epoch_s": summary(seconds[name]), "anchors": anchors[name],
                   "phase_s": {p: statistics.median(t.get(p, 0.0) for t in phases[name]) for p in PHASES}}
            for name in runs}


def ratios(result: dict) -> dict:
    """CS-KD's epoch time over CE's: of the medians, and of each alternating pair (CE then CS-KD)."""
    ce, cskd = result["ce"]["epoch_s"], result["cskd"]["epoch_s"]
    return {"of_medians": cskd["median"] / ce["median"],
            "pairs": summary([b / a for a, b in zip(ce["values"], cskd["values"])])}


def ratio_lines(result: dict, steps_per_epoch: int) -> list[str]:
    lines = []
    for name in ("ce", "cskd"):
        per_step = " ".join(f"{p} {result[name]['phase_s'][p] / steps_per_epoch:.3f}" for p in PHASES)
        lines.append(f"  {name:4s} s/epoch {shown(result[name]['epoch_s'], '.2f')} | s/step: {per_step}")
    r = ratios(result)
    lines.append(f"  cskd/ce {r['of_medians']:.2f} (ratio of the medians; per CE/CS-KD pair "
                 f"{shown(r['pairs'], '.2f')}; ideal ~1.33, target <= 1.35)")
    return lines


# --- command line ----------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cskd.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/mnist5k", help="prepared 32x32 dataset (CPU mode)")
    parser.add_argument("--model", default="preact_resnet18", help="model of the CE vs CS-KD comparison (CPU mode)")
    parser.add_argument("--batch", type=int, help="anchors per step, CPU mode (default 128; --quick 64)")
    parser.add_argument("--steps", type=int, help="steps per CE / CS-KD epoch, 0: whole epochs, CPU mode "
                                                     "(default 4; --quick 2)")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per figure (the median is reported)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch intra-op threads (default: all cores)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the baseline (CPU mode)")
    parser.add_argument("--large", type=int, help="synthetic 256x256 images for the 224 px loaders, 0: skip, "
                                                  "CPU mode (default 2000; --quick 256)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes: a few minutes on 2 CPU cores (and a shorter --gpu run)")
    parser.add_argument("--gpu", action="store_true", help="the GPU benchmarks (cskd.bench_gpu) instead")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    quick = {"batch": (128, 64), "steps": (4, 2), "large": (2000, 256)}
    for key, (full, small) in quick.items():
        if getattr(args, key) is None:
            setattr(args, key, small if args.quick else full)
    return args


def check_args(args) -> None:
    from cskd.models import MODELS

    if args.model not in MODELS:
        raise ConfigError(f"--model {args.model} is not a model; choose from {', '.join(sorted(MODELS))}")
    for key in ("batch", "repeats", "threads"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key} must be >= 1, got {getattr(args, key)}")
    if args.gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu needs CUDA")


class Report:
    """The results so far, printed as they come and (with `--json`) rewritten after every section, so
    a run cut short still leaves its figures."""

    def __init__(self, path: str | None, **head):
        self.path, self.data = path, dict(head)

    def add(self, key: str, value) -> None:
        self.data[key] = value
        if self.path:
            write_json(self.path, self.data)


def run_cpu(args, report: Report) -> None:
    from cskd.dataset import open_dataset

    info = open_dataset(args.data)
    say(f"data {args.data}: {len(info.labels['train'])} train images {info.image_shape['train']}, batch {args.batch}, "
        f"medians of {args.repeats}")
    rates = loader_rates(info, "cifar", args.batch, args.repeats, args.workers)
    say(f"(a) loader img/s, 32x32 pad-4 crop + flip: {loader_line(rates, args.workers)}")
    report.add("loaders_32", rates)
    if args.large:
        tmp = Path(tempfile.mkdtemp(prefix="cskd-bench-"))
        try:
            large = synthetic_dataset(tmp / "synthetic256", args.large, 256)
            rates = loader_rates(large, "imagenet224", args.batch, args.repeats, args.workers)
            say(f"(a) loader img/s, {args.large} stored 256x256 -> RandomResizedCrop(224) + flip: "
                f"{loader_line(rates, args.workers)}")
            report.add("loaders_224", rates)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    net, optimizer, runs = setup_runs(args.model, info, args.batch, CPU)
    steps = min(args.steps or len(runs["ce"][1]), len(runs["ce"][1]))
    say(f"(b) {args.model}, {info.num_classes} classes, {args.batch} anchors per step (CS-KD: + as many partners), "
        f"{steps} steps per epoch, epochs alternating ce, cskd:")
    result = compare_methods(net, optimizer, runs, args.steps, args.repeats, CPU)
    for line in ratio_lines(result, steps):
        say(line)
    report.add("ce_vs_cskd", {"model": args.model, "batch": args.batch, "steps": steps, **result,
                              "cskd_over_ce": ratios(result)})


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        check_args(args)
        torch.set_num_threads(args.threads)
        head = machine(args.threads)
        report = Report(args.json, machine=head, args=vars(args))
        say(f"machine: {head['cpu']}, {head['cores']} cores, torch {head['torch']}, {args.threads} threads, "
            f"load average {head['load_avg_1m']}")
        warn_if_busy(args.threads)
        if args.gpu:
            from cskd.bench_gpu import run_gpu

            run_gpu(args, report)
        else:
            run_cpu(args, report)
        end = {"threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2)}
        say(f"done: {end['threads']} torch threads, load average {end['load_avg_1m']}")
        warn_if_busy(args.threads, own=args.threads)
        report.add("end", end)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
