"""Training checkpoints: `<experiment_dir>/checkpoints/NNNNNNN.pt`, written atomically (sharded runs write
folders `NNNNNNN/` instead: runtime/sharded_checkpoint.py; every function here takes both).

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts) so that it loads with
`torch.load(..., weights_only=True)`. The latest one is found by the step number in its name,
never by file time or size. Writing goes to a temporary name in the same folder, is fsynced,
then renamed, so a crash while saving never leaves a broken latest checkpoint.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import torch

from runtime import sharded_checkpoint
from runtime.atomic_file import atomic_write

_NAME = re.compile(r"^(\d{7,})\.pt$")
_FOLDER = re.compile(r"^(\d{7,})$")


def checkpoint_dir(experiment_dir: str | Path) -> Path:
    return Path(experiment_dir) / "checkpoints"


def checkpoint_path(experiment_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(experiment_dir) / f"{step:07d}.pt"


def sharded_path(experiment_dir: str | Path, step: int) -> Path:
    return checkpoint_dir(experiment_dir) / f"{step:07d}"


def list_checkpoints(folder: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished checkpoint in `folder` (files, and finished sharded folders), by step."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if (match := _NAME.match(entry.name)) and entry.is_file():
            found.append((int(match.group(1)), entry))
        elif (match := _FOLDER.match(entry.name)) and sharded_checkpoint.is_sharded(entry):
            found.append((int(match.group(1)), entry))
    return sorted(found)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint file or sharded folder."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def latest_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The checkpoint with the highest step number, or None."""
    found = list_checkpoints(checkpoint_dir(experiment_dir))
    return found[-1][1] if found else None


def save_checkpoint(state: dict, experiment_dir: str | Path, step: int, keep_last: int = 0) -> Path:
    """Atomically write `state` as step `step`, then delete all but the newest `keep_last`."""
    path = checkpoint_path(experiment_dir, step)
    with atomic_write(path) as handle:
        torch.save(state, handle)
    prune(path.parent, keep_last)
    return path


