"""A conversion's temporary folder, its lock, and the worker processes that must not outlive it.

Everything temporary of a conversion lives in one folder inside the output directory,
`DIR/.prep-XXXXXXXX` (the new .beton files), so there is one place to clean. The converting process
holds DIR's lock (`cskd.lock`: flock on `DIR/.prep-lock`) for its whole life; the kernel drops it
when the process dies, however it dies (SIGKILL and the OOM killer included). So a conversion that
takes the lock knows every `.prep-*` folder it finds was left by a killed one and removes it, and a
second conversion into DIR at the same time is refused. Forked workers share the lock's open file,
so DIR stays locked while any of them lives.

Worker processes (the pool that decodes and encodes images) would survive a SIGKILL of the
converting process: nothing tells them, and they block on queues whose other end they hold
themselves (measured with FFCV's writer workers: one holding ~0.5 GB stayed alive indefinitely).
So while a conversion runs, every process forked from it asks the kernel to SIGKILL it when the
converting thread dies (Linux `prctl(PR_SET_PDEATHSIG)`). The request is made in an
`os.register_at_fork` child hook, i.e. in the child right after fork and before any of its Python
code runs, so it covers any pool, whatever initializer it offers. A process group would not help:
SIGKILL of the parent sends nothing to the group. Elsewhere than Linux the call is skipped (workers
may then outlive a killed run).
"""
from __future__ import annotations

import ctypes
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cskd.errors import DataError, RunDirError
from cskd.lock import DirLock, LockedError, describe, holder

PREFIX = ".prep-"  # only folders named so, directly inside the output directory, are ever removed
LOCK = ".prep-lock"  # the output directory's lock (cskd.lock): one conversion at a time writes there
PR_SET_PDEATHSIG = 1

_prctl = None
if sys.platform.startswith("linux"):
    try:  # resolved here, not in the child: dlopen after fork in a threaded parent can deadlock
        _prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        pass
_armed = 0  # > 0 while a conversion runs: forked children then die with this process
_forking_pid = 0  # set just before each fork, read by the child: the pid it expects as parent


def die_with_parent(parent_pid: int) -> None:
    """In a child process: ask the kernel for SIGKILL when the parent thread dies; if the parent
    already died (between fork and this call), exit now. Linux only; elsewhere a no-op."""
    if _prctl is None:
        return
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # reparented: the parent is gone and no signal will come
        os._exit(1)


def _before_fork() -> None:
    global _forking_pid
    _forking_pid = os.getpid()


def _after_fork_in_child() -> None:
    if _armed:
        die_with_parent(_forking_pid)


if _prctl is not None:
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextmanager
def children_die_with_me():
    """While active, every process forked from this one dies when this (thread of the) process does.
    PR_SET_PDEATHSIG fires when the forking *thread* exits: fork from the thread that runs the
    conversion (ProcessPoolExecutor with the fork context starts its workers from the submitting thread)."""
    global _armed
    _armed += 1
    try:
        yield
    finally:
        _armed -= 1


def children() -> set:
    """The multiprocessing children of this process that have not been joined, dead ones included:
    `multiprocessing.active_children()` would reap a dead one before it could be noticed."""
    return set(getattr(multiprocessing.process, "_children", ()))


def cause(code: int) -> str:
    """How a child ended, from its multiprocessing exitcode (negative: the signal that killed it)."""
    if code >= 0:
        return f"exit code {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:  # a real-time signal has no name
        name = f"signal {-code}"
    return f"killed by {name}" + (", e.g. by the kernel's out-of-memory killer" if name == "SIGKILL" else "")


def remove_stale(out: Path) -> list[Path]:
    """Remove the temporary folders that killed conversions left in `out`; returns them. Takes the
    directory's lock for it (nothing if a live conversion holds it: its folder is not stale)."""
    try:
        lock = DirLock(out, LOCK, "dataset directory").acquire(wait_s=0)
    except RunDirError:
        return []
    try:
        return _remove_folders(out)
    finally:
        lock.release()


def _remove_folders(out: Path) -> list[Path]:
    """Every `.prep-*` folder directly inside `out`; only for the holder of `out`'s lock, for whom
    none can belong to a live conversion. Best effort: one that cannot be removed stays."""
    try:
        folders = sorted(p for p in out.iterdir() if p.name.startswith(PREFIX) and p.is_dir())
    except OSError:
        return []
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return [f for f in folders if not f.exists()]


def busy_error(out: Path) -> DataError | None:
    """The error for a conversion into `out` while a live one writes there, or None if none does."""
    record = holder(out, LOCK)
    if record is None:
        return None
    return DataError(f"{out} is being written by another conversion ({describe(record)}); wait for it to "
                     f"finish, or choose another --out")


class Staging:
    """The conversion's private folder `out/.prep-XXXXXXXX`, created under `out`'s lock, held while it lives.

    Entering creates `out` if needed, takes its lock (refused if another live conversion holds it),
    removes the folders of killed conversions and makes this one's. Leaving removes the folder, and
    `out` (with any parent directories it needed) if this conversion created it and failed: no trace
    of a conversion that never completed.
    """

    def __init__(self, out: Path):
        self.out, self.path, self._lock, self._created = out, None, None, None

    def __enter__(self) -> Staging:
        created = self.out
        while not created.parent.exists() and created.parent != created:
            created = created.parent
        self._created = None if self.out.exists() else created  # the top-most directory this run makes
        try:
            self._lock = DirLock(self.out, LOCK, "dataset directory").acquire()
        except LockedError:
            self._close(failed=True)
            raise busy_error(self.out) or DataError(f"{self.out} is being written by another conversion; wait "
                                                    f"for it to finish, or choose another --out") from None
        except RunDirError as e:  # cannot create or write the directory
            self._close(failed=True)
            raise DataError(f"--out {self.out} is not writable: {e}") from None
        _remove_folders(self.out)
        try:
            self.path = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.out))
        except OSError as e:
            self._close(failed=True)
            raise DataError(f"--out {self.out} is not writable ({e.strerror or e}); choose another directory "
                            f"or fix its permissions") from None
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._close(failed=exc_type is not None)
        return False

    def _close(self, failed: bool) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock is not None:
            self._lock.release()  # after the folder is gone
            self._lock = None
        if failed and self._created is not None:
            shutil.rmtree(self._created, ignore_errors=True)
