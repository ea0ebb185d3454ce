"""ImageNet ILSVRC-2012 (1000 classes, 1,281,167 train / 50,000 val as 'test') as distributed.

Train is `train/<wnid>/*.JPEG` under --src. The val split is auto-detected in one of three layouts:

1. devkit: flat `val/ILSVRC2012_val_%08d.JPEG` plus the devkit (`ILSVRC2012_devkit_t12/` under
   --src, or --devkit DIR): `data/ILSVRC2012_validation_ground_truth.txt` holds one devkit
   ILSVRC2012_ID per val image, mapped to wnids through `data/meta.mat` (`synsets`).
2. Kaggle: `ILSVRC/Data/CLS-LOC/{train,val}` plus `LOC_val_solution.csv` (the first token of
   PredictionString is the wnid) and `LOC_synset_mapping.txt` beside `ILSVRC/`.
3. folders: `val/<wnid>/*`, already sorted into class folders.

The archives as downloaded may stand in --src instead of (or beside) their extracted parts, read
in place (see datasets_prep.archive): `ILSVRC2012_img_train.tar` (one tar per class inside,
seen as train/<wnid>/), `ILSVRC2012_img_val.tar` (seen as the flat val/) and
`ILSVRC2012_devkit_t12.tar.gz`; `mount_point` below places them.

Label order: sorted wnids (as ImageFolder and torchvision). Devkit IDs are *not* in that order
(val_00000001 is devkit ID 490 = sorted index 65), which is why they are mapped via meta.mat.
Human-readable names go to extra['class_names'] when LOC_synset_mapping.txt or meta.mat is there.
"""
from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from cskd.errors import DataError
from datasets_prep.archive import ArchivePath, as_path
from datasets_prep.source import Source, check_classes, digest, load_mat, read_lines, require

EXPECTED = {"train": 1281167, "test": 50000}
EXTENSIONS = (".jpeg", ".jpg", ".png")  # one train "JPEG" is really a PNG; the writer decodes by content
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
KAGGLE = "ILSVRC/Data/CLS-LOC"
VAL_FILE = re.compile(r"ILSVRC2012_val_\d{8}\.JPEG")


def mount_point(names: list[str]) -> str:
    """Where an archive of --src appears (datasets_prep.archive.open_src): the train tar, whose
    members are all per-class tars, as train/ (each X.tar as train/X/); the val tar, flat
    ILSVRC2012_val_*.JPEG files, as val/; anything else (the devkit) where it lies."""
    if names and all(n.endswith(".tar") and "/" not in n for n in names):
        return "train/"
    if names and all(VAL_FILE.fullmatch(n) for n in names):
        return "val/"
    return ""


def add_arguments(parser) -> None:
    parser.add_argument("--devkit", default=None,
                        help=f"ILSVRC2012 devkit directory for a flat val/ (default: SRC/{DEVKIT})")


def image_files(folder: Path | ArchivePath) -> list[Path | ArchivePath]:
    """The image files of `folder`, sorted by name (the same order as sorting the paths)."""
    real = folder.on_disk() if isinstance(folder, ArchivePath) else folder
    if real is None:  # a folder of an archive
        return sorted((p for p in folder.iterdir() if p.name.lower().endswith(EXTENSIONS)
                       and not p.name.startswith(".") and p.is_file()), key=lambda p: p.name)
    # os.scandir, not Path.iterdir + stat: 1.28M train files are listed once
    with os.scandir(real) as entries:
        return sorted(Path(e.path) for e in entries
                      if e.is_file() and e.name.lower().endswith(EXTENSIONS) and not e.name.startswith("."))


def read_folders(root: Path, index: dict[str, int], what: str) -> list[tuple[Path, int]]:
    """Samples of a `<wnid>/<file>` tree; a folder that is not a known class, or is empty, is an error."""
    samples = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        if folder.name not in index:
            raise DataError(f"{folder}: not one of the train wnids ({what})")
        files = image_files(folder)
        if not files:
            raise DataError(f"{folder}: empty class folder ({what})")
        samples += [(f, index[folder.name]) for f in files]
    return samples


