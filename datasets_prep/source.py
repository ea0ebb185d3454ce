"""What a dataset reader returns, and the small parsing helpers every reader shares.

A reader turns one dataset *as distributed* into a `Source`: class names in the documented label
order (sorted wnid / folder names, as torchvision's ImageFolder), and per split a list of samples
(an image file path, or an HxWx3 uint8 array for datasets shipped as arrays, with its label).
Decoding, resizing and writing the FFCV files is the writer's job (datasets_prep/writer.py).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cskd.errors import DataError

Sample = tuple["Path | np.ndarray", int]


@dataclass
class Source:
    name: str
    classes: list[str]  # label i is classes[i]
    splits: dict[str, list[Sample]]  # 'train' and 'test'
    files: dict[str, str] = field(default_factory=dict)  # split/label files read -> sha256
    expected: dict[str, int] | None = None  # official split sizes, checked by check_counts
    extra: dict = field(default_factory=dict)  # e.g. super-classes, coarse labels; goes into meta.json
    # The reader's own options that change what is written (a split seed, a subset size): part of
    # the conversion's identity, recorded as meta.json conversion.reader.
    params: dict = field(default_factory=dict)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def require(path: Path, what: str) -> Path:
    """`path` if it exists, else a DataError naming it and what it should be."""
    if not path.exists():
        raise DataError(f"{path} is missing ({what}); point --src at the dataset as distributed")
    return path


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text list, with CRLF endings stripped and Windows separators made '/'."""
    text = require(path, what).read_bytes().decode("utf-8", errors="strict")
    return [line.strip().replace("\\", "/") for line in text.splitlines() if line.strip()]


def check_counts(source: Source, strict: bool = True) -> list[str]:
    """Compare split sizes with the official ones; a mismatch is an error unless `strict` is False."""
    problems = []
    for split, want in (source.expected or {}).items():
        got = len(source.splits.get(split, []))
        if got != want:
            problems.append(f"{source.name} {split}: {got} images, the official split has {want}")
    if problems and strict:
        raise DataError("; ".join(problems) + " (a partial copy? pass --allow-count-mismatch to convert anyway)")
    return problems


def check_classes(source: Source) -> None:
    """Every class has at least one training image and every label is in range."""
    n = len(source.classes)
    for split, samples in source.splits.items():
        counts = np.bincount([label for _, label in samples], minlength=n)
        if len(counts) > n:
            raise DataError(f"{source.name} {split}: label {len(counts) - 1} out of range for {n} classes")
        if split == "train":
            empty = [source.classes[i] for i in np.flatnonzero(counts == 0)]
            if empty:
                raise DataError(f"{source.name}: class(es) with no training image: {', '.join(empty[:5])}"
                                f"{' ...' if len(empty) > 5 else ''}")