def prune(folder: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` checkpoints (0: keep all)."""
    if keep_last > 0:
        for _, old in list_checkpoints(folder)[:-keep_last]:
            remove_checkpoint(old)


class BrokenCheckpointError(ValueError):
    """A checkpoint file that exists but cannot be loaded (truncated, empty, not a checkpoint)."""


def _safe_globals() -> list:
    """The only classes a checkpoint may contain besides tensors and plain values.

    The reference repos' train.py pickle their arguments next to the weights: DiT and fast-DiT an
    argparse.Namespace, SpeeD an OmegaConf DictConfig. These (and the containers and nodes an
    OmegaConf object is made of) are data; nothing else is ever unpickled (weights_only=True).
    """
    import argparse
    import collections
    import typing

    from omegaconf import DictConfig, ListConfig, base, nodes

    return [argparse.Namespace, DictConfig, ListConfig, base.ContainerMetadata, base.Metadata, nodes.AnyNode,
            nodes.StringNode, nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, nodes.PathNode, nodes.BytesNode,
            typing.Any, dict, list, tuple, int, float, str, bool, collections.defaultdict]


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint on the CPU with weights_only=True (ours, a published DiT file, or one written by
    DiT's, fast-DiT's or SpeeD's train.py); a one-line error if it is missing or broken. A sharded folder is
    consolidated: the same dict as a single-file checkpoint."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise BrokenCheckpointError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    with open(path, "rb") as handle:
        head = handle.read(64)
    if not head.startswith(TORCH_MAGIC):
        raise BrokenCheckpointError(f"cannot read checkpoint {path}: not a torch checkpoint ({_what_it_is(head)})")
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise BrokenCheckpointError(f"cannot read checkpoint {path}: {_why(err)}") from None
    if not isinstance(state, dict):
        raise BrokenCheckpointError(f"cannot read checkpoint {path}: it holds a {type(state).__name__}, not a dict")
    return state


TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save's zip archive; the legacy pickle (protocol >= 2)


def _what_it_is(head: bytes) -> str:
    """A few words on a file's first bytes: its text, or its bytes in hex."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head[:8].hex(' ')}"
    first = text.strip().splitlines()[0][:40] if text.strip() else ""
    return f"a text file starting {first!r}" if first else "a file of white space"


def _load_folder(path: Path) -> dict:
    if not sharded_checkpoint.is_sharded(path):
        raise BrokenCheckpointError(f"cannot read checkpoint {path}: a folder, but not a finished sharded checkpoint "
                                    f"(no {sharded_checkpoint.META} or {sharded_checkpoint.DCP_METADATA})")
    with reading_shards(path):
        return sharded_checkpoint.consolidate(path)


@contextlib.contextmanager
def reading_shards(path: Path):
    """Errors reading a sharded folder's tensors as one BrokenCheckpointError naming the folder and the cause."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException: named on its own

    try:
        yield
    except (Exception, CheckpointException) as err:
        cause = next(iter(getattr(err, "failures", {}).values()), err)  # DCP wraps each rank's (error, trace)
        cause = cause[0] if isinstance(cause, tuple) else cause
        why = _why(cause) if str(cause) else f"{type(cause).__name__} (a truncated or damaged shard file)"
        raise BrokenCheckpointError(f"cannot read sharded checkpoint {path}: {why}") from None


def _why(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    unsafe = re.search(r"GLOBAL ([\w.]+)", str(err))
    if unsafe:  # weights_only refused a class or function: say which; it is never loaded
        return f"it holds an object this tool does not unpickle ({unsafe.group(1)})"
    text = lines[0] if lines else type(err).__name__
    if "central directory" in text or "failed finding" in text or "unexpected eof" in text.lower():
        return f"truncated or not a torch checkpoint ({text})"
    return text


def load_latest_loadable(experiment_dir: str | Path) -> tuple[Path | None, dict | None]:
    """The newest checkpoint that loads, with its content (of a sharded folder: its meta.pt, the tensors are
    loaded sharded by the run). Broken newer ones are moved aside to NNNNNNN.pt.broken / NNNNNNN.broken
    (never deleted) with a message; (None, None) when none is left."""
    for _, path in reversed(list_checkpoints(checkpoint_dir(experiment_dir))):
        try:
            if path.is_dir():
                return path, _read_meta(path)
            return path, load_checkpoint(path)
        except BrokenCheckpointError as err:
            move_aside(path, err)
    return None, None


def move_aside(path: Path, err: Exception) -> None:
    """Rename a broken checkpoint to NNNNNNN[.pt].broken (kept for inspection, never taken again)."""
    aside = path.with_name(path.name + ".broken")
    if aside.is_dir():
        shutil.rmtree(aside)
    os.replace(path, aside)
    print(f"{err}; moved it to {aside} and trying the previous checkpoint", flush=True)


def _read_meta(path: Path) -> dict:
    try:
        return sharded_checkpoint.read_meta(path)
    except Exception as err:
        raise BrokenCheckpointError(f"cannot read checkpoint {path}: {_why(err)}") from None


def resolve_checkpoint(ckpt: str | None, experiment_dir: str | Path) -> Path:
    """`ckpt` if given, else the latest in the run folder; never silently nothing. (Samplers whose
    checkpoints live elsewhere, e.g. distilled students, are located by their method: methods/sampling.py.)"""
    if ckpt:
        path = Path(ckpt)
        if path.is_dir() and not sharded_checkpoint.is_sharded(path):
            raise FileNotFoundError(f"ckpt={ckpt} is a directory, not a checkpoint file (nor a finished sharded "
                                    f"checkpoint folder){_inside(path)}")
        if not path.exists():
            raise FileNotFoundError(f"ckpt={ckpt}: no such checkpoint file")
        return path
    latest = latest_checkpoint(experiment_dir)
    if latest is None:
        raise FileNotFoundError(
            f"no checkpoint in {checkpoint_dir(experiment_dir)}: train first (-p train) or pass ckpt=PATH"
        )
    return latest


def _inside(folder: Path) -> str:
    """What a directory given as a checkpoint holds: the checkpoints in it, or in its checkpoints/ (a run folder)."""
    for where in (folder, checkpoint_dir(folder)):
        found = list_checkpoints(where)
        if found:
            names = ", ".join(p.name for _, p in found[-5:])
            return f"; {where} holds {len(found)} checkpoint(s) ({names}): pass one, e.g. ckpt={found[-1][1]}"
    return "; it holds no checkpoints"
