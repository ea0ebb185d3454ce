"""TinyImageNet-200 (200 classes, 100,000 train / 10,000 labelled val images, 64x64).

--src is `tiny-imagenet-200/` or the directory holding it, or the archive as downloaded,
`tiny-imagenet-200.zip` (read in place, see datasets_prep.archive), or a directory holding that:
`wnids.txt` (the 200 wnids, NOT sorted), `train/<wnid>/images/<wnid>_<k>.JPEG`,
`val/images/val_<k>.JPEG` labelled by `val/val_annotations.txt` (tab-separated: file, wnid, box),
optional `words.txt` (wnid<TAB>names, for all of ImageNet). The official val split becomes our
test split (test/ is unlabelled and unused).

Label order: sorted wnids (as ImageFolder on train/, hence CS-KD), not wnids.txt's line order.
Class names from words.txt, if present, go to meta.json as `class_names`.
"""
from __future__ import annotations

from pathlib import Path

from cskd.errors import DataError
from datasets_prep.archive import as_path
from datasets_prep.source import Source, digest, read_lines, require

FOLDER = "tiny-imagenet-200"
EXPECTED = {"train": 100000, "test": 10000}


def read(src: Path, args=None) -> Source:
    """Read TinyImageNet-200 from `src` (see the module docstring)."""
    src = as_path(src)
    root = src / FOLDER if (src / FOLDER).is_dir() else src
    wnids_path = root / "wnids.txt"
    classes = sorted(set(read_lines(wnids_path, "TinyImageNet class list")))
    index = {w: i for i, w in enumerate(classes)}
    files = {f"{FOLDER}/wnids.txt": digest(wnids_path)}

    train = []
    for wnid in classes:
        folder = require(root / "train" / wnid / "images", f"training images of class {wnid} (wnids.txt)", "dir")
        images = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if not images:
            raise DataError(f"{folder} is empty: class {wnid} has no training image")
        train += [(p, index[wnid]) for p in images]

    ann = root / "val" / "val_annotations.txt"
    test = []
    for n, line in enumerate(read_lines(ann, "TinyImageNet val labels"), 1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DataError(f"{ann} line {n}: expected 'file<TAB>wnid<TAB>box', with a wnid of wnids.txt; got {line!r}")
        image = root / "val" / "images" / parts[0]
        if not image.is_file():
            raise DataError(f"{ann} line {n}: {parts[0]} has no image at {image}")
        test.append((image, index[parts[1]]))
    files[f"{FOLDER}/val/val_annotations.txt"] = digest(ann)

    extra = {}
    words = root / "words.txt"
    if words.is_file():
        names = dict(line.split("\t", 1) for line in read_lines(words, "") if "\t" in line)
        extra["class_names"] = [names.get(w, w).strip() for w in classes]
        files[f"{FOLDER}/words.txt"] = digest(words)
    return Source("tinyimagenet", classes, {"train": train, "test": test}, files, dict(EXPECTED), extra)
