"""Files written whole or not at all, and on disk before anything relies on them.

A file is written under a temporary name of its own beside its final one (two writers never
share one), flushed to the disk, renamed over the final name, and the folder is flushed so the
rename is on disk too: a process killed or a machine that loses power while writing leaves the
previous file or the new one, never part of one, and a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` writes the file's content to ``tmp``; it then replaces ``path``. If
    ``write`` fails, ``path`` is left as it was and the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    sync(path.parent)


def sync_tree(folder: Path) -> None:
    """Flush every file and folder under ``folder`` (itself included) to the disk: before a
    folder written file by file is renamed into place."""
    for root, _, files in os.walk(folder):
        for name in files:
            sync(Path(root) / name)
        sync(Path(root))


def sync(path: Path) -> None:
    """Flush a file, or a folder's entries (a rename in it), to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
