"""What an output directory already holds, and whether a conversion may write there.

A conversion never silently replaces a different one: a training run resumed on a directory whose
files were rewritten with another split seed would continue on another train/test split. So
before any work, `inspect` compares the *request* (dataset name, classes, conversion parameters,
reader parameters, source files and their sha256) with the one recorded in DIR/meta.json:

- the same request, complete files: up to date, nothing to do (unless --force);
- the same request, damaged files: rewritten (the result is the same conversion);
- another request, an unreadable meta.json, or files without a meta.json (an interrupted
  replacement, or another program's directory): refused without --force, naming what differs.

The tool's own temporary files (`.prep-*`, see datasets_prep.staging) are not "files": a stale
folder is removed, a held lock means another conversion is writing there, which is always refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from cskd.errors import DataError
from cskd.fileio import nearest_existing
from datasets_prep import staging

FORCE_HINT = "pass --force to replace it (runs trained on the current files will refuse to resume on the new ones)"
_MISSING = object()


def _short(value) -> str:
    """A value as it reads in an error line: JSON, cut to 40 characters."""
    if value is _MISSING:
        return "(none)"
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'a.b.c: old -> new' for every leaf where two nested dicts differ, in `new`'s key order."""
    found = []
    for key in [*new, *(k for k in old if k not in new)]:
        a, b = old.get(key, _MISSING), new.get(key, _MISSING)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            found += differences(a, b, f"{prefix}{key}.")
        else:
            found.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return found


def check_path(out: Path) -> None:
    """`out` is a directory or can become one (its nearest existing ancestor is a writable directory)."""
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out} is a file, not a directory; pass a directory (it is created if missing)")
    base = nearest_existing(out)
    if not base.is_dir():
        raise DataError(f"--out {out} cannot be created: {base} is a file, not a directory; pass another --out")


def check_writable(out: Path) -> None:
    """The directory that will receive the files (or the ancestor that will hold it) is writable."""
    base = nearest_existing(out)
    if not os.access(base, os.W_OK | os.X_OK):
        raise DataError(f"--out {out} is not writable ({base}: permission denied); choose another directory "
                        f"or fix its permissions")


def _complete(out: Path, old: dict) -> bool:
    """Every file meta.json lists is there with its recorded size."""
    files = old.get("files")
    if not isinstance(files, dict) or not files:
        return False
    return all(isinstance(info, dict) and (out / name).is_file() and (out / name).stat().st_size == info.get("bytes")
               for name, info in files.items())


def _read_meta(path: Path) -> dict:
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise DataError(f"{path} is unreadable ({type(e).__name__}: {e}), so {path.parent} may hold any "
                        f"conversion; {FORCE_HINT}, or choose another --out") from None
    if not isinstance(old, dict):
        raise DataError(f"{path} holds a JSON {type(old).__name__}, not a conversion record; {FORCE_HINT}, "
                        f"or choose another --out")
    return old


def inspect(out: Path, request: dict, force: bool) -> bool:
    """True if `out` already holds exactly this conversion (nothing to do); False if it may be
    written; raises a one-line DataError if it must not be (see the module docstring)."""
    check_path(out)
    busy = staging.busy_error(out)
    if busy:
        raise busy
    if not out.is_dir():
        check_writable(out)
        return False
    meta = out / "meta.json"
    if meta.exists():
        old = _read_meta(meta) if not force else None
        if old is not None:
            wanted = json.loads(json.dumps(request))  # as it would read back from meta.json
            diffs = differences({k: old.get(k, _MISSING) for k in wanted}, wanted)
            if diffs:
                more = f"; and {len(diffs) - 3} more" if len(diffs) > 3 else ""
                raise DataError(f"{out} holds another conversion ({'; '.join(diffs[:3])}{more}); {FORCE_HINT}")
            if _complete(out, old):
                return True
    elif not force:
        try:
            others = sorted(p.name for p in out.iterdir() if not p.name.startswith(staging.PREFIX))  # lock too
        except OSError as e:
            raise DataError(f"--out {out} cannot be listed ({e.strerror or e}); fix its permissions or choose "
                            f"another --out") from None
        if others:
            listed = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise DataError(f"{out} holds files but no meta.json ({listed}): an interrupted conversion or another "
                            f"program's directory; pass --force to write the dataset into it, or choose an "
                            f"empty --out")
    check_writable(out)
    return False
