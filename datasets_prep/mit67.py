"""MIT67 Indoor Scenes (67 classes, 5,360 train / 1,340 test) as distributed.

--src holds `Images/<class>/<file>` (indoorCVPR_09.tar) and the official split lists
`TrainImages.txt` / `TestImages.txt`, whose lines are `<class>/<file>` relative to `Images/`
(CRLF endings and backslashes are accepted). `Images/` may also be the archive as downloaded,
`indoorCVPR_09.tar` in --src, read in place (see datasets_prep.archive). Most images are in
neither list: only the listed 80 + 20 per class are used.

Label order: sorted `Images/` folder names (as ImageFolder, hence CS-KD).
"""
from __future__ import annotations

from pathlib import Path

from cskd.errors import DataError
from datasets_prep.archive import as_path
from datasets_prep.source import Source, check_classes, digest, read_lines, require

EXPECTED = {"train": 5360, "test": 1340}
LISTS = {"train": "TrainImages.txt", "test": "TestImages.txt"}


def read(src: Path, args=None) -> Source:
    """Read MIT67 from `src` (see the module docstring)."""
    src = as_path(src)
    images = require(src / "Images", "MIT67 images from indoorCVPR_09.tar", "dir")
    classes = sorted(p.name for p in images.iterdir() if p.is_dir())
    index = {name: i for i, name in enumerate(classes)}
    splits, files = {}, {}
    for split, name in LISTS.items():
        path = src / name
        lines = read_lines(path, f"MIT67 {split} split list")
        files[name] = digest(path)
        samples = []
        for rel in lines:
            image = images / rel
            # the folder must be one of the classes, not merely an existing path (e.g. 'Images/x.jpg')
            folder = rel.split("/")[0]
            if folder not in index or not image.is_file():
                raise DataError(f"{path}: entry {rel} has no image at {image}")
            samples.append((image, index[folder]))
        splits[split] = samples
    source = Source("mit67", classes, splits, files, dict(EXPECTED))
    check_classes(source)
    return source
