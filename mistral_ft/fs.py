"""Crash-safe file writes: a crash leaves the old file or the new one, never a torn mix.

Why: a job killed by preemption, the OOM killer or a power cut can die mid-write, and without an
fsync the page cache may not have reached the disk, so a file that exists can still be short. Every
writer that must survive that (checkpoints, last.ckpt, the export's published folder) goes through here.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from mistral_ft.errors import UserError

TMP_MARK = ".tmp-"


class OutOfSpaceError(UserError):
    """A write failed because the file system is full (ENOSPC) or over quota (EDQUOT); names path and free space."""


def free_space(path: str | os.PathLike) -> str:
    """Free space on the file system holding `path` (its nearest existing parent), e.g. '12.3 MB free of 1.0 TB'."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        usage = shutil.disk_usage(p)
    except OSError:
        return "free space unknown"
    return f"{_size(usage.free)} free of {_size(usage.total)}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # pragma: no cover


def is_out_of_space(err: BaseException) -> bool:
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def out_of_space(err: OSError, path: str | os.PathLike | None = None) -> OutOfSpaceError:
    """The message for a full disk: which file could not be written and how much room is left there."""
    target = path if path is not None else (err.filename or "a file")
    where = free_space(target) if (path is not None or err.filename) else "free space unknown"
    return OutOfSpaceError(f"{target}: no space left on the device ({err.strerror or err}; {where} on that file "
                           "system). Free some space or choose a folder on another disk; a checkpoint already "
                           "written is complete (resume=auto continues from it)")


def temp_path(path: Path) -> Path:
    """Where `atomic_write_bytes` writes before the rename: `.NAME.tmp-PID` in the same folder (never a
    checkpoint candidate: runs.newest_checkpoint skips TMP_MARK)."""
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, never a mix.

    temp file in the same folder (same file system: the rename is atomic) -> fsync -> os.replace ->
    fsync of the folder (so the rename itself survives a power cut).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if is_out_of_space(err):
            raise out_of_space(err, path) from None
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems (and Windows) cannot open a folder: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
