"""The CS-KD paper's hierarchical "mixed" dataset (Yun et al., CVPR 2020, Sec. 4.3, Fig. 4).

"A mixed dataset with 387 fine-grained labels and three hierarchy labels, i.e., bird
(CUB-200-2011; 200 labels), dog (Stanford Dogs; 120 labels), and indoor (MIT67; 67 labels).
[...] we randomly choose 30 samples per each fine-grained label for training, and original test
datasets are used for the test."

Labels: the 200 CUB classes (their own order, class_id - 1), then the 120 Dogs breeds (sorted
folders), then the 67 MIT67 classes (sorted folders), each read by its own reader.
Train: for fine label c, --per-class images drawn without replacement from that class's official
training images (sorted by path) with numpy.random.default_rng([seed, c]), so one class's subset
does not depend on any other class; the chosen ones are kept in path order. A class with fewer
official training images keeps them all and is listed in extra['short_classes'] (with 30, some
CUB classes: its official split has 5,994 < 200 x 30). Test: the three official test sets in full.

Where the parts are: --cub / --dogs / --mit67, or by default under --src:
`CUB_200_2011/`, the first of `StanfordDogs/`, `Stanford_Dogs/`, `stanford_dogs/` (`Images/` +
the .mat lists), and the first of `indoorCVPR_09/`, `MIT67/` (`Images/` + the two .txt lists).
Each part may be given in any form its own reader accepts, archives as downloaded included
(`CUB_200_2011.tgz` in --src or as --cub, `images.tar` + `lists.tar` in the Dogs folder,
`indoorCVPR_09.tar` + the lists in the MIT67 folder): every part path is opened through
datasets_prep.archive.open_src.
"""
from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from datasets_prep.archive import ArchivePath, as_path, open_src
from datasets_prep.source import Source, check_classes, check_counts

# (reader module, --option, default folder names under --src, superclass), in label order
PARTS = (("cub200", "cub", ("CUB_200_2011",), "bird"),
         ("dogs", "dogs", ("StanfordDogs", "Stanford_Dogs", "stanford_dogs"), "dog"),
         ("mit67", "mit67", ("indoorCVPR_09", "MIT67"), "indoor"))


def add_arguments(parser) -> None:
    parser.add_argument("--per-class", type=int, default=30,
                        help="training images per fine label (paper: 30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class training subset")
    for _, option, names, _ in PARTS:
        parser.add_argument(f"--{option}", default=None,
                            help=f"directory of this part (default: SRC/{names[0]})")


def locate(src: Path | ArchivePath | None, option: str, names: tuple[str, ...], args) -> Path | ArchivePath:
    given = getattr(args, option, None)
    if given:
        return Path(given)
    for name in names:
        if src is not None and (src / name).is_dir():
            return src / name
    raise DataError(f"no {' or '.join(names)} under {src}; pass --{option} DIR or put it there")


def subset(samples: list, label: int, per_class: int, seed: int) -> list:
    """`per_class` of one class's samples, drawn with default_rng([seed, label]), in path order."""
    samples = sorted(samples, key=lambda s: str(s[0]))
    if len(samples) <= per_class:
        return samples
    pick = np.random.default_rng([seed, label]).choice(len(samples), size=per_class, replace=False)
    return [samples[i] for i in sorted(pick)]


def read(src: Path | ArchivePath | None, args=None) -> Source:
    """Read the three parts and build the mixed dataset (see the module docstring)."""
    per_class, seed = getattr(args, "per_class", 30), getattr(args, "seed", 0)
    if per_class < 1:
        raise DataError(f"--per-class must be at least 1, got {per_class}")
    if seed < 0:  # numpy's default_rng takes non-negative seeds only
        raise DataError(f"--seed must be 0 or more, got {seed}")
    src = as_path(src) if src is not None else None
    classes, superclass_of_class, files, parts, problems, skipped = [], [], {}, {}, [], []
    by_label: dict[int, list] = {}
    test, test_expected = [], 0
    for module, option, names, superclass in PARTS:
        where = open_src(locate(src, option, names, args), skip_bad=getattr(args, "skip_bad", False))
        if isinstance(where, ArchivePath) and where.tree is not getattr(src, "tree", None):
            skipped += where.tree.problems  # a tree opened here (--src's own is reported by the CLI)
        part = importlib.import_module(f"datasets_prep.{module}").read(where, args)
        # a partial part would make the subset silently smaller: check it like the part itself
        problems += check_counts(part, strict=not getattr(args, "allow_count_mismatch", False))
        offset = len(classes)
        for path, label in part.splits["train"]:
            by_label.setdefault(offset + label, []).append((path, offset + label))
        test += [(path, offset + label) for path, label in part.splits["test"]]
        test_expected += (part.expected or {}).get("test", len(part.splits["test"]))
        classes += part.classes
        superclass_of_class += [superclass] * len(part.classes)
        files.update({f"{module}/{name}": digest for name, digest in part.files.items()})
        parts[module] = {"offset": offset, "classes": len(part.classes)}
    train, short = [], {}
    for label in range(len(classes)):
        chosen = subset(by_label.get(label, []), label, per_class, seed)
        if len(chosen) < per_class:
            short[classes[label]] = len(chosen)
        train += chosen
    extra = {"superclasses": [p[3] for p in PARTS], "superclass_of_class": superclass_of_class,
             "parts": parts, "short_classes": short}
    if problems:
        extra["part_count_problems"] = problems
    # train: what the recipe yields from complete parts (their counts were checked above)
    expected = {"train": len(train), "test": test_expected}
    source = Source("mixed", classes, {"train": train, "test": test}, files, expected, extra,
                    params={"per_class": per_class, "seed": seed}, skipped=skipped)
    check_classes(source)
    return source
