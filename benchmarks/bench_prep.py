"""Images/s per core of `python -m datasets_prep` on fabricated replicas of the real layouts.

    python benchmarks/bench_prep.py [--work DIR] [--workers 2] [--code REPO] [--sets cifar100,cub,...]

Sets (each built once under --work, then converted into a fresh output directory):
  cifar100         CIFAR-100 python pickles, 50,000 + 10,000 random 32x32 images (stored raw)
  cub, cub256      a CUB-200-2011 tree of --jpegs smooth-noise 500x375 JPEGs (q90, ~50 KB), full size
                   ('smart': JPEG q90) and --max-side 256
  imagenet-tree    an ImageNet tree (train/<wnid>/*.JPEG, val/<wnid>/) of --jpegs such JPEGs
  imagenet-tar     the same images as ILSVRC2012_img_train.tar (one nested tar per class) + val/ folders
  ffcv-imagenet    the anchor: the imagenet-tree images written as ffcv-imagenet's write_imagenet.py writes
                   ImageNet for ResNet-50 (torchvision ImageFolder, FFCV's DatasetWriter, RGBImageField
                   write_mode=proportion, max_resolution=500, compress_probability=0.5, jpeg_quality=90,
                   chunk_size 100), with --workers writer processes
--code runs another checkout's converter (e.g. the previous version, for a before/after table);
a set that checkout cannot read is reported as such. Prints one markdown row per set: wall time
(with Python's start-up and imports) and the converter's own time (its summary's `time:`).
"""
from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SIZE = (500, 375)


