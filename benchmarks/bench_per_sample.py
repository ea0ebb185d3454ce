"""What the per-sample training records cost (cskd.sample_log): the bitmap always, the probabilities
with `log_per_sample: true`.

    python benchmarks/bench_per_sample.py [--model preact_resnet18] [--steps 20] [--repeats 3] [--data DIR]

Two measurements:
1. Per step and per epoch, at CIFAR-100's and ImageNet's shapes: the recorder's `observe` (its
   share of a step) against a measured training step of `--model` (forward, backward, SGD step) on
   this machine, and `end_epoch` + `append_rows` (the reduction and the file append) once per epoch.
   The epoch overhead is (steps x observe + end of epoch) / (steps x training step).
2. With `--data` (a prepared dataset, e.g. mnist5k): whole `cskd.train` runs with log_per_sample
   off and on, alternating, `--repeats` times each; the median training time of an epoch
   (metrics.jsonl `train.time_s`, epochs after the first).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from cskd import sample_log  # noqa: E402
from cskd.models import build_model  # noqa: E402

SHAPES = {"CIFAR-100": (50_000, 100, 128, 32), "ImageNet": (1_281_167, 1000, 256, 224)}  # N, classes, batch, size


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_time(model_name: str, classes: int, batch: int, size: int, steps: int) -> float:
    """Median seconds of one training step (forward, backward, SGD) of `model_name` on random images."""
    torch.manual_seed(0)
    model = build_model(model_name, classes).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, labels = torch.randn(batch, 3, size, size), torch.randint(0, classes, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _median_time(step, steps)


def recorder_costs(samples: int, classes: int, batch: int, probabilities: bool) -> tuple[float, float]:
    """(seconds of one `observe` of a batch, seconds of `end_epoch` + `append_rows`) on this CPU."""
    rec = sample_log.SampleRecorder(samples, torch.device("cpu"), probabilities)
    logits, labels = torch.randn(batch, classes), torch.randint(0, classes, (batch,))
    index, right = torch.randperm(samples)[:batch], logits.argmax(1) == labels  # the trainer has `right` already
    observe = _median_time(lambda: rec.observe(index, right, logits, labels), 200)
    with tempfile.TemporaryDirectory() as out:
        epoch = iter(range(10**6))
        end = _median_time(lambda: sample_log.append_rows(out, next(epoch), samples, rec.end_epoch(True)), 5)
    return observe, end


def per_step(args) -> None:
    print(f"1. recorder against a training step of {args.model} (this machine's CPU, "
          f"{torch.get_num_threads()} threads)")
    for name, (samples, classes, batch, size) in SHAPES.items():
        size = 32 if args.model.startswith(("preact", "small")) else size  # CIFAR models take 32x32
        step = step_time(args.model, classes, batch, size, args.steps)
        steps = -(-samples // batch)
        for probabilities in (False, True):
            observe, end = recorder_costs(samples, classes, batch, probabilities)
            share = (steps * observe + end) / (steps * step)
            what = "bitmap + probabilities" if probabilities else "bitmap only"
            print(f"  {name:<9} N={samples:>9,} C={classes:>4} batch {batch}: {what:<22} observe "
                  f"{observe * 1e6:7.1f} us/step vs step {step * 1e3:7.1f} ms; end of epoch {end * 1e3:7.1f} ms; "
                  f"epoch overhead {100 * share:.3f}%")


def epoch_times(data: str, log: bool, out: Path) -> list[float]:
    args = [sys.executable, "-m", "cskd.train", "--config", str(ROOT / "configs" / "mnist5k_small_cnn.yaml"),
            f"data.path={data}", f"out_dir={out}", "epochs=4", "data.loader=device", f"log_per_sample={log}",
            "--force"]
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["train"]["time_s"] for line in lines[1:]]  # the first epoch warms up


def whole_runs(args) -> None:
    print(f"2. cskd.train on {args.data} (small_cnn, 4 epochs; median train time of epochs 2-4, runs alternating)")
    times = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for log in (False, True):
                times[log] += epoch_times(args.data, log, Path(tmp) / f"run{log}")
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(f"  log_per_sample=false {off:.3f} s/epoch, true {on:.3f} s/epoch: {100 * (on / off - 1):+.2f}% "
          f"({len(times[False])} epochs each)")
    for log in (False, True):  # the single values: on a shared VM the spread dwarfs the recorder's cost
        print(f"    {str(log).lower():<5} " + " ".join(f"{t:.2f}" for t in sorted(times[log])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="preact_resnet18")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", help="a prepared dataset for whole runs (e.g. data/mnist5k)")
    args = parser.parse_args()
    per_step(args)
    if args.data:
        whole_runs(args)


if __name__ == "__main__":
    main()
