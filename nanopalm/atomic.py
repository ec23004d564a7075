"""Writing files safely: atomic writes (a temporary name, then a rename), and output directories checked
before any work, so that a bad path is one clear error and never a half-written file.

An interrupted or failed write never leaves a file that looks complete, which is what lets a later run
trust any file it finds.
"""

from __future__ import annotations

import os
from pathlib import Path

from nanopalm.errors import UserError


def temporary_path(path: Path) -> Path:
    """The name a file is written under before `os.replace` publishes it (`*.tmp`, git-ignored)."""
    return path.with_name(path.name + ".tmp")


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes reach the disk before the name does
        os.replace(tmp, path)
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror}): give a path in a writable directory") from None
    finally:
        tmp.unlink(missing_ok=True)


def ensure_dir(path: str | Path, flag: str) -> Path:
    """The output directory `path` (given as `flag`), created if need be; a file in its place or a place
    where it cannot be created is one UserError that names the flag."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag}={path} is a file, not a directory: give a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {flag}={path} ({e.strerror}): give a directory in a writable place") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag}={path} is not writable: give a directory in a writable place")
    return path
