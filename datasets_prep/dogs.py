"""Stanford Dogs (120 breeds, 12,000 train / 8,580 test) as distributed.

--src holds `Images/<wnid-Breed>/<wnid>_<n>.jpg` (images.tar) and `train_list.mat` /
`test_list.mat` (lists.tar), extracted either next to `Images/` or into `lists/`; or the two
archives as downloaded, `images.tar` and `lists.tar`, read in place (see datasets_prep.archive),
either of them possibly beside the other's extracted content.

Label order: sorted `Images/` folder names (as ImageFolder, hence CS-KD). The .mat lists carry
1-based float labels; the reader checks that label - 1 is the sorted index of each file's folder,
so a list that disagrees with the folders is an error rather than silently relabelled data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from cskd.errors import DataError
from datasets_prep.archive import ArchivePath, as_path
from datasets_prep.source import Source, check_classes, digest, load_mat, require

EXPECTED = {"train": 12000, "test": 8580}


def find_list(src: Path | ArchivePath, name: str) -> Path | ArchivePath:
    """`src/name` or `src/lists/name` (lists.tar may be extracted either way)."""
    for path in (src / name, src / "lists" / name):
        if path.is_file():
            return path
    return require(src / name, f"Stanford Dogs split list from lists.tar; also looked in {src / 'lists'}")


def read_mat_list(path: Path | ArchivePath) -> tuple[list[str], np.ndarray]:
    """(relative image paths, 0-based labels) of a `*_list.mat` file."""
    mat = load_mat(path, "a Stanford Dogs list from lists.tar")
    try:
        # file_list is an N x 1 cell array: each cell is a 1-element char array
        files = [str(cell.item()).replace("\\", "/") for cell in mat["file_list"].ravel()]
        labels = mat["labels"].ravel().astype(np.float64)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise DataError(f"{path}: not a Stanford Dogs list (.mat with file_list and labels): "
                        f"{type(e).__name__}: {e}; re-extract lists.tar") from None
    if len(files) != len(labels) or not np.all(labels == np.round(labels)) or not np.isfinite(labels).all():
        raise DataError(f"{path}: file_list and labels differ in length, or labels are not integers; "
                        f"re-extract lists.tar")
    return files, labels.astype(np.int64) - 1


def read(src: Path, args=None) -> Source:
    """Read Stanford Dogs from `src` (see the module docstring)."""
    src = as_path(src)
    images = require(src / "Images", "Stanford Dogs images from images.tar", "dir")
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    splits, files = {}, {}
    for split in ("train", "test"):
        path = find_list(src, f"{split}_list.mat")
        files[path.relative_to(src).as_posix()] = digest(path)
        samples = []
        for rel, label in zip(*read_mat_list(path)):
            image = images / rel
            if not image.is_file():
                raise DataError(f"{path}: entry {rel} has no image at {image}")
            folder = rel.split("/")[0]
            if index.get(folder) != label:
                raise DataError(f"{path}: entry {rel} has label {label + 1}, but its folder {folder} is "
                                f"class {index.get(folder, -1) + 1} of the sorted folders (1-based)")
            samples.append((image, int(label)))
        splits[split] = samples
    source = Source("dogs", classes, splits, files, dict(EXPECTED))
    check_classes(source)
    return source
