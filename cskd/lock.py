"""Exclusive directory locks that the OS releases when their holder dies, and who holds them.

A lock is `flock(2)` on a file inside the directory, held for as long as the holding process keeps
it open. The kernel drops it when that process exits for any reason, SIGKILL and node reboots
included, so a crash never leaves a stale lock to clean by hand. The file holds the holder's host,
pid and Slurm job id (for the message a second writer gets) and exists only while the lock is held.

Shared file systems: Linux NFS clients implement flock with the NFS lock manager (byte-range locks
on the server), so the lock holds across nodes; Lustre does too when mounted with `-o flock`
(without it flock fails with ENOSYS, which is reported, never ignored).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from cskd import distributed
from cskd.errors import RunDirError

ACQUIRE_WAIT_S = 0.5  # `holder` probes hold the lock for microseconds; a real holder holds it for hours
_POLL_S = 0.05


class LockedError(RunDirError):
    """The directory is locked by another live process."""


def describe(record: dict) -> str:
    """'host h, pid 12, Slurm job 34_1, since 2026-...' from a holder record (any field may be missing)."""
    parts = [f"host {record.get('host', '?')}", f"pid {record.get('pid', '?')}"]
    if record.get("job_id"):
        parts.append(f"Slurm job {record['job_id']}")
    if record.get("since"):
        parts.append(f"since {record['since']}")
    return ", ".join(parts)


def _read_record(fd: int) -> dict:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}  # caught between truncate and write, or a foreign file


def _try_flock(fd: int, mode: int, path: Path) -> bool:
    """True if taken, False if another holds it; a file system without flock is one RunDirError."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise RunDirError(f"cannot lock {path} ({e.strerror}): its file system does not support flock (Lustre: "
                          f"mount with -o flock); put the directory on one that does") from None


class DirLock:
    """An exclusive lock on `directory` (created if missing), held until `release` or process exit.

    `what` names the directory in the error a second holder gets ("run dir", "dataset")."""

    def __init__(self, directory: str | os.PathLike, name: str, what: str):
        self.directory, self.what = Path(directory), what
        self.path = self.directory / name
        self._fd: int | None = None
        self._created_dir = False

    def acquire(self, wait_s: float = ACQUIRE_WAIT_S) -> DirLock:
        """Take the lock or raise LockedError naming its holder; directory problems are one RunDirError."""
        self._make_directory()
        deadline = time.monotonic() + wait_s
        while True:
            fd = self._open()
            if _try_flock(fd, fcntl.LOCK_EX, self.path) and self._still_linked(fd):
                self._fd = fd
                self._write_record()
                return self
            record = _read_record(fd)
            os.close(fd)
            if time.monotonic() > deadline:
                self._remove_created_dir()
                raise LockedError(f"{self.directory} is in use by another process ({describe(record)}); one "
                                  f"{self.what} has one writer: wait for it to finish, stop it, or use another "
                                  f"directory")
            time.sleep(_POLL_S)

    def release(self) -> None:
        """Remove the lock file, then drop the lock (in that order: see `_still_linked`)."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        self._remove_created_dir()

    def __enter__(self) -> DirLock:
        return self if self._fd is not None else self.acquire()  # `with lock.acquire(wait_s=0):` works too

    def __exit__(self, *exc) -> None:
        self.release()

    def _make_directory(self) -> None:
        if self.directory.exists() and not self.directory.is_dir():
            raise RunDirError(f"{self.directory} is a file, not a directory; choose another {self.what} path")
        try:
            self._created_dir = not self.directory.exists()
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create {self.what} {self.directory} ({e.strerror}); choose a path you can "
                              f"write to") from None

    def _open(self) -> int:
        try:
            # O_CLOEXEC: a program this process starts must not inherit (and so keep holding) the lock
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as e:
            raise RunDirError(f"cannot write in {self.what} {self.directory} ({e.strerror}); choose a path you "
                              f"can write to") from None

    def _still_linked(self, fd: int) -> bool:
        """After locking: is our file still the one at `path`? A holder unlinks the file just before it
        unlocks, so a waiter may lock a file nobody else will ever open; it must reopen and retry."""
        try:
            same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return same

    def _write_record(self) -> None:
        record = {"host": socket.gethostname(), "pid": os.getpid(), "job_id": distributed.slurm_job_id(),
                  "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)

    def _remove_created_dir(self) -> None:
        """A directory made only to hold the lock goes again (nothing was written into it)."""
        if self._created_dir:
            try:
                self.directory.rmdir()
            except OSError:
                pass  # something was written into it: keep it
            self._created_dir = False


def holder(directory: str | os.PathLike, name: str) -> dict | None:
    """The holder record of `directory`'s lock if a live process holds it now, else None.

    Probes with a shared lock released at once: never blocks, and holders retry for ACQUIRE_WAIT_S."""
    try:
        fd = os.open(Path(directory) / name, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no lock file: nobody holds it
    try:
        if _try_flock(fd, fcntl.LOCK_SH, Path(directory) / name):
            return None
        return _read_record(fd)
    except RunDirError:
        return None  # no flock here: nobody can hold it either
    finally:
        os.close(fd)
