"""Crash-safe file primitives shared by the log, the segments and the stores (a leaf module)."""

from __future__ import annotations

import os


def fsync_dir(directory: str) -> None:
    """Make a directory's entries (created, renamed, removed files) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text``: temp file, fsync, rename, fsync of the directory.

    After a crash the file holds either the old or the new text, never a mix.
    """
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")
