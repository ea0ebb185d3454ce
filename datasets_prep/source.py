"""What a dataset reader returns, and the small parsing helpers every reader shares.

A reader turns one dataset *as distributed* into a `Source`: class names in the documented label
order (sorted wnid / folder names, as torchvision's ImageFolder), and per split a list of samples
(an image file path, a datasets_prep.archive.ArchivePath for an image read in place from an
archive, or an HxWx3 uint8 array for datasets shipped as arrays, with its label).
Decoding, resizing and writing the FFCV files is the writer's job (datasets_prep/writer.py).
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cskd.errors import DataError
from cskd.fileio import sha256
from datasets_prep.archive import ArchivePath

Sample = tuple["Path | ArchivePath | np.ndarray", int]


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
    # Problems of the archives read (with --skip-bad, datasets_prep.archive): {"split": "archive",
    # "image", "reason"} each, listed in meta.json's "skipped" beside the undecodable images.
    skipped: list[dict] = field(default_factory=list)


def digest(path: Path | ArchivePath) -> str:
    """The hex sha256 of a file's bytes, a real file or an archive member (the same for both)."""
    if not isinstance(path, ArchivePath):
        return sha256(path)
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e})") from None


def require(path: Path, what: str, kind: str = "") -> Path:
    """`path` if it exists (and is a directory / file when `kind` says so), else a DataError naming it
    and what it should be."""
    if not path.exists():
        raise DataError(f"{path} is missing ({what}); point --src at the dataset as distributed")
    if kind == "dir" and not path.is_dir() or kind == "file" and not path.is_file():
        raise DataError(f"{path} is not a {'directory' if kind == 'dir' else 'file'} ({what}); "
                        f"point --src at the dataset as distributed")
    return path


