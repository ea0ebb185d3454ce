"""CUB-200-2011 (200 bird species, 5,994 train / 5,794 test images).

--src is `CUB_200_2011/` or the directory holding it: `images/<NNN.Name>/<file>.jpg` and the
space-separated lists `images.txt` (id path), `image_class_labels.txt` (id class_id),
`train_test_split.txt` (id is_training_image, 1 = train) and `classes.txt` (class_id NNN.Name).
IDs are 1-based.

Label order: class_id - 1, checked equal to the sorted folder order (as ImageFolder, hence CS-KD).
Samples keep images.txt's order within each split.
"""
from __future__ import annotations

from pathlib import Path

from cskd.errors import DataError
from datasets_prep.source import Source, read_lines, sha256

FOLDER = "CUB_200_2011"
EXPECTED = {"train": 5994, "test": 5794}
LISTS = {"images.txt": "image paths", "image_class_labels.txt": "image labels",
         "train_test_split.txt": "the train/test split", "classes.txt": "class names"}


def _table(path: Path, what: str) -> list[tuple[int, str, str]]:
    """(line number, id, value) of an 'id value' list; the value may contain spaces."""
    rows = []
    for n, line in enumerate(read_lines(path, what), 1):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise DataError(f"{path} line {n}: expected '<id> <value>', got {line!r}")
        rows.append((n, parts[0], parts[1].strip()))
    return rows


def read(src: Path, args=None) -> Source:
    """Read CUB-200-2011 from `src` (see the module docstring)."""
    src = Path(src)
    root = src / FOLDER if (src / FOLDER).is_dir() else src
    tables = {name: _table(root / name, f"CUB-200-2011 {what}") for name, what in LISTS.items()}
    files = {f"{FOLDER}/{name}": sha256(root / name) for name in LISTS}

    class_rows = sorted(tables["classes.txt"], key=lambda r: int(r[1]))
    classes = [folder for _, _, folder in class_rows]
    if [int(i) for _, i, _ in class_rows] != list(range(1, len(classes) + 1)) or classes != sorted(classes):
        raise DataError(f"{root / 'classes.txt'}: class ids must run 1..N in sorted folder order")

    label = {i: (n, c) for n, i, c in tables["image_class_labels.txt"]}
    is_train = {i: (n, v) for n, i, v in tables["train_test_split.txt"]}
    splits = {"train": [], "test": []}
    for n, image_id, rel in tables["images.txt"]:
        for table, name in ((label, "image_class_labels.txt"), (is_train, "train_test_split.txt")):
            if image_id not in table:
                raise DataError(f"{root / name}: no entry for image id {image_id} ({root / 'images.txt'} line {n})")
        class_id = int(label[image_id][1])
        if not 1 <= class_id <= len(classes) or rel.split("/")[0] != classes[class_id - 1]:
            raise DataError(f"{root / 'image_class_labels.txt'} line {label[image_id][0]}: class {class_id} does "
                            f"not match the folder of {rel}")
        image = root / "images" / rel
        if not image.is_file():
            raise DataError(f"{root / 'images.txt'} line {n}: {rel} has no image at {image}")
        splits["train" if is_train[image_id][1] == "1" else "test"].append((image, class_id - 1))
    return Source("cub200", classes, splits, files, dict(EXPECTED))