def smooth_jpeg(rng: np.random.Generator) -> bytes:
    """A 500x375 JPEG of upscaled noise plus grain: about the size and entropy of a photo."""
    base = Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).resize(SIZE, Image.Resampling.BICUBIC)
    pixels = np.asarray(base).astype(np.int16) + rng.integers(-6, 7, (SIZE[1], SIZE[0], 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def build_cifar100(root: Path) -> Path:
    rng = np.random.default_rng(0)
    src = root / "cifar-100-python"
    src.mkdir(parents=True)
    for split, n in (("train", 50000), ("test", 10000)):
        fine = rng.integers(0, 100, n).tolist()
        with open(src / split, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": fine,
                         "coarse_labels": [y // 5 for y in fine], "filenames": [], "batch_label": split}, f)
    with open(src / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"c{i}" for i in range(100)],
                     "coarse_label_names": [f"s{i}" for i in range(20)]}, f)
    return src


def build_cub(root: Path, n: int) -> Path:
    rng = np.random.default_rng(1)
    src = root / "CUB_200_2011"
    classes = [f"{i:03d}.Bird_{i}" for i in range(1, 21)]
    lines = {"images.txt": [], "image_class_labels.txt": [], "train_test_split.txt": []}
    for i in range(1, n + 1):
        c = (i - 1) % len(classes) + 1
        rel = f"{classes[c - 1]}/img_{i:05d}.jpg"
        (src / "images" / classes[c - 1]).mkdir(parents=True, exist_ok=True)
        (src / "images" / rel).write_bytes(smooth_jpeg(rng))
        lines["images.txt"].append(f"{i} {rel}")
        lines["image_class_labels.txt"].append(f"{i} {c}")
        lines["train_test_split.txt"].append(f"{i} {int((i - 1) // len(classes) % 2 == 0)}")
    for name, rows in lines.items():
        (src / name).write_text("\n".join(rows) + "\n")
    (src / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    return src


def build_imagenet(root: Path, n: int) -> tuple[Path, Path]:
    """(tree, tar form) with the same images: n train images over 10 classes, n/10 val."""
    rng = np.random.default_rng(2)
    tree, tars = root / "imagenet-tree", root / "imagenet-tar"
    wnids = [f"n{1440764 + 7 * k:08d}" for k in range(10)]
    for split, count in (("train", n), ("val", max(10, n // 10))):
        for i in range(count):
            wnid = wnids[i % 10]
            path = tree / split / wnid / f"{wnid}_{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(smooth_jpeg(rng))
    tars.mkdir()
    shutil.copytree(tree / "val", tars / "val")
    with tarfile.open(tars / "ILSVRC2012_img_train.tar", "w", format=tarfile.GNU_FORMAT) as outer:
        for wnid in wnids:
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w", format=tarfile.GNU_FORMAT) as t:
                for f in sorted((tree / "train" / wnid).iterdir()):
                    t.add(f, arcname=f.name)
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = inner.tell()
            inner.seek(0)
            outer.addfile(info, inner)
    return tree, tars


def convert(code: Path, name: str, src: Path, out: Path, workers: int, *extra: str) -> tuple[float, float, int] | str:
    """(wall seconds, the converter's own seconds, images) of one conversion, or the error line of a failed one."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "datasets_prep", name, "--src", str(src), "--out", str(out), "--workers", str(workers),
           "--allow-count-mismatch", *extra]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=code, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(code)})
    wall = time.perf_counter() - start
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["failed"])[-1]
    images = sum(int(n) for n in re.findall(r"^\s+\w+: (\d+) images$", res.stdout, re.M))
    own = float(re.search(r"^\s+time: ([\d.]+) s", res.stdout, re.M).group(1))  # without start-up and imports
    shutil.rmtree(out, ignore_errors=True)
    return wall, own, images


ANCHOR = r"""
import sys, time
from torchvision.datasets import ImageFolder
from ffcv.fields import IntField, RGBImageField
from ffcv.writer import DatasetWriter
root, out, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
start, images = time.perf_counter(), 0
for split in ("train", "val"):
    dataset = ImageFolder(f"{root}/{split}")
    fields = {"image": RGBImageField(write_mode="proportion", max_resolution=500, compress_probability=0.5,
                                     jpeg_quality=90), "label": IntField()}
    DatasetWriter(f"{out}/{split}.beton", fields, num_workers=workers).from_indexed_dataset(dataset, chunksize=100)
    images += len(dataset)
print(f"  train: {images} images\n  time: {time.perf_counter() - start:.1f} s")
"""


def anchor(src: Path, out: Path, workers: int) -> tuple[float, float, int] | str:
    """`convert`'s figures for ffcv-imagenet's way of writing (see ANCHOR), on `src` (an ImageNet tree)."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", ANCHOR, str(src), str(out), str(workers)], capture_output=True,
                         text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    if res.returncode != 0:
        return (res.stderr.strip().splitlines() or ["failed"])[-1]
    images = int(re.search(r"train: (\d+) images", res.stdout).group(1))
    return wall, float(re.search(r"time: ([\d.]+) s", res.stdout).group(1)), images


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_prep"), help="where replicas are built (kept)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--jpegs", type=int, default=1000, help="JPEGs in the CUB and ImageNet replicas")
    p.add_argument("--code", type=Path, default=REPO, help="checkout whose converter runs (default: this one)")
    p.add_argument("--sets", default="cifar100,cub,cub256,imagenet-tree,imagenet-tar,ffcv-imagenet")
    args = p.parse_args()
    work = args.work
    sources = {}
    if not (work / "cifar").is_dir():
        build_cifar100(work / "cifar")
    if not (work / "cub").is_dir():
        build_cub(work / "cub", args.jpegs)
    if not (work / "imagenet").is_dir():
        build_imagenet(work / "imagenet", args.jpegs)
    sources = {"cifar100": ("cifar100", work / "cifar" / "cifar-100-python", ()),
               "cub": ("cub200", work / "cub" / "CUB_200_2011", ()),
               "cub256": ("cub200", work / "cub" / "CUB_200_2011", ("--max-side", "256")),
               "imagenet-tree": ("imagenet", work / "imagenet" / "imagenet-tree", ()),
               "imagenet-tar": ("imagenet", work / "imagenet" / "imagenet-tar", ())}
    print(f"converter: {args.code}, --workers {args.workers}, {os.cpu_count()} cores")
    print("| set | images | wall s | converter s | images/s (wall) | images/s per core (converter) |\n"
          "|---|---|---|---|---|---|")
    for name in args.sets.split(","):
        if name == "ffcv-imagenet":
            result = anchor(work / "imagenet" / "imagenet-tree", work / "out", args.workers)
        else:
            reader, src, extra = sources[name]
            result = convert(args.code, reader, src, work / "out", args.workers, *extra)
        if isinstance(result, str):
            print(f"| {name} | - | - | - | - | failed: {result} |", flush=True)
            continue
        wall, own, images = result
        per_core = images / own / args.workers
        print(f"| {name} | {images} | {wall:.1f} | {own:.1f} | {images / wall:.0f} | {per_core:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