def numbered_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, line) of the non-empty lines of a UTF-8 text list, with CRLF endings stripped and
    Windows separators made '/'. Line numbers count blank lines too, so errors point at the real line."""
    try:
        data = require(path, what, "file").read_bytes()
    except OSError as e:
        raise DataError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from None
    try:
        text = data.decode("utf-8-sig", errors="strict")  # -sig: a byte-order mark from a Windows editor goes
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise DataError(f"{path} line {line}: not UTF-8 text ({what}); re-extract the dataset's archive") from None
    return [(n, line.strip().replace("\\", "/")) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def read_lines(path: Path, what: str) -> list[str]:
    """The non-empty lines of a text list (see `numbered_lines`)."""
    return [line for _, line in numbered_lines(path, what)]


def parse_int(text: str, where: str, what: str = "id") -> int:
    """`text` as an integer (ASCII digits, optional minus), else a DataError at `where` (a file and line)."""
    body = text[1:] if text.startswith("-") else text
    if not (body.isascii() and body.isdigit()):
        raise DataError(f"{where}: {what} {text!r} is not an integer; re-extract the dataset's archive")
    return int(text)


def read_table(path: Path, what: str, columns: tuple[str, ...], rest: bool = False) -> list[tuple[int, list[str]]]:
    """(line number, fields) of a whitespace-separated list with exactly `columns` fields per line; with
    `rest`, the last field takes the remainder of the line (a value that may contain spaces)."""
    rows, layout = [], " ".join(f"<{c}>" for c in columns)
    for n, line in numbered_lines(path, what):
        fields = line.split(maxsplit=len(columns) - 1) if rest else line.split()
        if len(fields) != len(columns):
            raise DataError(f"{path} line {n}: expected {len(columns)} columns '{layout}', got {line!r}; "
                            f"re-extract the dataset's archive")
        rows.append((n, fields))
    return rows


def by_id(path: Path, rows: list[tuple[int, list[str]]]) -> dict[int, tuple[int, list[str]]]:
    """{id: (line number, the other fields)} of `read_table` rows whose first field is an integer id;
    an id listed twice is an error (which line would be meant?)."""
    table = {}
    for n, (key, *values) in rows:
        i = parse_int(key, f"{path} line {n}")
        if i in table:
            raise DataError(f"{path} line {n}: id {i} is listed twice (also line {table[i][0]}); "
                            f"re-extract the dataset's archive")
        table[i] = (n, values)
    return table


def int_labels(values, num_classes: int, where: str) -> list[int]:
    """`values` (a list / tuple / 1-D array of integers) as Python ints in 0..num_classes-1, else a
    DataError at `where` naming the first offending entry."""
    if isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iu":
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise DataError(f"{where}: labels are {type(values).__name__}, expected a list of integers; "
                        f"re-extract the dataset's archive")
    for k, y in enumerate(values):
        if isinstance(y, bool) or not isinstance(y, (int, np.integer)):
            raise DataError(f"{where}: label {k} is {y!r} ({type(y).__name__}), not an integer; "
                            f"re-extract the dataset's archive")
        if not 0 <= y < num_classes:
            raise DataError(f"{where}: label {k} is {y}, outside 0..{num_classes - 1} ({num_classes} classes); "
                            f"re-extract the dataset's archive")
    return [int(y) for y in values]


def load_mat(path: Path | ArchivePath, what: str, **kwargs) -> dict:
    """scipy.io.loadmat(path) in a forked child process: scipy's MATLAB reader can crash the whole
    process (a segfault, measured on bit-flipped .mat files) instead of raising, so it runs where a
    crash costs only the child. Any failure is a DataError naming the file. An archive member's
    bytes are read here and handed to the child (forked: not copied through a pipe)."""
    import multiprocessing as mp

    require(path, what, "file")
    if isinstance(path, ArchivePath):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path} cannot be read ({e.strerror or e}); re-download the dataset's archive") from None
    else:
        data = str(path)
    ctx = mp.get_context("fork")
    parent_end, child_end = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_load_mat_child, args=(data, kwargs, child_end), daemon=True)
    child.start()
    child_end.close()
    try:
        ok, result = parent_end.recv()
    except EOFError:  # the child died without answering
        child.join()
        ok, result = False, f"the MATLAB reader crashed (exit code {child.exitcode})"
    finally:
        parent_end.close()
        child.join()
    if not ok:
        raise DataError(f"{path}: not a readable .mat file ({what}): {result}; re-extract the dataset's archive")
    return result


def _load_mat_child(path: str | bytes, kwargs: dict, conn) -> None:
    """The child of `load_mat`: answer (True, dict) or (False, reason); `path` is a file name or the bytes."""
    import faulthandler

    faulthandler.disable()  # a crash here is expected and reported by the parent in one line
    try:
        from scipy.io import loadmat

        answer = (True, loadmat(io.BytesIO(path) if isinstance(path, bytes) else path, **kwargs))
    except Exception as e:  # scipy raises assorted errors (MatReadError, OSError, IndexError, ...) on bad files
        answer = (False, f"{type(e).__name__}: {e}")
    conn.send(answer)
    conn.close()


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
    """There are classes, every class has at least one training image and every label is in range."""
    n = len(source.classes)
    if not n:
        raise DataError(f"{source.name}: no classes found; point --src at the dataset as distributed")
    for split, samples in source.splits.items():
        labels = [label for _, label in samples]
        if labels and min(labels) < 0:
            raise DataError(f"{source.name} {split}: label {min(labels)} out of range for {n} classes")
        counts = np.bincount(labels, minlength=n)
        if len(counts) > n:
            raise DataError(f"{source.name} {split}: label {len(counts) - 1} out of range for {n} classes")
        if split == "train":
            empty = [source.classes[i] for i in np.flatnonzero(counts == 0)]
            if empty:
                raise DataError(f"{source.name}: class(es) with no training image: {', '.join(empty[:5])}"
                                f"{' ...' if len(empty) > 5 else ''}")
