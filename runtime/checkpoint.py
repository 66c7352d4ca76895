"""Training checkpoints: `<experiment_dir>/checkpoints/NNNNNNN.pt`, written atomically.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) so that it loads with
`torch.load(..., weights_only=True)`. The latest one is found by the step number in its name,
never by file time or size. Writing goes to a temporary name in the same folder, is fsynced,
then renamed, so a crash while saving never leaves a broken latest checkpoint.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

_NAME = re.compile(r"^(\d{7,})\.pt$")


def checkpoint_dir(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / "checkpoints"


def checkpoint_path(experiment_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(experiment_dir) / f"{step:07d}.pt"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in `folder`, sorted by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step number, or None."""
    found = list_checkpoints(checkpoint_dir(experiment_dir))
    return found[-1][1] if found else None


def save_checkpoint(state: dict, experiment_dir: str | Path, step: int, keep_last: int = 0) -> Path:
    """Atomically write `state` as step `step`, then delete all but the newest `keep_last`."""
    path = checkpoint_path(experiment_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    if keep_last > 0:
        for _, old in list_checkpoints(path.parent)[:-keep_last]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on the CPU with weights_only=True; a clear error if it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None


def resolve_checkpoint(ckpt: str | None, experiment_dir: str | Path) -> Path:
    """`ckpt` if given, else the latest in the run folder; never silently nothing."""
    if ckpt:
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint file")
        return path
    latest = latest_checkpoint(experiment_dir)
    if latest is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(experiment_dir)}: train first (-p train) or pass ckpt=PATH"
        )
    return latest


def _fsync_dir(folder: Path) -> None:
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
