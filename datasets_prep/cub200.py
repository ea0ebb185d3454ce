"""CUB-200-2011 (200 bird species, 5,994 train / 5,794 test images).

--src is `CUB_200_2011/` or the directory holding it, or the archive as downloaded,
`CUB_200_2011.tgz` (read in place, see datasets_prep.archive; its members are held in memory,
~1.2 GB), or a directory holding that. Inside: `images/<NNN.Name>/<file>.jpg` and the
space-separated lists `images.txt` (id path), `image_class_labels.txt` (id class_id),
`train_test_split.txt` (id is_training_image, 1 = train) and `classes.txt` (class_id NNN.Name).
IDs are 1-based.

Label order: class_id - 1, checked equal to the sorted folder order (as ImageFolder, hence CS-KD).
Samples keep images.txt's order within each split.
"""
from __future__ import annotations

from pathlib import Path

from cskd.errors import DataError
from datasets_prep.archive import as_path
from datasets_prep.source import Source, by_id, digest, parse_int, read_table

FOLDER = "CUB_200_2011"
EXPECTED = {"train": 5994, "test": 5794}
# list -> (what it holds, its columns); the last column of images.txt / classes.txt is a name
LISTS = {"images.txt": ("image paths", ("image_id", "path")),
         "image_class_labels.txt": ("image labels", ("image_id", "class_id")),
         "train_test_split.txt": ("the train/test split", ("image_id", "is_training_image")),
         "classes.txt": ("class names", ("class_id", "name"))}


def _tables(root: Path) -> dict[str, dict[int, tuple[int, list[str]]]]:
    """Each list as {id: (line number, [value])}, every line checked (column count, integer id, no repeat)."""
    tables = {}
    for name, (what, columns) in LISTS.items():
        path, rest = root / name, columns[1] in ("path", "name")  # a path or name may contain spaces
        tables[name] = by_id(path, read_table(path, f"CUB-200-2011 {what}", columns, rest=rest))
    return tables


def _same_ids(root: Path, tables: dict) -> None:
    """image_class_labels.txt and train_test_split.txt list exactly the images of images.txt."""
    images = tables["images.txt"]
    for name in ("image_class_labels.txt", "train_test_split.txt"):
        other = tables[name]
        missing = next((i for i in images if i not in other), None)
        if missing is not None:
            raise DataError(f"{root / name}: no entry for image id {missing} ({root / 'images.txt'} line "
                            f"{images[missing][0]}); re-extract the dataset's archive")
        extra = next((i for i in other if i not in images), None)
        if extra is not None:
            raise DataError(f"{root / name} line {other[extra][0]}: image id {extra} is not in "
                            f"{root / 'images.txt'}; re-extract the dataset's archive")


def read(src: Path, args=None) -> Source:
    """Read CUB-200-2011 from `src` (see the module docstring)."""
    src = as_path(src)
    root = src / FOLDER if (src / FOLDER).is_dir() else src
    tables = _tables(root)
    files = {f"{FOLDER}/{name}": digest(root / name) for name in LISTS}

    class_ids = sorted(tables["classes.txt"])
    classes = [tables["classes.txt"][i][1][0] for i in class_ids]
    if class_ids != list(range(1, len(classes) + 1)) or classes != sorted(classes):
        raise DataError(f"{root / 'classes.txt'}: class ids must run 1..N in sorted folder order")
    _same_ids(root, tables)

    labels, is_train = tables["image_class_labels.txt"], tables["train_test_split.txt"]
    splits = {"train": [], "test": []}
    for image_id, (n, (rel,)) in tables["images.txt"].items():
        line, (value,) = labels[image_id]
        where = f"{root / 'image_class_labels.txt'} line {line}"
        class_id = parse_int(value, where, "class id")
        if not 1 <= class_id <= len(classes) or rel.split("/")[0] != classes[class_id - 1]:
            raise DataError(f"{where}: class {class_id} does not match the folder of {rel}")
        line, (flag,) = is_train[image_id]
        if flag not in ("0", "1"):
            raise DataError(f"{root / 'train_test_split.txt'} line {line}: is_training_image is {flag!r}, "
                            f"expected 0 or 1; re-extract the dataset's archive")
        image = root / "images" / rel
        if not image.is_file():
            raise DataError(f"{root / 'images.txt'} line {n}: {rel} has no image at {image}")
        splits["train" if flag == "1" else "test"].append((image, class_id - 1))
    return Source("cub200", classes, splits, files, dict(EXPECTED))
