"""Crash-safe files for the clouds' data directories.

Everything a cloud keeps on disk is written whole or not at all: the bytes go to a temporary file in
the same directory, are flushed to disk, and the temporary file is renamed over the target
(``os.replace`` is atomic on POSIX), so a reader, or a restart after a crash, sees either the old
file or the new one, never half of one. Directories are created readable by their owner only, and
files that hold secrets get mode 0600 from the moment they exist.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable, Iterator

from he_cnn.errors import HECNNError
from he_cnn.files import atomic_write, fsync_dir  # noqa: F401  (re-exported for the servers)

PRIVATE_DIR_MODE = 0o700


class DataDirError(HECNNError):
    """A file in a cloud's data directory is unreadable or inconsistent (found at start)."""

    code = "data_dir_error"


log = logging.getLogger("he_cnn.servers.storage")


def stored_dirs(root: Path, valid: Callable[[Path], bool], what: str) -> Iterator[Path]:
    """The committed entries of a store (each ``valid``), in name order, at start. A store stages new
    entries in dot-directories renamed into place when complete: one left over is an interrupted write
    of ``what`` and is removed; any other entry stops the start (:class:`DataDirError`)."""
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            log.info("removing %s, left over from an interrupted %s", entry, what)
            shutil.rmtree(entry, ignore_errors=True)
        elif not valid(entry):
            raise DataDirError(f"{root} holds an unexpected entry {entry}; move it away")
        else:
            yield entry


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if it does not exist; return it."""
    path.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    return path


