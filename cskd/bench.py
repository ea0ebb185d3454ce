"""Benchmarks (figures, not tests): `python -m cskd.bench [--data DIR] [--model small_cnn]`.

(a) Training-loader throughput: the FFCV pipeline the trainer uses (decode, pad-4 crop + flip,
    normalise; batched in torch) against a torch DataLoader with torchvision transforms doing the
    same augmentation on the same images (PIL, 2 workers, persistent).
(b) Time per training epoch of CS-KD divided by that of CE, same model, data and anchors per step
    (ideal about 1.33: one extra no-grad forward per anchor).
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def _timed_epochs(run_epoch, epochs: int) -> list[float]:
    times = []
    for e in range(epochs):
        start = time.perf_counter()
        run_epoch(e)
        times.append(time.perf_counter() - start)
    return times


def ffcv_loader_rate(info, batch: int, epochs: int) -> float:
    from cskd.data import TrainLoader
    from cskd.methods import Sampling

    loader = TrainLoader(info, batch, 1, 0, 0, Sampling(), 1, "cifar", 1, True, torch.device("cpu"), False)
    n = len(info.labels["train"])
    times = _timed_epochs(lambda e: [b.images.sum() for b in loader.epoch(e)], epochs + 1)[1:]  # 1st: JIT
    return n / statistics.median(times)


def torch_loader_rate(info, batch: int, epochs: int, workers: int) -> float:
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor
    from PIL import Image
    from torchvision import transforms as T

    n = len(info.labels["train"])
    raw = Loader(info.beton("train"), batch_size=n, order=OrderOption.SEQUENTIAL, num_workers=1,
                 pipelines={"image": [SimpleRGBImageDecoder(), ToTensor()], "label": [IntDecoder(), ToTensor()],
                            "index": None})
    images, labels = (t.numpy().copy() for t in next(iter(raw)))
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(info.meta["mean"], info.meta["std"])])

    class Images(torch.utils.data.Dataset):
        def __len__(self):
            return n

        def __getitem__(self, i):
            return transform(Image.fromarray(images[i])), int(labels[i, 0])

    loader = torch.utils.data.DataLoader(Images(), batch_size=batch, shuffle=True, num_workers=workers,
                                         persistent_workers=workers > 0)
    times = _timed_epochs(lambda e: [x.sum() for x, _ in loader], epochs + 1)[1:]  # 1st: worker start
    return n / statistics.median(times)


def method_epoch_time(data: str, method: str, model: str, epochs: int, max_steps: int) -> float:
    """Median seconds per training epoch (first epoch excluded), through the trainer's own code."""
    from cskd import distributed as D
    from cskd.config import load_config
    from cskd.data import TrainLoader, open_dataset
    from cskd.methods import METHODS
    from cskd.models import build_model
    from cskd.train import train_one_epoch

    cfg = load_config(None, [f"data.path={data}", f"method={method}", f"model={model}", "data.augment=cifar",
                             "log_every=1000000", f"epochs={epochs + 1}"])
    info = open_dataset(data)
    env = D.DistEnv(0, 1, 0, torch.device("cpu"))
    torch.manual_seed(0)
    algo = METHODS[method](cfg.method_params, info.num_classes)
    net = build_model(model, info.num_classes)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    loader = TrainLoader(info, cfg.batch_size, 1, 0, 0, algo.sampling(), 1, "cifar", 1, True, env.device, False)
    if max_steps:
        full = loader.epoch
        loader.epoch = lambda e: (b for b, _ in zip(full(e), range(max_steps)))
    times = _timed_epochs(lambda e: train_one_epoch(net, algo, loader, opt, e, cfg, env), epochs + 1)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cskd.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/mnist5k", help="prepared dataset (32x32)")
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs after one warm-up epoch")
    parser.add_argument("--max-steps", type=int, default=0, help="cap steps per epoch (slow models on CPU)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    args = parser.parse_args(argv)
    from cskd.data import open_dataset

    info = open_dataset(args.data)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; data {args.data} ({len(info.labels['train'])} "
          f"train images {info.meta['image_size']}), batch {args.batch}", flush=True)
    ffcv = ffcv_loader_rate(info, args.batch, args.epochs)
    plain = torch_loader_rate(info, args.batch, args.epochs, args.workers)
    print(f"(a) loader img/s: FFCV + batched torch aug {ffcv:,.0f} | torch DataLoader ({args.workers} workers, "
          f"torchvision) {plain:,.0f} | ratio {ffcv / plain:.1f}x", flush=True)
    ce = method_epoch_time(args.data, "ce", args.model, args.epochs, args.max_steps)
    cskd = method_epoch_time(args.data, "cskd", args.model, args.epochs, args.max_steps)
    steps = f" ({args.max_steps} steps)" if args.max_steps else ""
    print(f"(b) {args.model} epoch time{steps}: ce {ce:.2f} s | cskd {cskd:.2f} s | cskd/ce {cskd / ce:.2f} "
          f"(ideal ~1.33)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
