"""The one way this project writes a file that must never be seen half-written.

Write to a temporary name in the same folder, flush and fsync it, rename it over the target,
then fsync the folder: a crash at any moment leaves either the old file or the new one, never a
torn one, and a temporary file only under a name no reader looks at (`.<name>.tmp-<pid>`).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces `path` when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text.encode("utf-8"))


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in `folder` durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
