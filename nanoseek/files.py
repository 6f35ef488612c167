"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Everything is written to `<path>.tmp` next to its destination and moved over it with `os.replace`,
which is atomic on POSIX and Windows when both are on the same file system.
"""

from __future__ import annotations

import os
from typing import Callable


def atomic(path: str, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)`, then move the finished file to `path`."""
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    """`text` (UTF-8) at `path`, written atomically."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic(path, write)
