"""Write an FFCV .beton (file format version 2) from one process, sample after sample, in order.

Why not FFCV's `DatasetWriter`: its worker processes take chunks of samples from a shared queue and
each fills its own page, so the file's page order depends on which worker ran first (the same
conversion gives different bytes each time with more than one worker), and a worker that raises or
dies leaves the writer waiting forever. Here the worker pool only decodes and encodes
(datasets_prep.writer); this process places the results in sample order, so a conversion's bytes
are a function of its input alone.

The layout is FFCV's own, as `ffcv.writer.DatasetWriter(num_workers=1)` lays it out (the tests
check the bytes are identical): header, field descriptors, one metadata row per sample, zeros up to
a page boundary, the sample data packed into pages (a sample that does not fit in the rest of a
page starts the next one; pages are written whole), then the allocation table, whose position the
header records. FFCV finds a sample's page as `ptr >> log2(page_size)`, from the file's start, so
a page size that has to grow for an outsized image (doubling keeps every earlier page inside one
new page) leaves every earlier sample readable.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from cskd.beton import ALLOC_TABLE, FIELD_DESCRIPTOR, HEADER, METADATA, VERSION

MIN_PAGE = 1 << 21  # FFCV's smallest page size (2 MiB)
MAX_PAGE = 1 << 31  # FFCV stores the page size as uint32 and needs a power of two
IMAGE, INT = 2, 1  # FFCV type ids: RGBImageField, IntField
FIELDS = (("image", IMAGE), ("label", INT), ("index", INT))  # what every prepared dataset holds
MODE_JPG, MODE_RAW = 0, 1  # RGBImageField's stored modes


def page_size_for(max_bytes: int) -> int:
    """The smallest power of two (at least FFCV's 2 MiB) that holds two images of `max_bytes`."""
    return max(MIN_PAGE, 1 << int(2 * max_bytes + (1 << 16)).bit_length())


class BetonWriter:
    """Append samples (image blob, label, index) to a new .beton at `path`; `close()` finishes it.

    `capacity` rows of metadata are reserved (the samples listed); fewer may be written (skipped
    images), which leaves unused zeros between the metadata and the data, as FFCV's alignment does."""

    def __init__(self, path: Path, capacity: int, page_size: int):
        self.path, self.page_size, self.count = Path(path), page_size, 0
        self.row = np.dtype([("", METADATA[type_id][1]) for _, type_id in FIELDS], align=True)
        self.metadata = np.zeros(capacity, self.row)
        self.allocations: list[tuple[int, int, int]] = []  # (sample id, ptr, size) per stored blob
        self.metadata_start = HEADER.itemsize + FIELD_DESCRIPTOR.itemsize * len(FIELDS)
        self.data_start = self.metadata_start + self.metadata.nbytes
        self.file = open(self.path, "wb", buffering=1 << 20)
        self.file.write(bytes(self.data_start))  # header, fields and metadata are written by close()
        self.page_end = None  # end of the current page (absolute offset); None before the first
        self.pos = self.data_start

    def add(self, blob: bytes, mode: int, height: int, width: int, label: int, index: int) -> None:
        """Store one sample: its image bytes (JPEG, or raw HxWx3 RGB) and its metadata row."""
        size = len(blob)
        if size > self.page_size:
            self._grow(page_size_for(size))
        if self.page_end is None or size > self.page_end - self.pos:
            self._next_page()
        self.file.write(blob)
        self.allocations.append((self.count, self.pos, size))
        self.metadata[self.count] = ((mode, width, height, self.pos), label, index)
        self.pos += size
        self.count += 1

    def _pad_to(self, offset: int) -> None:
        self.file.write(bytes(offset - self.pos))
        self.pos = offset

    def _next_page(self) -> None:
        start = self.page_end if self.page_end is not None else -(-self.pos // self.page_size) * self.page_size
        self._pad_to(start)
        self.page_end = start + self.page_size

    def _grow(self, page_size: int) -> None:
        if page_size > MAX_PAGE:
            raise ValueError(f"an image of {page_size // 2} bytes exceeds FFCV's largest page")
        if self.page_end is not None:  # close the current page; the next starts on the new boundary
            self._pad_to(self.page_end)
            self.page_end = -(-self.pos // page_size) * page_size
        self.page_size = page_size

    def close(self) -> int:
        """Finish the file (last page, allocation table, metadata, header); returns its size in bytes."""
        if self.page_end is not None:
            self._pad_to(self.page_end)
        table = np.array(self.allocations, dtype=ALLOC_TABLE) if self.allocations else np.zeros(0, ALLOC_TABLE)
        self.file.write(table.tobytes())
        end = self.pos + table.nbytes
        header = np.zeros(1, HEADER)
        header[0] = (VERSION, len(FIELDS), self.page_size, self.count, self.pos)
        fields = np.zeros(len(FIELDS), FIELD_DESCRIPTOR)
        for i, (name, type_id) in enumerate(FIELDS):
            fields[i]["type_id"] = type_id
            fields[i]["name"][:len(name)] = np.frombuffer(name.encode("ascii"), np.uint8)
        self.file.seek(0, io.SEEK_SET)
        self.file.write(header.tobytes() + fields.tobytes() + self.metadata[:self.count].tobytes())
        self.file.close()
        return end

    def abort(self) -> None:
        """Close the file without finishing it (the caller removes it)."""
        self.file.close()
