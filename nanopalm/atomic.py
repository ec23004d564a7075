"""Atomic file writes: write under a temporary name, then rename into place.

An interrupted or failed write then never leaves a file that looks complete, which is what lets
a later run trust any file it finds.
"""

from __future__ import annotations

import os
from pathlib import Path


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
    finally:
        tmp.unlink(missing_ok=True)
