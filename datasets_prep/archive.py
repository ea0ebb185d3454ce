"""Datasets read in place from their archives, as downloaded: nothing is extracted, nothing copied.

`open_src(path)` turns --src into what a reader walks. A directory with no archive at its top
level is returned unchanged (a plain `pathlib.Path`). Otherwise the result is an `ArchivePath`,
the root of a `Tree`: the content of --src *as if every archive in it had been extracted right
there*, merged with the directory's real files. Archives are recognised by content (magic bytes,
never the file name): tar, gzip/bzip2/xz-compressed tar, zip. Lookups that the archives do not
answer fall through to the real file system lazily (an extracted ImageNet train/ has 1.28 M files;
it is never walked here), and archive content wins over a real file at the same path.

How each kind is read, and why:

* Uncompressed tar (ImageNet, Stanford Dogs, MIT67): the headers are scanned once (tarfile on a
  seekable window of the file, never reading member data) and each regular file is recorded as
  (offset of its bytes in the real file, size). Members are later read with `os.pread`, which
  has no shared file position, so forked worker processes read one inherited descriptor in
  parallel. A member named `*.tar` whose bytes are themselves an uncompressed tar (ImageNet's
  train tar holds one tar per class) is always expanded, as the folder named without `.tar`:
  it is scanned in place the same way, as a window of the outer file.
* gzip/bzip2/xz-compressed tar (CIFAR, CUB-200-2011, the ImageNet devkit): a compressed stream
  cannot be read at an offset, so it is decompressed once, in order, and the members' bytes are
  kept in memory (CIFAR-10/100 ~180 MB, CUB-200-2011 ~1.2 GB). Nested tars are not expanded there.
* zip (TinyImageNet): zipfile; members are read by name, each process through its own ZipFile.

Damage is found while indexing, before anything is converted, and reported in one line naming the
archive and the member where it broke. tarfile itself treats a bad or truncated header after the
first member as the end of the archive, silently: so every header error is recorded (`_Info`) and
an archive must end with its end-of-archive block, and every member's bytes must lie inside the
file. A zip without its central directory (a truncated download) is walked through its local
headers to find where it breaks. With `skip_bad` nothing raises: the members before the break
stay usable and the problem is listed in `Tree.problems` (then meta.json's "skipped").
"""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import struct
import sys
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from functools import total_ordering
from pathlib import Path, PurePosixPath
from typing import Callable

from cskd.errors import DataError

# the compressed streams a tar may come in (as tarfile names them): their magic bytes, how to peek inside
_COMPRESSED = {"gz": (b"\x1f\x8b", gzip.open), "bz2": (b"BZh", bz2.open), "xz": (b"\xfd7zXZ\x00", lzma.open)}
# what a damaged archive raises while being read: tarfile's errors (its streams say ReadError), and
# gzip/bz2/lzma's when peeking: a truncated (EOFError) or corrupt stream (zlib.error, LZMAError, OSError)
_DAMAGE = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip member's local header (30 bytes)
_TRUNCATED = "the file ends too early: a truncated download?"
ANNOUNCE_BYTES = 1 << 30  # archives this big get a line before and after their index is built

_FDS: dict[str, int] = {}  # archive -> descriptor for pread; forked workers inherit and share it
_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}  # (pid, archive) -> ZipFile: its file position is per process


