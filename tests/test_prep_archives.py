"""Datasets as downloaded (datasets_prep.archive): every archive form converts, read in place, to the
same .beton files and meta.json as its extracted tree; a damaged archive is a one-line error naming
the member where it broke (nothing written), or with --skip-bad converts what comes before the
break and lists it in meta.json "skipped"."""
from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_refused
from datasets_prep import imagenet
from datasets_prep.__main__ import main as prep
from datasets_prep.archive import Member, open_src
from tests.test_hostile_prep import cifar10_replica, cifar100_replica
from tests.test_prep_a import OPTS, cub_replica, error_of, tiny_replica
from tests.test_prep_b import make_cub, make_dogs, make_imagenet, make_mit67

TRAIN, VAL, DEVKIT = "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar", "ILSVRC2012_devkit_t12.tar.gz"


def pack(archive: Path, root: Path, names: list[str], mode: str = "w") -> Path:
    """A tar of root/name for each name (folders recursively, sorted, as tar does)."""
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode) as tar:
        for name in names:
            tar.add(root / name, arcname=name)
    return archive


def tar_bytes(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def garble_second_header(blob: bytes) -> bytes:
    """A tar whose second member's header is garbage: tarfile alone would end the archive there, silently."""
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        at = tar.getmembers()[1].offset
    return blob[:at] + b"\x07" * 512 + blob[at + 512:]


def imagenet_archives(x: Path, a: Path, garble: str = "", replace: dict[str, bytes] | None = None) -> Path:
    """The three ImageNet downloads in `a`, from the extracted replica `x`: the train tar holds one
    uncompressed tar per class. `garble`: the class whose tar is corrupt after its first member;
    `replace`: {file name: bytes} to put in a class tar instead of the image."""
    members = []
    for folder in sorted((x / "train").iterdir()):
        blob = tar_bytes([(f.name, (replace or {}).get(f.name, f.read_bytes())) for f in sorted(folder.iterdir())])
        members.append((f"{folder.name}.tar", garble_second_header(blob) if folder.name == garble else blob))
    a.mkdir(parents=True, exist_ok=True)
    (a / TRAIN).write_bytes(tar_bytes(members))
    pack(a / VAL, x / "val", sorted(p.name for p in (x / "val").iterdir()))
    pack(a / DEVKIT, x, ["ILSVRC2012_devkit_t12"], "w:gz")
    return a


def converted(name: str, src: Path, out: Path, *extra: str) -> dict:
    """meta.json of a conversion, with the sha256 of each .beton."""
    assert prep([name, "--src", str(src), "--out", str(out), *OPTS, *extra]) == 0
    meta = json.loads((out / "meta.json").read_text())
    return {**meta, "betons": {s: hashlib.sha256((out / f"{s}.beton").read_bytes()).hexdigest()
                               for s in ("train", "test")}}


# --- every form, each against its extracted tree ----------------------------------------------------------

def cifar10(tmp: Path):
    cifar10_replica(tmp / "x")
    return "cifar10", tmp / "x", pack(tmp / "cifar-10-python.tar.gz", tmp / "x", ["cifar-10-batches-py"], "w:gz")


def cifar100(tmp: Path):
    cifar100_replica(tmp / "x")
    pack(tmp / "a/cifar-100-python.tar.gz", tmp / "x", ["cifar-100-python"], "w:gz")
    return "cifar100", tmp / "x/cifar-100-python", tmp / "a"  # the folder itself vs a directory holding the archive


def tiny(tmp: Path, cut: float = 1.0):
    root = tiny_replica(tmp / "x")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    # a class with 3 images last, so that a cut in its last image leaves a usable dataset (with --skip-bad)
    files.sort(key=lambda p: "n01443537/images" in p.as_posix())
    archive = tmp / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("tiny-imagenet-200/", b"")
        for p in files:
            z.write(p, p.relative_to(tmp / "x").as_posix())
    blob = archive.read_bytes()
    if cut < 1:
        with zipfile.ZipFile(archive) as z:
            last = z.infolist()[-1]
        archive.write_bytes(blob[:last.header_offset + 100 + last.compress_size // 2])  # inside its data
    return "tinyimagenet", tmp / "x", archive


def cub(tmp: Path):
    cub_replica(tmp / "x")
    (tmp / "x/attributes.txt").write_text("1 has_bill_shape::curved\n")  # as in the real .tgz, at its top
    return "cub200", tmp / "x", pack(tmp / "a/CUB_200_2011.tgz", tmp / "x", ["CUB_200_2011", "attributes.txt"],
                                     "w:gz").parent


def dogs(tmp: Path):
    make_dogs(tmp / "x")
    shutil.copy(tmp / "x/train_list.mat", tmp / "x/file_list.mat")
    pack(tmp / "a/images.tar", tmp / "x", ["Images"])
    pack(tmp / "a/lists.tar", tmp / "x", ["file_list.mat", "train_list.mat", "test_list.mat"])
    return "dogs", tmp / "x", tmp / "a"


def mit67(tmp: Path):
    make_mit67(tmp / "x")
    pack(tmp / "a/indoorCVPR_09.tar", tmp / "x", ["Images"])
    for name in ("TrainImages.txt", "TestImages.txt"):
        shutil.copy(tmp / "x" / name, tmp / "a" / name)
    return "mit67", tmp / "x", tmp / "a"


def imagenet_all(tmp: Path):
    make_imagenet(tmp / "x", "devkit")
    return "imagenet", tmp / "x", imagenet_archives(tmp / "x", tmp / "a")


def imagenet_parts(tmp: Path):
    """Extracted train/ and devkit beside the val tar."""
    make_imagenet(tmp / "x", "devkit")
    shutil.copytree(tmp / "x/train", tmp / "a/train")
    shutil.copytree(tmp / "x/ILSVRC2012_devkit_t12", tmp / "a/ILSVRC2012_devkit_t12")
    pack(tmp / "a" / VAL, tmp / "x/val", sorted(p.name for p in (tmp / "x/val").iterdir()))
    return "imagenet", tmp / "x", tmp / "a"


def mixed(tmp: Path):
    """--src with CUB's .tgz, StanfordDogs/ with the Dogs tars, indoorCVPR_09/ with the MIT67 tar."""
    x, a = tmp / "x", tmp / "a"
    make_cub(x / "CUB_200_2011")
    make_dogs(x / "StanfordDogs")
    make_mit67(x / "indoorCVPR_09")
    pack(a / "CUB_200_2011.tgz", x, ["CUB_200_2011"], "w:gz")
    pack(a / "StanfordDogs/images.tar", x / "StanfordDogs", ["Images"])
    pack(a / "StanfordDogs/lists.tar", x / "StanfordDogs", ["train_list.mat", "test_list.mat"])
    pack(a / "indoorCVPR_09/indoorCVPR_09.tar", x / "indoorCVPR_09", ["Images"])
    for name in ("TrainImages.txt", "TestImages.txt"):
        shutil.copy(x / "indoorCVPR_09" / name, a / "indoorCVPR_09" / name)
    return "mixed", x, a


@pytest.mark.parametrize("form", [cifar10, cifar100, tiny, cub, dogs, mit67, imagenet_all, imagenet_parts, mixed])
def test_archive_converts_as_its_extracted_tree(tmp_path, form):
    name, tree, archived = form(tmp_path)
    extra = ["--per-class", "2"] if name == "mixed" else []
    want = converted(name, tree, tmp_path / "out_tree", *extra)
    got = converted(name, archived, tmp_path / "out_archive", *extra)
    assert got == want  # the same .beton bytes, classes, counts, source files and digests, extra entries
    assert got["skipped"] == [] and got["counts"]["train"]["total"] > 0


# --- damaged archives ---------------------------------------------------------------------------------------

def cut_tar(path: Path, member: str, where: str, nested: str = "") -> None:
    """Truncate the tar `path` inside `member`'s data, or at its header ('header'), or, where='end',
    after its padded data (so the end-of-archive block is missing); `nested`: `member` is in that inner tar."""
    with tarfile.open(path) as tar:
        base, info = 0, tar.getmember(nested or member)
        if nested:
            base = info.offset_data
            with tarfile.open(fileobj=tar.extractfile(info)) as inner:
                info = inner.getmember(member)
    at = {"inside": info.offset_data + info.size // 2, "header": info.offset,
          "end": info.offset_data + -(-info.size // 512) * 512}[where]
    path.write_bytes(path.read_bytes()[:base + at])


def imagenet_damaged(tmp: Path, case: str) -> Path:
    make_imagenet(tmp / "x", "devkit")
    a = imagenet_archives(tmp / "x", tmp / "a", garble="n01443537" if case == "nested corrupt" else "")
    if case.startswith("train"):
        cut_tar(a / TRAIN, "n02105855_2933.JPEG", case.split()[1], nested="n02105855.tar")
    elif case.startswith("val"):
        cut_tar(a / VAL, f"ILSVRC2012_val_0000000{3 if case == 'val inside' else 5}.JPEG", case.split()[1])
    elif case == "devkit cut":
        (a / DEVKIT).write_bytes((a / DEVKIT).read_bytes()[:(a / DEVKIT).stat().st_size // 2])
    return a


DAMAGE = {  # case: what the one-line error says
    "train inside": f"{TRAIN}:n02105855.tar: broken inside member n02105855_2933.JPEG (the file ends too early",
    "train header": f"{TRAIN}:n02105855.tar: broken after member n02105855_10026.JPEG (the file ends too early",
    "val inside": f"{VAL}: broken inside member ILSVRC2012_val_00000003.JPEG (the file ends too early",
    "val end": f"{VAL}: broken after member ILSVRC2012_val_00000005.JPEG (the file ends too early",
    "nested corrupt": f"{TRAIN}:n01443537.tar: broken after member n01443537_10026.JPEG (InvalidHeaderError",
    "devkit cut": f"{DEVKIT}: broken inside member ILSVRC2012_devkit_t12/data/meta.mat (the file ends too early",
}


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_archive_is_one_line_naming_the_member(tmp_path, capsys, case):
    a = imagenet_damaged(tmp_path, case)
    out = tmp_path / "out"
    res = SimpleNamespace(returncode=prep(["imagenet", "--src", str(a), "--out", str(out), *OPTS]),
                          stderr=capsys.readouterr().err)
    assert_refused(res, DAMAGE[case])
    assert "re-download it, or pass --skip-bad" in res.stderr and not (out / "meta.json").exists()


def test_truncated_zip_is_one_line_naming_the_member(tmp_path, capsys):
    _, _, archive = tiny(tmp_path, cut=0.5)
    out = tmp_path / "out"
    res = SimpleNamespace(returncode=prep(["tinyimagenet", "--src", str(archive), "--out", str(out), *OPTS]),
                          stderr=capsys.readouterr().err)
    assert_refused(res, "tiny-imagenet-200.zip: broken inside member tiny-imagenet-200/train/n01443537/images/"
                        "n01443537_2.JPEG (its central directory is missing or damaged")
    assert not (out / "meta.json").exists()


@pytest.mark.parametrize("case, class_images, image", [
    ("train inside", 1, f"{TRAIN}:n02105855.tar:n02105855_2933.JPEG"),
    ("train header", 1, f"{TRAIN}:n02105855.tar:n02105855_10026.JPEG"),
    ("nested corrupt", 1, f"{TRAIN}:n01443537.tar:n01443537_10026.JPEG")])
def test_skip_bad_converts_up_to_the_break(tmp_path, case, class_images, image):
    a = imagenet_damaged(tmp_path, case)
    meta = converted("imagenet", a, tmp_path / "out", "--skip-bad")
    (problem,) = meta["skipped"]
    assert problem["split"] == "archive" and problem["image"].endswith(image)
    assert DAMAGE[case] in problem["reason"] and "--skip-bad" not in problem["reason"]
    assert sorted(meta["counts"]["train"]["per_class"]) == [class_images, 2, 2, 2]
    assert meta["counts"]["test"]["total"] == 5


def test_skip_bad_converts_a_truncated_zip_up_to_the_break(tmp_path):
    _, _, archive = tiny(tmp_path, cut=0.5)
    meta = converted("tinyimagenet", archive, tmp_path / "out", "--skip-bad")
    (problem,) = meta["skipped"]
    assert problem["image"].endswith("tiny-imagenet-200.zip:tiny-imagenet-200/train/n01443537/images/n01443537_2.JPEG")
    assert meta["counts"]["train"]["per_class"] == [2, 2, 1]  # n01443537 keeps the 2 images before the break


def test_undecodable_member_is_named_archive_member(tmp_path, capsys):
    make_imagenet(tmp_path / "x", "devkit")
    a = imagenet_archives(tmp_path / "x", tmp_path / "a", replace={"n01440764_10026.JPEG": b"not an image\n"})
    name = f"{TRAIN}:n01440764.tar:n01440764_10026.JPEG"
    err = error_of(capsys, "imagenet", "--src", a, "--out", tmp_path / "out", *OPTS)
    assert f"{name}: cannot decode image" in err and not (tmp_path / "out/meta.json").exists()
    meta = converted("imagenet", a, tmp_path / "out", "--skip-bad")
    assert [(s["split"], s["image"].endswith(name)) for s in meta["skipped"]] == [("train", True)]


# --- the API --------------------------------------------------------------------------------------------------

def test_archive_path_pickles_as_a_small_member_and_plain_dirs_stay_paths(tmp_path):
    make_imagenet(tmp_path / "x", "devkit")
    root = open_src(imagenet_archives(tmp_path / "x", tmp_path / "a"), mount=imagenet.mount_point)
    path = root / "train" / "n01440764" / "n01440764_10026.JPEG"
    blob = pickle.dumps(path)
    member = pickle.loads(blob)
    assert len(blob) < 1000 and isinstance(member, Member)
    assert member.read_bytes() == (tmp_path / "x/train/n01440764/n01440764_10026.JPEG").read_bytes()
    assert str(member) == str(path) == f"{tmp_path / 'a' / TRAIN}:n01440764.tar:n01440764_10026.JPEG"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["ILSVRC2012_devkit_t12", "train", "val"]
    assert (root / "val/ILSVRC2012_val_00000001.JPEG").relative_to(root).as_posix() == \
        "val/ILSVRC2012_val_00000001.JPEG"
    assert open_src(tmp_path / "x") == tmp_path / "x" and type(open_src(tmp_path / "x")) is type(tmp_path)


def test_mixed_parts_given_as_archives(tmp_path):
    _, tree, a = mixed(tmp_path)
    parts = ["--cub", str(a / "CUB_200_2011.tgz"), "--dogs", str(a / "StanfordDogs"),
             "--mit67", str(a / "indoorCVPR_09")]
    assert prep(["mixed", "--out", str(tmp_path / "out"), *parts, *OPTS, "--per-class", "2"]) == 0
    got = json.loads((tmp_path / "out/meta.json").read_text())
    want = converted("mixed", tree, tmp_path / "out_tree", "--per-class", "2")
    assert got["files"] == want["files"] and got["source"] == want["source"]


def test_zip_member_with_bad_data_is_named_when_read(tmp_path, capsys):
    _, _, archive = tiny(tmp_path)
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("tiny-imagenet-200/train/n02124075/images/n02124075_1.JPEG")
    blob = bytearray(archive.read_bytes())
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size // 2
    blob[at] ^= 0xFF
    archive.write_bytes(bytes(blob))
    err = error_of(capsys, "tinyimagenet", "--src", archive, "--out", tmp_path / "out", *OPTS)
    assert f"{archive}:{info.filename}: cannot decode image" in err and "re-download it" in err


def test_a_big_archive_says_it_is_being_indexed(tmp_path, capsys, monkeypatch):
    from datasets_prep import archive

    _, _, src = imagenet_all(tmp_path)
    monkeypatch.setattr(archive, "ANNOUNCE_BYTES", (src / TRAIN).stat().st_size)  # the train tar only
    root = open_src(src, mount=imagenet.mount_point)
    files = sum(1 for folder in (root / "train").iterdir() for _ in folder.iterdir())
    first, second = capsys.readouterr().err.splitlines()
    assert first == f"indexing {TRAIN} (0.0 GiB) in place ..."
    assert second.startswith(f"indexed {TRAIN}: {files} files in ")
