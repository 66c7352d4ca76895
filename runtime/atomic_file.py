"""The one way this project writes a file that must never be seen half-written.

Write to a temporary name in the same folder, flush and fsync it, rename it over the target,
then fsync the folder: a crash at any moment leaves either the old file or the new one, never a
torn one, and a temporary file only under a name no reader looks at (`.<name>.tmp-<pid>`).
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import BinaryIO, Iterator


class DiskFullError(OSError):
    """No space left while writing a file; the file it would have replaced is untouched."""


def temporary_name(path: str | os.PathLike) -> Path:
    """Where `path` is written before it is renamed into place (readers never look at these names)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces `path` when the block ends without an error.

    A full disk raises DiskFullError naming `path` (not a raw traceback from deep inside a writer),
    and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as err:
        if _is_disk_full(err):
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}") from None
        raise
    except RuntimeError as err:  # torch.save wraps the OSError of its writer in a RuntimeError
        if _is_disk_full(err):
            raise DiskFullError(errno.ENOSPC, f"no space left on device while writing {path}") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def _is_disk_full(err: BaseException) -> bool:
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete half-written files a killed run left in `folder` (call it while holding the run's lock)."""
    folder = Path(folder)
    removed = []
    for stale in folder.glob(".*.tmp-*") if folder.is_dir() else []:
        if stale.is_dir():  # a sharded checkpoint folder that was never finished
            import shutil

            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """For writers that need a file name (h5py): fsync the finished `tmp`, rename it to `path`, fsync the folder."""
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)


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
