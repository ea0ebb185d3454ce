"""Benchmarks (figures, not tests): `python benchmarks/bench.py [--data DIR] [--model small_cnn]` (`make bench`).

(a) Training-loader throughput, same images and augmentation, three ways: the device-resident
    loader (`data.loader=device`: split held as one uint8 tensor, batched torch augmentation), the
    FFCV loader the trainer uses by default (FFCV decode threads + the same torch augmentation), and
    a torch DataLoader with torchvision transforms on PIL images (2 persistent workers). Twice: at
    32x32 (`--data`, pad-4 crop + flip) and at 224x224 (a synthetic fixed-size set of `--large`
    256x256 images written with FFCV, RandomResizedCrop(224) + flip).
(b) Time per training epoch of CS-KD divided by that of CE, same model, data and anchors per step
    (ideal about 1.33: one extra no-grad forward per anchor).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import shutil
import statistics
import tempfile
import time

import numpy as np
import torch

CPU = torch.device("cpu")


def _timed_epochs(run_epoch, epochs: int) -> list[float]:
    times = []
    for e in range(epochs):
        start = time.perf_counter()
        run_epoch(e)
        times.append(time.perf_counter() - start)
    return times


def ours_rate(info, loader_kind: str, pipeline: str, batch: int, epochs: int) -> float:
    """Images/s of our training loader, median of `epochs` after a warm-up (FFCV's JIT)."""
    from cskd.batch import LoaderSpec, Shard
    from cskd.loaders import train_loader

    spec = LoaderSpec(dataset=info, batch_per_rank=batch, pipeline=pipeline, device=CPU, loader=loader_kind)
    loader = train_loader(spec, Shard())
    times = _timed_epochs(lambda e: [b.images.sum() for b in loader.epoch(e)], epochs + 1)[1:]
    return len(info.labels["train"]) / statistics.median(times)


def torch_loader_rate(info, pipeline: str, batch: int, epochs: int, workers: int) -> float:
    """Images/s of a torch DataLoader doing the pipeline with torchvision on PIL images."""
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
    times = _timed_epochs(lambda e: [x.sum() for x, _ in loader], epochs + 1)[1:]  # 1st: worker start
    return len(labels) / statistics.median(times)


def synthetic_dataset(root: str, n: int, size: int) -> str:
    """A prepared dataset of `n` random size x size images (raw FFCV, fixed size) and 10 test images."""
    from datasets_prep.source import Source
    from datasets_prep.writer import write_source

    rng = np.random.default_rng(0)
    splits = {split: [(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), int(rng.integers(0, 10)))
                      for _ in range(k)] for split, k in (("train", n), ("test", 10))}
    source = Source("synthetic", [str(c) for c in range(10)], splits)
    with contextlib.redirect_stderr(io.StringIO()):  # progress lines
        write_source(root, source, write_mode="raw")
    return root


def loader_table(info, pipeline: str, batch: int, epochs: int, workers: int) -> str:
    rates = {kind: ours_rate(info, kind, pipeline, batch, epochs) for kind in ("device", "ffcv")}
    plain = torch_loader_rate(info, pipeline, batch, epochs, workers)
    return (f"device {rates['device']:,.0f} | FFCV {rates['ffcv']:,.0f} | torch DataLoader ({workers} workers, "
            f"torchvision) {plain:,.0f} | device/DataLoader {rates['device'] / plain:.1f}x, "
            f"FFCV/DataLoader {rates['ffcv'] / plain:.1f}x")


def method_epoch_time(data: str, method: str, model: str, epochs: int, max_steps: int) -> float:
    """Median seconds per training epoch (first epoch excluded), through the trainer's own code."""
    from cskd import distributed as D
    from cskd.batch import Shard
    from cskd.config import load_config
    from cskd.dataset import open_dataset
    from cskd.loaders import loader_spec, train_loader
    from cskd.methods import METHODS
    from cskd.models import build_model
    from cskd.train import train_one_epoch

    cfg = load_config(None, [f"data.path={data}", f"method={method}", f"model={model}", "data.pipeline=cifar",
                             "log_every=1000000", f"epochs={epochs + 1}"])
    info = open_dataset(data)
    env = D.DistEnv(0, 1, 0, CPU)
    torch.manual_seed(0)
    algo = METHODS[method](cfg.method_params, info.num_classes)
    net = build_model(model, info.num_classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    spec = loader_spec(cfg, info, world_size=1, device=CPU, sampling=algo.sampling(), num_views=algo.num_views)
    loader = train_loader(spec, Shard())
    if max_steps:
        full = loader.epoch
        loader.epoch = lambda e: (b for b, _ in zip(full(e), range(max_steps)))
    times = _timed_epochs(lambda e: train_one_epoch(net, algo, loader, opt, e, cfg, env), epochs + 1)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/bench.py", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/mnist5k", help="prepared dataset (32x32)")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (slow models on CPU)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--large", type=int, default=2000,
                        help="synthetic 256x256 images for the 224 px case (0: skip)")
    args = parser.parse_args(argv)
    from cskd.dataset import open_dataset

    info = open_dataset(args.data)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; data {args.data} ({len(info.labels['train'])} "
          f"train images {info.meta['image_size']}), batch {args.batch}", flush=True)
    table = loader_table(info, "cifar", args.batch, args.epochs, args.workers)
    print(f"(a) loader img/s, 32x32 pad-4 crop + flip: {table}", flush=True)
    if args.large:
        tmp = tempfile.mkdtemp(prefix="cskd-bench-")
        try:
            large = open_dataset(synthetic_dataset(os.path.join(tmp, "synthetic256"), args.large, 256))
            table = loader_table(large, "imagenet224", args.batch, 2, args.workers)
            print(f"(a) loader img/s, {args.large} stored 256x256 -> RandomResizedCrop(224) + flip: {table}",
                  flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    ce = method_epoch_time(args.data, "ce", args.model, args.epochs, args.max_steps)
    cskd = method_epoch_time(args.data, "cskd", args.model, args.epochs, args.max_steps)
    steps = f" ({args.max_steps} steps)" if args.max_steps else ""
    print(f"(b) {args.model} epoch time{steps}: ce {ce:.2f} s | cskd {cskd:.2f} s | cskd/ce {cskd / ce:.2f} "
          f"(ideal ~1.33)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
