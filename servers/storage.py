"""Crash-safe files for the clouds' data directories.

Everything a cloud keeps on disk is written whole or not at all: the bytes go to a temporary file in
the same directory, are flushed to disk, and the temporary file is renamed over the target
(``os.replace`` is atomic on POSIX), so a reader, or a restart after a crash, sees either the old
file or the new one, never half of one. Directories are created readable by their owner only, and
files that hold secrets get mode 0600 from the moment they exist.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from he_cnn.errors import HECNNError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


class DataDirError(HECNNError):
    """A file in a cloud's data directory is unreadable or inconsistent (found at start)."""

    code = "data_dir_error"


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if it does not exist; return it."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    return path


def atomic_write(path: Path, data: bytes, mode: int = PRIVATE_FILE_MODE) -> None:
    """Replace ``path`` by ``data`` atomically; the file has ``mode`` from creation on."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (best effort where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
