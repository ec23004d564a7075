"""Writing files safely: atomic writes of files and directories (a temporary name, then a rename), and output
directories checked before any work, so that a bad path is one clear error and never a half-written file.

An interrupted or failed write never leaves a file (or a checkpoint directory) that looks complete, which is
what lets a later run trust any file it finds.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from nanopalm.errors import UserError, out_of_memory


def file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0644 under the usual 022). Some writers
    (safetensors' save_file) make their files 0600; a run's files all get this one, as its other files have."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


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


def check_dir(path: str | Path, flag: str) -> Path:
    """The output directory `path` (given as `flag`), checked to exist or to be creatable but left as it
    was, so that a job that then fails on its input leaves nothing behind; a bad place is one UserError."""
    path = Path(path).expanduser()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        return ensure_dir(path, flag)
    finally:
        for level in missing:  # deepest first; only what the probe created, all empty
            try:
                level.rmdir()
            except OSError:  # the ranks of one job probe the same path at once: another removed it, or uses it
                pass


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


# ---- directories, written by one process or by several at once (the ranks of a sharded checkpoint) ----
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def failure_reason(error: BaseException) -> str:
    """The OS's reason for a failed write ("No space left on device"): torch wraps it in its own errors."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is not None and cause.strerror:
        return cause.strerror
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class WriteFailed(Exception):
    """A write failed in some process of the group; the reason (failure_reason), the same in every one."""


def _one(value: object) -> list:
    return [value]


def write_directory(final: Path, write: Callable[[Path], None], manifest: Callable[[dict[str, str]], bytes],
                    manifest_name: str, errors: tuple[type[BaseException], ...] = (OSError, RuntimeError),
                    share: tuple[int, int] = (0, 1), gather: Callable[[object], list] = _one) -> None:
    """Publish directory `final` whole or not at all. `write(tmp)` fills a temporary directory, in every
    process of a group at once (`share`: this process's index and their number; `gather`: an all-gather
    among them); every file is then fsync'ed and hashed with SHA-256, each process its share of them; the
    first process writes the manifest, `manifest({file: sha256})`, last, and renames the directory into
    place (a directory already there moved aside first, never half-deleted). A failure (`errors`) in any
    process raises WriteFailed in every one, none waiting for one that has given up; the temporary
    directory is removed and whatever was at `final` stays as it was."""
    tmp, old = temporary_path(final), final.with_name(final.name + ".old")
    first, checksums = share[0] == 0, {}

    def prepare() -> None:
        if first:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

    def hash_share() -> None:
        mode = file_mode()
        for name in sorted(p.name for p in tmp.iterdir())[share[0]::share[1]]:
            os.chmod(tmp / name, mode)
            fsync(tmp / name)
            checksums[name] = sha256(tmp / name)

    def publish() -> None:
        if first:
            (tmp / manifest_name).write_bytes(manifest(checksums))
            fsync(tmp / manifest_name)
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            fsync(final.parent)
            shutil.rmtree(old, ignore_errors=True)

    def together(work: Callable[[], None]) -> None:
        reason, error = None, None
        try:
            work()
        except errors as e:
            reason, error = failure_reason(e), e
        reasons = [r for r in gather(reason) if r]
        if error is not None and out_of_memory(error):
            raise error  # not a write failure: run_cli names what ran out of memory
        if reasons:
            raise WriteFailed(reasons[0])

    try:
        together(prepare)
        together(lambda: write(tmp))
        together(hash_share)
        for part in gather(checksums):
            checksums.update(part)
        together(publish)
    except BaseException:
        if first:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