def leaf_synsets(meta: Path) -> dict[int, tuple[str, str]]:
    """Devkit ILSVRC2012_ID -> (wnid, words) for the 1000 leaf synsets of meta.mat."""
    synsets = load_mat(meta, "devkit synsets", squeeze_me=True)
    try:
        synsets = synsets["synsets"]
        rows = zip(synsets["ILSVRC2012_ID"], synsets["WNID"], synsets["words"], synsets["num_children"])
        # the other synsets are inner nodes of the hierarchy (num_children > 0), never labels
        return {int(i): (str(w), str(words)) for i, w, words, kids in rows if int(kids) == 0}
    except (KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        raise DataError(f"{meta}: not an ILSVRC2012 meta.mat with a synsets struct ({type(e).__name__}: {e}); "
                        f"re-extract the devkit") from None


def flat_val(val: Path, labels: list[tuple[str, str]], index: dict[str, int], listing: Path):
    """Samples of a flat val/ from (file stem, wnid) pairs read from `listing`."""
    present = {p.stem: p for p in image_files(val)}
    samples = []
    for stem, wnid in labels:
        if stem not in present:
            raise DataError(f"{listing}: entry {stem} has no image in {val}")
        if wnid not in index:
            raise DataError(f"{listing}: entry {stem} has wnid {wnid}, which is not a train class")
        samples.append((present[stem], index[wnid]))
    return samples


def devkit_val(src: Path | ArchivePath, val: Path | ArchivePath, args, index: dict[str, int]):
    devkit = Path(args.devkit) if getattr(args, "devkit", None) else src / DEVKIT
    truth = devkit / GROUND_TRUTH
    require(truth, "devkit val labels; a flat val/ needs the devkit, see --devkit")
    meta = devkit / "data" / "meta.mat"
    synsets = leaf_synsets(meta)
    ids = read_lines(truth, "devkit val labels")
    bad = next((s for s in ids if not (s.isascii() and s.isdigit()) or int(s) not in synsets), None)
    if bad is not None:
        raise DataError(f"{truth}: {bad!r} is not the ILSVRC2012_ID of a leaf synset in {meta}")
    # line i (1-based) is the label of ILSVRC2012_val_%08d.JPEG with that i
    labels = [(f"ILSVRC2012_val_{i:08d}", synsets[int(s)][0]) for i, s in enumerate(ids, start=1)]
    files = {f"{devkit.name}/{GROUND_TRUTH}": digest(truth), f"{devkit.name}/data/meta.mat": digest(meta)}
    return flat_val(val, labels, index, truth), files, {w: words for w, words in synsets.values()}


def kaggle_val(src: Path | ArchivePath, val: Path | ArchivePath, index: dict[str, int]):
    solution = require(src / "LOC_val_solution.csv", "Kaggle val labels", "file")
    try:
        # newline="": the csv module's own line handling, as with open(..., newline="")
        with io.StringIO(solution.read_bytes().decode("utf-8-sig"), newline="") as f:
            rows = list(csv.DictReader(f))
        labels = [(row["ImageId"], row["PredictionString"].split()[0]) for row in rows]
    except (KeyError, IndexError, AttributeError, csv.Error, UnicodeDecodeError) as e:
        raise DataError(f"{solution}: expected UTF-8 CSV columns ImageId,PredictionString with a wnid first "
                        f"({type(e).__name__}: {e}); re-download it") from None
    return flat_val(val, labels, index, solution), {solution.name: digest(solution)}


def read(src: Path, args=None) -> Source:
    """Read ILSVRC-2012 from `src` (see the module docstring); val becomes the 'test' split."""
    src = as_path(src)
    kaggle = (src / KAGGLE).is_dir()
    root = src / KAGGLE if kaggle else src
    train = require(root / "train", "ImageNet train/<wnid>/ folders", "dir")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    index = {wnid: i for i, wnid in enumerate(classes)}
    splits = {"train": read_folders(train, index, "train")}
    val, names, files = root / "val", {}, {}
    is_folders = val.is_dir() and any(p.is_dir() for p in val.iterdir())
    if is_folders:
        layout = "folders"
        splits["test"] = read_folders(val, index, "val")
    elif kaggle and val.is_dir():
        layout = "kaggle"
        splits["test"], files = kaggle_val(src, val, index)
    elif val.is_dir() and (getattr(args, "devkit", None) or (src / DEVKIT).is_dir()):
        layout = "devkit"
        splits["test"], files, names = devkit_val(src, val, args, index)
    else:
        raise DataError(f"{val}: unknown ImageNet val layout; expected val/ILSVRC2012_val_*.JPEG with "
                        f"the devkit (SRC/{DEVKIT} or --devkit), {KAGGLE}/val with LOC_val_solution.csv, "
                        f"or val/<wnid>/ class folders")
    mapping = src / "LOC_synset_mapping.txt"
    if mapping.is_file():  # preferred over meta.mat words: it is the Kaggle copy's own file
        lines = read_lines(mapping, "wnid names")
        names = {wnid: words for wnid, _, words in (line.partition(" ") for line in lines)}
        files[mapping.name] = digest(mapping)
    extra = {"val_layout": layout}
    if names:
        extra["class_names"] = [names.get(w, w) for w in classes]
    source = Source("imagenet", classes, splits, files, dict(EXPECTED), extra)
    check_classes(source)
    return source
