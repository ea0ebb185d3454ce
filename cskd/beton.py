"""The tables of an FFCV .beton file (header, fields, per-sample metadata, allocation table), read with
numpy alone.

Why not `ffcv.reader.Reader`: importing any part of FFCV 1.0.2 runs `ffcv/__init__.py`, which compiles
numba code (a typed dict in `ffcv/fields/rgb_image.py`): 7.3 s of a 14 s one-epoch CPU run on
mnist5k, measured with cProfile. Opening a dataset and the loaders that read the file themselves
(`cskd.device_loader` for raw images, `cskd.jpeg_loader`) need only these tables, so a run that does
not decode through FFCV never imports it.

The layout is FFCV's file format version 2 (`ffcv/types.py`, `ffcv/reader.py`): a header, one
descriptor per field, a structured metadata row per sample (one column per field, `f0`, `f1`, ...),
then sample data, and the allocation table at `alloc_table_ptr` (one entry per stored blob).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

VERSION = 2
HEADER = np.dtype([("version", "<u2"), ("num_fields", "<u2"), ("page_size", "<u4"), ("num_samples", "<u8"),
                   ("alloc_table_ptr", "<u8")], align=True)
FIELD_DESCRIPTOR = np.dtype([("type_id", "<u1"), ("name", ("<u1", 16)), ("arguments", ("<u1", (1024,)))], align=True)
ALLOC_TABLE = np.dtype([("sample_id", "<u8"), ("ptr", "<u8"), ("size", "<u8")])
# The per-sample metadata of each field type FFCV's datasets_prep writers use (`Field.metadata_type`).
METADATA = {0: ("FloatField", np.dtype("<f8")), 1: ("IntField", np.dtype("<i8")),
            2: ("RGBImageField", np.dtype([("mode", "<u1"), ("width", "<u2"), ("height", "<u2"), ("data_ptr", "<u8")]))}


@dataclass
class Beton:
    """A .beton's tables; `data` maps the whole file (read-only) for the samples' bytes."""

    path: Path
    num_samples: int
    field_names: list[str]
    metadata: np.ndarray  # structured, one row per sample, column f<i> for field i
    alloc_table: np.ndarray  # ALLOC_TABLE rows: (sample_id, ptr, size) of every stored blob
    data: np.memmap

    def field(self, name: str) -> np.ndarray:
        """The metadata column of field `name` (ValueError if the file has no such field)."""
        return self.metadata[f"f{self.field_names.index(name)}"]


def read_beton(path: str | Path) -> Beton:
    """The tables of the .beton at `path`; ValueError naming what is wrong for a damaged or foreign file."""
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else np.zeros(0, np.uint8)

    def table(dtype: np.dtype, offset: int, count: int, what: str) -> np.ndarray:
        end = offset + dtype.itemsize * count
        if end > len(data):
            raise ValueError(f"its {what} needs bytes {offset}-{end}, the file has {len(data)}")
        return np.frombuffer(data[offset:end], dtype=dtype)

    header = table(HEADER, 0, 1, "header")[0]
    if header["version"] != VERSION:
        raise ValueError(f"file format version {header['version']}, not FFCV's version {VERSION}")
    count, samples = int(header["num_fields"]), int(header["num_samples"])
    fields = table(FIELD_DESCRIPTOR, HEADER.itemsize, count, "field table")
    names = [bytes(f["name"]).split(b"\x00")[0].decode("ascii", "replace") for f in fields]
    types = []
    for name, type_id in zip(names, fields["type_id"]):
        if int(type_id) not in METADATA:
            raise ValueError(f"field {name!r} has FFCV type id {type_id}, not one of "
                             f"{', '.join(n for n, _ in METADATA.values())}")
        types.append(METADATA[int(type_id)][1])
    row = np.dtype([("", t) for t in types], align=True)  # as FFCV's get_metadata_type: columns f0, f1, ...
    metadata = table(row, HEADER.itemsize + fields.nbytes, samples, "per-sample metadata")
    start = int(header["alloc_table_ptr"])
    if start > len(data) or (len(data) - start) % ALLOC_TABLE.itemsize:
        raise ValueError(f"its allocation table at byte {start} does not fit the file's {len(data)} bytes")
    alloc = table(ALLOC_TABLE, start, (len(data) - start) // ALLOC_TABLE.itemsize, "allocation table")
    return Beton(path, samples, names, metadata, alloc, data)
