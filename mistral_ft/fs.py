"""Crash-safe file writes: a crash leaves the old file or the new one, never a torn mix.

Why: a job killed by preemption, the OOM killer or a power cut can die mid-write, and without an
fsync the page cache may not have reached the disk, so a file that exists can still be short. Every
writer that must survive that (checkpoints, last.ckpt, the export's published folder) goes through here.
"""

from __future__ import annotations

import os
from pathlib import Path

TMP_MARK = ".tmp-"


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
    except BaseException:
        tmp.unlink(missing_ok=True)
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