@dataclass(frozen=True, slots=True)
class Member:
    """One regular file inside an archive: small and picklable, all a worker process needs to read it."""

    archive: str  # the real file holding the bytes (the outermost archive)
    label: str  # the archive as named in messages; 'outer.tar:inner.tar' for a nested tar
    path: str  # the member's name inside `label`
    offset: int = 0  # where its bytes start in `archive` (read with pread)
    size: int = 0
    # raw: the bytes at offset (tar); zip: read by name through zipfile; deflate: a zip member found
    # without a central directory (_salvage_zip), inflated here
    codec: str = "raw"
    data: bytes | None = field(default=None, repr=False)  # the bytes themselves (a compressed tar's members)

    def read_bytes(self) -> bytes:
        """The member's bytes; OSError (with the reason, not the name) if they cannot be read."""
        if self.data is not None:
            return self.data
        try:
            if self.codec == "zip":
                key = (os.getpid(), self.archive)
                if key not in _ZIPS:
                    _ZIPS[key] = zipfile.ZipFile(self.archive)
                return _ZIPS[key].read(self.path)  # checks the CRC
            raw = os.pread(_fd(self.archive), self.size, self.offset)
            if len(raw) != self.size:
                raise OSError("the archive is shorter than when it was indexed")
            return zlib.decompress(raw, -zlib.MAX_WBITS) if self.codec == "deflate" else raw
        except (OSError, zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise OSError(f"cannot be read from its archive ({type(e).__name__}: {e}); re-download it") from None

    def __str__(self) -> str:
        return f"{self.label}:{self.path}"


def _fd(archive: str) -> int:
    """The shared read-only descriptor of `archive`, opened once per archive."""
    if archive not in _FDS:
        _FDS[archive] = os.open(archive, os.O_RDONLY)
    return _FDS[archive]


class _Info(tarfile.TarInfo):
    """A TarInfo that remembers why a header could not be read, on the TarFile: tarfile ends the
    iteration on a bad or truncated header after the first member as if the archive ended there."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as e:
            tar.header_error = e
            raise


class _Window(io.RawIOBase):
    """Bytes [start, start + size) of a file as a seekable file of their own: a nested tar, in place."""

    def __init__(self, fd: int, start: int, size: int):
        super().__init__()
        self.fd, self.start, self.size, self.pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        self.pos = pos + (0, self.pos, self.size)[whence]
        return self.pos

    def readinto(self, buf) -> int:
        data = os.pread(self.fd, max(0, min(len(buf), self.size - self.pos)), self.start + self.pos)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


@dataclass
class _Nested:
    """A member that is itself a tar: shown as a folder holding its entries."""

    label: str
    entries: list


class _Dir:
    """A folder of the tree: its archive entries, how to name it, and the real folder it overlays."""

    __slots__ = ("children", "label", "inner", "real")

    def __init__(self, label: str, inner: str, real: Path | None):
        self.children: dict[str, _Dir | Member] = {}
        self.label, self.inner, self.real = label, inner, real

    def subdir(self, name: str, label: str, inner: str) -> _Dir:
        node = self.children.get(name)
        if not isinstance(node, _Dir):  # a later archive's folder replaces a file, as extraction would
            node = self.children[name] = _Dir(label, inner, self.real / name if self.real else None)
        return node

    def display(self, rest: str = "") -> str:
        inner = "/".join(p for p in (self.inner, rest) if p)
        return f"{self.label}:{inner}" if inner else self.label


def _split(name: str) -> tuple[str, ...]:
    return tuple(p for p in name.split("/") if p not in ("", "."))


def _is_tar(block: bytes) -> bool:
    """Whether `block` starts a tar: the POSIX magic, or an old-style header with a valid checksum."""
    if block[257:262] == b"ustar":
        return True
    try:
        tarfile.TarInfo.frombuf(block[:tarfile.BLOCKSIZE], "utf-8", "surrogateescape")
        return True
    except tarfile.HeaderError:
        return False


def _kind(path: Path) -> str | None:
    """'tar', 'zip', 'gz', 'bz2' or 'xz' (a compressed tar), or None (not an archive), by content.
    A compressed file whose start cannot be decompressed counts as an archive, so its damage is reported."""
    try:
        with open(path, "rb") as f:
            head = f.read(tarfile.BLOCKSIZE)
    except OSError:
        return None  # unreadable: left to the reader, which names it as it always did
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    for kind, (magic, opener) in _COMPRESSED.items():
        if head.startswith(magic):
            try:
                with opener(path, "rb") as f:
                    block = f.read(tarfile.BLOCKSIZE)
            except _DAMAGE:
                return kind
            return kind if _is_tar(block) else None
    return "tar" if _is_tar(head) else None


class Tree:
    """The merged content of --src (see the module docstring). `problems` lists, with skip_bad, the
    archive damage that was skipped, as meta.json "skipped" entries."""

    def __init__(self, label: str, name: str, real: Path | None, skip_bad: bool):
        self.root = _Dir(label, "", real)
        self.name, self.skip_bad = name, skip_bad
        self.problems: list[dict] = []

    def add(self, path: Path, kind: str, mount: Callable[[list[str]], str] | None = None) -> None:
        """Index the archive at `path` and place its content under mount(its file names) (default: the root)."""
        archive = str(path)
        # what was cached for this path may be another file by now (a new download): forget it
        if archive in _FDS:
            os.close(_FDS.pop(archive))
        _ZIPS.pop((os.getpid(), archive), None)
        size, start = path.stat().st_size, time.monotonic()
        if size >= ANNOUNCE_BYTES:  # ImageNet's train tar takes a minute or more: say what is going on
            print(f"indexing {path.name} ({size / 2 ** 30:.1f} GiB) in place ...", file=sys.stderr, flush=True)
        if kind == "zip":
            entries, problem = _scan_zip(archive)
        elif kind == "tar":
            fd = _fd(archive)
            entries, problem = self._scan_tar(fd, 0, os.fstat(fd).st_size, archive, archive)
        else:
            entries, problem = _scan_stream(archive, kind)
        if problem:
            self._report(*problem)
        if size >= ANNOUNCE_BYTES:
            print(f"indexed {path.name}: {_files(entries)} files in {time.monotonic() - start:.0f} s", file=sys.stderr,
                  flush=True)
        node = self.root
        if mount:
            files = ["/".join(_split(name)) for name, item in entries if item is not None]  # './x' as 'x'
            for part in _split(mount(files)):
                node = node.subdir(part, archive, "")
        _place(node, entries, archive)

    def _report(self, image: str, reason: str) -> None:
        if not self.skip_bad:
            raise DataError(f"{reason}; re-download it, or pass --skip-bad to convert what comes before the break")
        self.problems.append({"split": "archive", "image": image, "reason": reason})

    def _scan_tar(self, fd: int, start: int, size: int, archive: str, label: str):
        """(entries, problem or None) of the uncompressed tar in bytes [start, start + size) of `fd`:
        entries are (name, Member | _Nested | None for a folder), a problem is (image, reason)."""
        entries, last = [], None
        try:
            tar = tarfile.open(fileobj=_Window(fd, start, size), mode="r:", tarinfo=_Info)
            while (info := tar.next()) is not None:
                tar.members.clear()  # indexed here; tarfile would keep every header (50,000 in the val tar)
                last = info.name
                if info.isdir():
                    entries.append((info.name, None))
                if not info.isreg():  # links and devices have no bytes of their own
                    continue
                at, avail = start + info.offset_data, min(info.size, size - info.offset_data)
                where = f"{label}:{info.name}"
                if info.name.endswith(".tar") and _is_tar(os.pread(fd, tarfile.BLOCKSIZE, at)):
                    nested, problem = self._scan_tar(fd, at, avail, archive, where)
                    entries.append((info.name, _Nested(where, nested)))
                    if avail < info.size:  # the file ends inside it: nothing follows
                        return entries, problem or (where, f"{label}: broken inside member {info.name} ({_TRUNCATED})")
                    if problem:  # a damaged inner tar; the outer one goes on
                        self._report(*problem)
                elif avail < info.size:
                    return entries, (where, f"{label}: broken inside member {info.name} ({_TRUNCATED})")
                else:
                    entries.append((info.name, Member(archive, label, info.name, at, info.size)))
            error = getattr(tar, "header_error", None)
        except tarfile.TarError as e:  # "unexpected end of data": it ends in a member's padding; or a bad first header
            error = e
        if isinstance(error, tarfile.EOFHeaderError):  # the end-of-archive block: complete
            return entries, None
        return entries, _broken(label, last, False, error)


def _broken(label: str, last: str | None, inside: bool, error: Exception) -> tuple[str, str]:
    """(image, reason) of an archive that broke after (or, `inside`, in) member `last`."""
    # tarfile words a header missing at the very start (ReadError) or a member's missing bytes like this
    truncated = isinstance(error, (EOFError, tarfile.EmptyHeaderError, tarfile.TruncatedHeaderError)) or (
        str(error) in ("unexpected end of data", "empty file", "truncated header"))
    why = _TRUNCATED if truncated else f"{type(error).__name__}: {error}".replace("\n", " ")
    where = f"inside member {last}" if inside else f"after member {last}" if last else "at its first member"
    return (f"{label}:{last}" if last else label), f"{label}: broken {where} ({why})"


def _scan_stream(archive: str, kind: str):
    """(entries, problem) of a compressed tar, decompressed once in order, the members' bytes kept.
    tarfile decompresses the stream itself (r|gz): a truncated one then reads short where it ends,
    at the member it ends in, where gzip.open would fail a whole buffered block early."""
    entries, last, inside = [], None, False
    try:
        with open(archive, "rb") as f:
            tar = tarfile.open(fileobj=f, mode=f"r|{kind}", tarinfo=_Info)  # r|: a stream, never seeks back
            while (info := tar.next()) is not None:
                tar.members.clear()
                last, inside = info.name, info.isreg()
                if info.isdir():
                    entries.append((info.name, None))
                elif info.isreg():
                    data = tar.extractfile(info).read()
                    entries.append((info.name, Member(archive, archive, info.name, size=len(data), data=data)))
                inside = False
            error = getattr(tar, "header_error", None)
    except _DAMAGE as e:
        error = e
    if isinstance(error, tarfile.EOFHeaderError):
        return entries, None
    return entries, _broken(archive, last, inside, error)


def _scan_zip(archive: str):
    """(entries, problem) of a zip: from its central directory, or, when that is missing (a truncated
    download), from the local headers up to where it breaks."""
    try:
        with zipfile.ZipFile(archive) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        return _salvage_zip(archive, f"{type(e).__name__}: {e}")
    return [(i.filename, None if i.is_dir() else Member(archive, archive, i.filename, size=i.file_size, codec="zip"))
            for i in infos], None


def _salvage_zip(archive: str, error: str):
    """The members whose local header and bytes are complete, in file order, and where it breaks."""
    entries, last, inside = [], None, False
    with open(archive, "rb") as f:
        size, pos = os.fstat(f.fileno()).st_size, 0
        while True:
            head = f.read(_LOCAL_HEADER.size)
            if len(head) < _LOCAL_HEADER.size or head[:4] != b"PK\x03\x04":  # the end, a cut header or the
                break  # start of the (incomplete) central directory: the members so far are complete
            _, _, flags, method, _, _, _, csize, _, name_len, extra_len = _LOCAL_HEADER.unpack(head)
            name = f.read(name_len).decode("utf-8" if flags & 0x800 else "cp437")
            at = pos + _LOCAL_HEADER.size + name_len + extra_len
            # bit 3: sizes come after the data, so where it ends is unknown; only stored and deflated are read
            if flags & 0x8 or method not in (0, 8) or at + csize > size:
                last, inside = name, True
                break
            entries.append((name, None if name.endswith("/") else
                            Member(archive, archive, name, at, csize, "deflate" if method == 8 else "raw")))
            last, pos = name, at + csize
            f.seek(pos)
    where = f"inside member {last}" if inside else f"after member {last}" if last else "at its first member"
    return entries, ((f"{archive}:{last}" if last else archive),
                     f"{archive}: broken {where} (its central directory is missing or damaged, {error}; "
                     f"a truncated download?)")


def _files(entries: list) -> int:
    """How many regular files `entries` hold, those of nested tars included."""
    return sum(_files(item.entries) if isinstance(item, _Nested) else item is not None for _, item in entries)


def _place(node: _Dir, entries: list, label: str) -> None:
    """Put `entries` (of the archive named `label`) under `node`, as extraction would lay them out."""
    for name, item in entries:
        parts = _split(name)
        if not parts or ".." in parts:  # '..' would point outside the archive: such a member is never extracted
            continue
        folders = parts if item is None else parts[:-1]
        d = node
        for i, part in enumerate(folders):
            d = d.subdir(part, label, "/".join(parts[:i + 1]))
        if isinstance(item, _Nested):  # X.tar appears as the folder X
            _place(d.subdir(parts[-1][:-len(".tar")], item.label, ""), item.entries, item.label)
        elif item is not None:
            d.children[parts[-1]] = item


@total_ordering
class ArchivePath:
    """A read-only path inside a `Tree`, with the part of pathlib.Path's interface the readers use.
    Not os.PathLike on purpose: an archive member cannot be open()ed; read it with read_bytes().
    Pickles as its `member()`, so samples sent to worker processes never carry the tree."""

    __slots__ = ("tree", "parts")

    def __init__(self, tree: Tree, parts: tuple[str, ...] = ()):
        self.tree, self.parts = tree, parts

    def _resolve(self):
        """The _Dir or Member at this path, or the real path it falls through to, or None (missing)."""
        node = self.tree.root
        for i, part in enumerate(self.parts):
            child = node.children.get(part) if isinstance(node, _Dir) else None
            if child is None:
                real = node.real if isinstance(node, _Dir) else None
                return real.joinpath(*self.parts[i:]) if real else None
            node = child
        return node

    def __truediv__(self, other) -> ArchivePath:
        return ArchivePath(self.tree, self.parts + _split(str(other)))

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else self.tree.name

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> ArchivePath:
        return ArchivePath(self.tree, self.parts[:-1])

    def exists(self) -> bool:
        node = self._resolve()
        return node.exists() if isinstance(node, Path) else node is not None

    def is_dir(self) -> bool:
        node = self._resolve()
        return node.is_dir() if isinstance(node, Path) else isinstance(node, _Dir)

    def is_file(self) -> bool:
        node = self._resolve()
        return node.is_file() if isinstance(node, Path) else isinstance(node, Member)

    def iterdir(self):
        node = self._resolve()
        if node is None or isinstance(node, Member):
            raise NotADirectoryError(f"{self} is not a directory")
        names = list(node.children) if isinstance(node, _Dir) else os.listdir(node)
        if isinstance(node, _Dir) and node.real and node.real.is_dir():  # a real folder under an archive's
            names += [n for n in os.listdir(node.real) if n not in node.children]
        return (ArchivePath(self.tree, self.parts + (n,)) for n in names)

    def member(self) -> Member | Path:
        """What a worker reads: the archive Member, or the real file this path falls through to."""
        node = self._resolve()
        if isinstance(node, (Member, Path)):
            return node
        raise (IsADirectoryError if node else FileNotFoundError)(f"{self} is not a file")

    def on_disk(self) -> Path | None:
        """The real path when this one lies outside every archive (a real file or folder), else None."""
        node = self._resolve()
        return node if isinstance(node, Path) else None

    def read_bytes(self) -> bytes:
        return self.member().read_bytes()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def relative_to(self, other: ArchivePath) -> PurePosixPath:
        n = len(getattr(other, "parts", ()))
        if not isinstance(other, ArchivePath) or other.tree is not self.tree or self.parts[:n] != other.parts:
            raise ValueError(f"{self} is not under {other}")
        return PurePosixPath(*self.parts[n:])

    def as_posix(self) -> str:
        return str(self)

    def __str__(self) -> str:
        """The name to show: archive:member inside an archive, the real path outside them."""
        node = self.tree.root
        for i, part in enumerate(self.parts):
            child = node.children.get(part) if isinstance(node, _Dir) else None
            if child is None:  # missing from the archives: shown where it would be
                rest = "/".join(self.parts[i:])
                if isinstance(node, Member):
                    return f"{node}/{rest}"
                return str(node.real / rest) if node.real and node.real.is_dir() else node.display(rest)
            node = child
        return node.display() if isinstance(node, _Dir) else str(node)

    def __repr__(self) -> str:
        return f"ArchivePath({str(self)!r})"

    def __reduce__(self):
        return _unpickle, (self.member(),)

    def __eq__(self, other) -> bool:
        return isinstance(other, ArchivePath) and other.tree is self.tree and other.parts == self.parts

    def __hash__(self) -> int:
        return hash(self.parts)

    def __lt__(self, other: ArchivePath) -> bool:
        if not isinstance(other, ArchivePath):
            return NotImplemented
        return self.parts < other.parts


def _unpickle(member):
    return member


def as_path(src) -> Path | ArchivePath:
    """`src` as a reader's path: an ArchivePath as it is, anything else as a pathlib.Path."""
    return src if isinstance(src, ArchivePath) else Path(src)


def open_src(path, mount: Callable[[list[str]], str] | None = None, skip_bad: bool = False) -> Path | ArchivePath:
    """--src as the readers walk it: `path` unchanged when it is a directory without archives at its
    top level (or missing, or a plain file: the reader reports it); else the root of a Tree of its
    archives, expanded in place, over its real files.

    `mount(member file names) -> prefix` says under which folder an archive's content appears (a
    reader's `mount_point`, e.g. ImageNet's train tar under train/); default: where it lies. Archives
    are placed in name order: a member of a later one replaces the same path of an earlier one.
    An ArchivePath comes back as it is, unless it falls through to a real folder (then that is opened).
    Damage raises a one-line DataError, or with `skip_bad` is listed in `tree.problems`."""
    if isinstance(path, ArchivePath):
        if path.on_disk() is None:
            return path
        path = path.on_disk()
    path = Path(path)
    if path.is_dir():
        archives = [(p, kind) for p in sorted(path.iterdir()) if p.is_file() and (kind := _kind(p))]
        if not archives:
            return path
        tree = Tree(str(path), path.name, path, skip_bad)
    elif path.is_file() and (kind := _kind(path)):
        archives, tree = [(path, kind)], Tree(str(path), path.name, None, skip_bad)
    else:
        return path
    for archive, kind in archives:
        tree.add(archive, kind, mount)
    return ArchivePath(tree)
