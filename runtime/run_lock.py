"""One run per folder: an OS lock held for the whole life of a run, and a shared-filesystem check.

Rank 0 takes an exclusive `flock` on `<folder>/.lock` (released by the kernel when the process
ends, however it ends: no stale locks) and writes its holder (host, pid, start time, a random
token) into the file. A second run on the folder fails at once naming the holder. Under torchrun
every other rank then reads the token back from the same path: a rank on a node that does not see
rank 0's folder (no shared filesystem) fails clearly instead of writing its own private run.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import uuid
from pathlib import Path

from runtime import distributed as dist

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live run holds the folder."""


class RunLock:
    """Context manager: every rank enters it together; rank 0 holds the lock until the exit."""

    def __init__(self, folder: str | os.PathLike, what: str = "experiment_dir", name: str = LOCK_FILE,
                 target: str | os.PathLike | None = None):
        self.folder = Path(folder)
        self.what = what  # the config key that names the locked thing, for the messages
        self.name = name  # the lock file in `folder`
        self.target = Path(target) if target is not None else self.folder
        self.handle = None

    @classmethod
    def for_file(cls, path: str | os.PathLike, what: str) -> "RunLock":
        """A lock on one output file (a cache, an .npz): `.<name>.lock` beside it."""
        path = Path(path)
        return cls(path.parent, what, name=f".{path.name}.lock", target=path)

    def __enter__(self) -> "RunLock":
        error, token = None, None
        if dist.is_main():
            try:
                token = self._acquire()
            except RunLockedError as err:
                error = str(err)
        error, token = dist.broadcast_object((error, token))
        if error:
            self.release()
            raise RunLockedError(error)
        if not dist.is_main():
            check_shared_folder(self.folder / self.name, token, self.what)
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _acquire(self) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.name
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                handle.close()
                raise RunLockedError(
                    f"cannot lock {path} ({err.strerror}): the filesystem of {self.what} does not support flock; "
                    "use a local disk, NFSv4, or Lustre mounted with the flock option"
                ) from None
            handle.seek(0)
            holder = _describe(handle.read())
            handle.close()
            raise RunLockedError(
                f"{self.what} {self.target} is in use by another run ({holder}): wait for it to finish, stop it, "
                f"or use another {self.what}"
            ) from None
        token = uuid.uuid4().hex
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "token": token,
                                 "started": datetime.datetime.now().isoformat(timespec="seconds")}))
        handle.flush()
        self.handle = handle
        return token

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def check_shared_folder(lock_path: Path, token: str, what: str) -> None:
    """This rank must read rank 0's token from the lock file: otherwise it sees another folder."""
    try:
        found = json.loads(Path(lock_path).read_text()).get("token")
    except (OSError, ValueError):
        found = None
    if found != token:
        raise RunLockedError(
            f"rank {dist.rank()} on {socket.gethostname()} does not see the folder {lock_path.parent} ({what}) that rank 0 "
            f"uses (no shared filesystem between the nodes?): point {what} at a folder every node mounts"
        )


def _describe(text: str) -> str:
    try:
        holder = json.loads(text)
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
