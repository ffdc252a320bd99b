"""Filling a (small, test-mounted) file system for the full-disk tests of the process and cluster
tiers. Imports: the standard library only."""

from __future__ import annotations

import errno
from pathlib import Path


def fill(directory: Path) -> Path:
    """Writes zeros into directory until its file system is full (ENOSPC); returns the file."""
    path = directory / "fill"
    block = b"\0" * 65536
    with open(path, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return path
