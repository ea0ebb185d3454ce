"""Readers for Stanford Dogs, MIT67, ImageNet and the CS-KD mixed dataset, on tiny replicas of the
real distributed layouts (real file names, CRLF lists, backslash paths, .mat lists and a meta.mat
written with scipy so loadmat returns the real nesting, odd image files)."""
from __future__ import annotations

import importlib
import json
import shutil
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from cskd.errors import DataError
from datasets_prep import dogs, imagenet, mit67, mixed


def image(path: Path, mode: str = "RGB", fmt: str = "JPEG") -> Path:
    """A tiny image; mode 'L' / 'CMYK' and fmt 'PNG' (under a .JPEG name) mimic real odd files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 5), color=(90,) * len(mode)).save(path, format=fmt)
    return path


def write_lines(path: Path, lines: list[str], eol: str = "\r\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + eol for line in lines).encode())


def labels_of(samples) -> dict[str, int]:
    return {Path(p).name: label for p, label in samples}


# ---------------------------------------------------------------------------------------- Dogs
# lists.tar order is by .mat label; label - 1 must equal the sorted folder index
DOGS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02116738-African_hunting_dog"]


def savemat_list(path: Path, entries: list[tuple[str, int]]) -> None:
    """A *_list.mat as in lists.tar: N x 1 cells of 1-element char arrays, N x 1 float64 labels."""
    cells, annotations = np.empty((len(entries), 1), object), np.empty((len(entries), 1), object)
    for i, (rel, _) in enumerate(entries):
        cells[i, 0], annotations[i, 0] = np.array([rel]), np.array([rel[:-4]])
    labels = np.array([[float(label)] for _, label in entries])
    sio.savemat(path, {"file_list": cells, "annotation_list": annotations, "labels": labels})


def make_dogs(root: Path, lists_dir: str = "", n_train: int = 3) -> dict[str, list[tuple[str, int]]]:
    entries = {"train": [], "test": []}
    for label, folder in enumerate(DOGS, start=1):
        wnid = folder.split("-")[0]
        for split, numbers in (("train", range(n_train)), ("test", [9])):
            for n in numbers:
                rel = f"{folder}/{wnid}_{1000 + 7 * n + label}.jpg"
                image(root / "Images" / rel, mode="L" if n == 1 else "RGB")
                entries[split].append((rel, label))
    (root / lists_dir).mkdir(parents=True, exist_ok=True)
    for split, items in entries.items():
        savemat_list(root / lists_dir / f"{split}_list.mat", items)
    return entries


@pytest.mark.parametrize("lists_dir", ["", "lists"])
def test_dogs_reads_mat_lists_with_sorted_folder_labels(tmp_path, lists_dir):
    make_dogs(tmp_path, lists_dir)
    source = dogs.read(tmp_path, Namespace())
    assert source.classes == DOGS
    assert {k: len(v) for k, v in source.splits.items()} == {"train": 9, "test": 3}
    assert labels_of(source.splits["test"])["n02116738_1066.jpg"] == 2  # .mat label 3, third sorted folder
    assert labels_of(source.splits["train"])["n02085782_1009.jpg"] == 1
    assert source.expected == {"train": 12000, "test": 8580}
    prefix = f"{lists_dir}/" if lists_dir else ""
    assert set(source.files) == {f"{prefix}train_list.mat", f"{prefix}test_list.mat"}


def test_dogs_label_disagreeing_with_folder_is_an_error(tmp_path):
    make_dogs(tmp_path)
    savemat_list(tmp_path / "test_list.mat", [("n02085620-Chihuahua/n02085620_1064.jpg", 2)])
    image(tmp_path / "Images/n02085620-Chihuahua/n02085620_1064.jpg")
    entry = r"test_list\.mat: entry n02085620-Chihuahua/n02085620_1064\.jpg"
    with pytest.raises(DataError, match=entry + " has label 2"):
        dogs.read(tmp_path)


def test_dogs_missing_list_and_missing_image(tmp_path):
    make_dogs(tmp_path)
    (tmp_path / "test_list.mat").unlink()
    with pytest.raises(DataError, match=r"test_list\.mat is missing"):
        dogs.read(tmp_path)
    make_dogs(tmp_path)
    (tmp_path / "Images/n02085620-Chihuahua/n02085620_1001.jpg").unlink()
    entry = r"train_list\.mat: entry n02085620-Chihuahua/n02085620_1001\.jpg"
    with pytest.raises(DataError, match=entry + " has no image"):
        dogs.read(tmp_path)


def test_dogs_class_folder_without_training_image_is_an_error(tmp_path):
    make_dogs(tmp_path)
    (tmp_path / "Images/n02999999-Empty_breed").mkdir()
    # the empty folder sorts last, so the lists' labels still agree with the other folders
    with pytest.raises(DataError, match="no training image: n02999999-Empty_breed"):
        dogs.read(tmp_path)


# --------------------------------------------------------------------------------------- MIT67
MIT = ["airport_inside", "bakery", "winecellar"]


def make_mit67(root: Path, n_train: int = 3) -> None:
    train, test = [], []
    for c, name in enumerate(MIT):
        for n in range(n_train + 2):
            rel = f"{name}/{name}_{n:04d}.jpg"
            image(root / "Images" / rel, mode="CMYK" if (c, n) == (1, 0) else "RGB")
            (train if n < n_train else test if n == n_train else []).append(rel)  # the last: in no list
    train[1] = train[1].replace("/", "\\")  # lists written on Windows
    write_lines(root / "TrainImages.txt", train)
    write_lines(root / "TestImages.txt", test)


def test_mit67_reads_crlf_backslash_lists(tmp_path):
    make_mit67(tmp_path)
    source = mit67.read(tmp_path, Namespace())
    assert source.classes == MIT
    assert {k: len(v) for k, v in source.splits.items()} == {"train": 9, "test": 3}
    train = labels_of(source.splits["train"])
    assert train["airport_inside_0001.jpg"] == 0 and train["winecellar_0002.jpg"] == 2
    assert labels_of(source.splits["test"]) == {"airport_inside_0003.jpg": 0, "bakery_0003.jpg": 1,
                                                "winecellar_0003.jpg": 2}
    assert all(Path(p).is_file() for p, _ in source.splits["train"])
    assert set(source.files) == {"TrainImages.txt", "TestImages.txt"}


def test_mit67_errors(tmp_path):
    make_mit67(tmp_path)
    (tmp_path / "Images/bakery/bakery_0003.jpg").unlink()
    with pytest.raises(DataError, match=r"TestImages\.txt: entry bakery/bakery_0003\.jpg has no image"):
        mit67.read(tmp_path)
    (tmp_path / "TrainImages.txt").unlink()
    with pytest.raises(DataError, match=r"TrainImages\.txt is missing"):
        mit67.read(tmp_path)


# ------------------------------------------------------------------------------------ ImageNet
# sorted wnid order gives labels 0..3; the devkit IDs are deliberately in another order
# (as in the real devkit, where n01751748 is ID 490 and sorted index 65)
WNIDS = ["n01440764", "n01443537", "n01751748", "n02105855"]
DEVKIT_ID = {"n01751748": 490, "n01440764": 449, "n02105855": 230, "n01443537": 450}
WORDS = {"n01440764": "tench, Tinca tinca", "n01443537": "goldfish, Carassius auratus",
         "n01751748": "sea snake", "n02105855": "Shetland sheepdog, Shetland sheep dog, Shetland"}
VAL = ["n01751748", "n01440764", "n02105855", "n01443537", "n01751748"]  # val_00000001 .. 05


def save_meta_mat(path: Path) -> None:
    """devkit data/meta.mat: a synsets struct array with leaves (num_children 0) and inner nodes."""
    fields = ("ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height",
              "num_train_images")
    rows = [(i, w, WORDS[w], "gloss", 0, np.zeros((1, 0)), 0, 1300) for w, i in DEVKIT_ID.items()]
    rows += [(1001, "n02084071", "dog", "gloss", 1, np.array([[230]]), 1, 0),
             (1002, "n00001740", "entity", "gloss", 2, np.array([[1001, 449]]), 2, 0)]
    synsets = np.zeros((len(rows), 1), dtype=[(f, object) for f in fields])
    for i, row in enumerate(rows):
        synsets[i, 0] = row
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, {"synsets": synsets})


def make_imagenet(root: Path, layout: str) -> None:
    base = root / "ILSVRC/Data/CLS-LOC" if layout == "kaggle" else root
    for w in WNIDS:
        for n in (10026, 2933):
            # the real train set has a PNG named .JPEG (n02105855_2933) and grayscale JPEGs
            odd = {"n02105855": {"fmt": "PNG"}, "n01440764": {"mode": "L"}}.get(w, {}) if n == 2933 else {}
            image(base / "train" / w / f"{w}_{n}.JPEG", **odd)
    for i, w in enumerate(VAL, start=1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        mode = "CMYK" if i == 3 else "RGB"  # like ILSVRC2012_val_00019877
        image(base / "val" / (f"{w}/{name}" if layout == "folders" else name), mode=mode)
    if layout == "devkit":
        devkit = root / "ILSVRC2012_devkit_t12"
        write_lines(devkit / "data/ILSVRC2012_validation_ground_truth.txt",
                    [str(DEVKIT_ID[w]) for w in VAL], eol="\n")
        save_meta_mat(devkit / "data/meta.mat")
    if layout == "kaggle":
        write_lines(root / "LOC_val_solution.csv", ["ImageId,PredictionString"] + [
            f"ILSVRC2012_val_{i:08d},{w} 10 20 30 40 {w} 1 2 3 4 " for i, w in enumerate(VAL, start=1)])
        write_lines(root / "LOC_synset_mapping.txt", [f"{w} {WORDS[w]}" for w in WNIDS])


@pytest.mark.parametrize("layout", ["devkit", "kaggle", "folders"])
def test_imagenet_val_layouts_give_sorted_wnid_labels(tmp_path, layout):
    make_imagenet(tmp_path, layout)
    source = imagenet.read(tmp_path, Namespace())
    assert source.classes == WNIDS and source.extra["val_layout"] == layout
    assert len(source.splits["train"]) == 8 and len(source.splits["test"]) == 5
    test = labels_of(source.splits["test"])
    # val_00000001 is devkit ID 490 = n01751748 = sorted index 2 here (65 in the real 1000)
    assert test["ILSVRC2012_val_00000001.JPEG"] == 2
    assert [test[f"ILSVRC2012_val_{i:08d}.JPEG"] for i in range(1, 6)] == [2, 0, 3, 1, 2]
    assert labels_of(source.splits["train"])["n02105855_2933.JPEG"] == 3
    if layout == "folders":
        assert "class_names" not in source.extra and source.files == {}
    else:
        assert source.extra["class_names"][0] == "tench, Tinca tinca"
        assert source.extra["class_names"][3].startswith("Shetland sheepdog")
    if layout == "devkit":
        assert set(source.files) == {"ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt",
                                     "ILSVRC2012_devkit_t12/data/meta.mat"}


def test_imagenet_devkit_option_elsewhere(tmp_path):
    make_imagenet(tmp_path / "in", "devkit")
    (tmp_path / "in/ILSVRC2012_devkit_t12").rename(tmp_path / "devkit")
    with pytest.raises(DataError, match="unknown ImageNet val layout"):
        imagenet.read(tmp_path / "in", Namespace())
    source = imagenet.read(tmp_path / "in", Namespace(devkit=str(tmp_path / "devkit")))
    assert labels_of(source.splits["test"])["ILSVRC2012_val_00000003.JPEG"] == 3


def test_imagenet_errors(tmp_path):
    make_imagenet(tmp_path, "devkit")
    truth = tmp_path / "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt"
    write_lines(truth, ["490", "1001"], eol="\n")  # 1001 is an inner node ('dog'), never a label
    with pytest.raises(DataError, match=r"ground_truth\.txt: '1001' is not the ILSVRC2012_ID of a leaf"):
        imagenet.read(tmp_path)
    write_lines(truth, [str(DEVKIT_ID[w]) for w in VAL] + ["449"], eol="\n")
    with pytest.raises(DataError, match=r"ground_truth\.txt: entry ILSVRC2012_val_00000006 has no image"):
        imagenet.read(tmp_path)
    (tmp_path / "train/n01443537/n01443537_10026.JPEG").unlink()
    (tmp_path / "train/n01443537/n01443537_2933.JPEG").unlink()
    with pytest.raises(DataError, match=r"n01443537: empty class folder \(train\)"):
        imagenet.read(tmp_path)


def test_imagenet_unknown_layout_and_kaggle_errors(tmp_path):
    make_imagenet(tmp_path, "devkit")
    shutil.rmtree(tmp_path / "ILSVRC2012_devkit_t12")  # flat val/ without labels
    with pytest.raises(DataError, match=r"val: unknown ImageNet val layout"):
        imagenet.read(tmp_path)
    kaggle = tmp_path / "k"
    make_imagenet(kaggle, "kaggle")
    (kaggle / "LOC_val_solution.csv").unlink()
    with pytest.raises(DataError, match=r"LOC_val_solution\.csv is missing"):
        imagenet.read(kaggle)
    with pytest.raises(DataError, match=r"train is missing"):
        imagenet.read(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------- mixed
CUB = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]


def make_cub(cub: Path) -> None:
    """CUB_200_2011 as distributed: images/<NNN.Name>/<file>.jpg plus the 1-based index files."""
    images, labels, split = [], [], []
    for c, name in enumerate(CUB, start=1):
        for n in range(4):
            image_id = len(images) + 1
            rel = f"{name}/{name.split('.')[1]}_{n:04d}_{796000 + image_id}.jpg"
            image(cub / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(n != 2)}")  # 3 train, 1 test per class
    write_lines(cub / "classes.txt", [f"{c} {name}" for c, name in enumerate(CUB, start=1)], eol="\n")
    write_lines(cub / "images.txt", images, eol="\n")
    write_lines(cub / "image_class_labels.txt", labels, eol="\n")
    write_lines(cub / "train_test_split.txt", split, eol="\n")


def make_mixed(root: Path, dogs_dir: str = "StanfordDogs", mit_dir: str = "indoorCVPR_09") -> Path:
    make_cub(root / "CUB_200_2011")
    make_dogs(root / dogs_dir, "lists")
    make_mit67(root / mit_dir)
    return root


def mixed_args(**kw) -> Namespace:
    return Namespace(**{"per_class": 2, "seed": 0, "allow_count_mismatch": True, **kw})


def test_mixed_labels_superclasses_and_seeded_subset(tmp_path):
    source = mixed.read(make_mixed(tmp_path), mixed_args())
    assert source.classes == CUB + DOGS + MIT
    assert source.extra["superclasses"] == ["bird", "dog", "indoor"]
    assert source.extra["superclass_of_class"] == ["bird"] * 2 + ["dog"] * 3 + ["indoor"] * 3
    labels = np.array([label for _, label in source.splits["train"]])
    assert np.array_equal(np.bincount(labels), [2] * 8) and source.extra["short_classes"] == {}
    # the subset comes from the official train lists, with labels offset by 0 / 2 / 5
    official = {(str(p), label + offset) for part, src, offset in
                ((dogs, tmp_path / "StanfordDogs", 2), (mit67, tmp_path / "indoorCVPR_09", 5))
                for p, label in part.read(src).splits["train"]}
    chosen = {(str(p), label) for p, label in source.splits["train"] if label >= 2}
    assert chosen <= official and len(chosen) == 12
    test = labels_of(source.splits["test"])
    assert len(test) == 2 + 3 + 3 and test["n02116738_1066.jpg"] == 4 and test["winecellar_0003.jpg"] == 7
    assert source.expected == {"train": 16, "test": 5794 + 8580 + 1340}  # official test sets
    assert source.extra["part_count_problems"]  # the replica is no complete copy
    assert source.files["dogs/lists/train_list.mat"] and source.files["mit67/TrainImages.txt"]
    # deterministic for a seed (the pinned pick is default_rng([0, 5]) over airport_inside's 3 images)
    again = mixed.read(tmp_path, mixed_args())
    assert again.splits == source.splits
    assert [Path(p).name for p, label in source.splits["train"] if label == 5] == [
        "airport_inside_0001.jpg", "airport_inside_0002.jpg"]
    assert mixed.read(tmp_path, mixed_args(seed=1)).splits["train"] != source.splits["train"]


def test_mixed_keeps_short_classes_whole(tmp_path):
    source = mixed.read(make_mixed(tmp_path), mixed_args(per_class=30))
    assert len(source.splits["train"]) == 8 * 3
    assert source.extra["short_classes"] == {name: 3 for name in CUB + DOGS + MIT}


def test_mixed_part_options_and_folder_names(tmp_path):
    make_mixed(tmp_path / "a", dogs_dir="Stanford_Dogs", mit_dir="MIT67")
    assert len(mixed.read(tmp_path / "a", mixed_args()).classes) == 8
    (tmp_path / "a/Stanford_Dogs").rename(tmp_path / "my_dogs")
    with pytest.raises(DataError, match="no StanfordDogs or Stanford_Dogs or stanford_dogs under"):
        mixed.read(tmp_path / "a", mixed_args())
    args = mixed_args(cub=str(tmp_path / "a/CUB_200_2011"), dogs=str(tmp_path / "my_dogs"),
                      mit67=str(tmp_path / "a/MIT67"))
    assert mixed.read(None, args).extra["parts"]["dogs"] == {"offset": 2, "classes": 3}


def test_mixed_checks_part_counts(tmp_path):
    with pytest.raises(DataError, match="official split has"):
        mixed.read(make_mixed(tmp_path), mixed_args(allow_count_mismatch=False))


# ------------------------------------------------------------------- command line, end to end
def cli_main(name: str):
    cli = importlib.import_module("datasets_prep.__main__")
    if name not in getattr(cli, "READERS", {}):
        pytest.skip(f"the datasets_prep CLI has no reader registry entry for {name} yet")
    return cli.main


def test_cli_imagenet_devkit_with_odd_images(tmp_path):
    main = cli_main("imagenet")
    make_imagenet(tmp_path / "src", "devkit")  # grayscale, CMYK and PNG-named-.JPEG samples
    out = tmp_path / "out"
    assert main(["imagenet", "--src", str(tmp_path / "src"), "--out", str(out), "--workers", "2",
                 "--allow-count-mismatch"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == WNIDS and meta["val_layout"] == "devkit"
    assert meta["class_names"][2] == "sea snake"
    assert meta["counts"]["train"]["per_class"] == [2, 2, 2, 2]
    assert meta["counts"]["test"]["per_class"] == [1, 1, 2, 1]  # val labels 2, 0, 3, 1, 2


def test_cli_mixed_from_separate_parts(tmp_path):
    main = cli_main("mixed")
    make_mixed(tmp_path / "src")
    out = tmp_path / "out"
    parts = ["--cub", str(tmp_path / "src/CUB_200_2011"), "--dogs", str(tmp_path / "src/StanfordDogs"),
             "--mit67", str(tmp_path / "src/indoorCVPR_09")]
    assert main(["mixed", "--out", str(out), *parts, "--per-class", "2", "--seed", "3", "--workers", "2",
                 "--allow-count-mismatch"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["classes"] == CUB + DOGS + MIT and meta["num_classes"] == 8
    assert meta["superclass_of_class"] == ["bird"] * 2 + ["dog"] * 3 + ["indoor"] * 3
    assert meta["counts"]["train"] == {"total": 16, "per_class": [2] * 8}
    assert meta["counts"]["test"]["total"] == 8 and meta["conversion"]["reader"] == {"per_class": 2, "seed": 3}
