"""Checkpoints of sharded runs (train.parallel=fsdp|hsdp): `checkpoints/NNNNNNN/`, one folder per step.

Every rank writes its shards of the weights, the EMA and the optimizer states through
torch.distributed.checkpoint (DCP: `.metadata` + `__<rank>_0.distcp`, fsynced); rank 0 adds `meta.pt`,
everything else a single-file checkpoint holds (step, RNG, scaler, the method's state and the run's
metadata: model_args, autoencoder, config, ...), loadable with weights_only=True. The folder is written
under a temporary name (`.NNNNNNN.tmp-<pid>`) and renamed into place once every rank has finished, so a
half-written step is never taken as the latest; `meta.pt` is the mark of a finished folder.

A sharded run resumes on any number of processes (DCP reshards the tensors to the new mesh). Everything
else (sample, inference, distill.teacher, model.init_from, FID sweeps) reads a folder as one dict of whole
tensors, exactly the layout of a single-file checkpoint (`consolidate`); scripts/consolidate_checkpoint.py
writes that dict as a single file.
"""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch

from runtime import distributed as dist
from runtime.atomic_file import atomic_write, fsync_dir, temporary_name

META = "meta.pt"  # written last: its presence marks a finished folder
DCP_METADATA = ".metadata"
PARTS = "sharded_parts"  # meta.pt's list of the top-level keys stored through DCP ("model", "ema", "optimizers")


def is_sharded(path: str | os.PathLike) -> bool:
    """A finished sharded checkpoint folder."""
    path = Path(path)
    return path.is_dir() and (path / META).is_file() and (path / DCP_METADATA).is_file()


def save(folder: Path, tensors: dict, meta: dict) -> None:
    """Every rank: write `tensors` (a dict of state dicts of DTensors and tensors) and rank 0's `meta` as the
    finished folder `folder`."""
    import torch.distributed.checkpoint as dcp

    tmp = Path(dist.broadcast_object(str(temporary_name(folder)) if dist.is_main() else None))
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    dist.barrier()
    if dist.is_main():
        with atomic_write(tmp / META) as handle:
            torch.save({**meta, PARTS: sorted(tensors)}, handle)
        fsync_dir(tmp)
        if folder.exists():  # a broken leftover of the same step (moved aside runs never get here)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        fsync_dir(folder.parent)
    dist.barrier()


def read_meta(folder: str | os.PathLike) -> dict:
    """The non-tensor part of a sharded checkpoint (raises ValueError when the folder is not a finished one)."""
    folder = Path(folder)
    if not is_sharded(folder):
        raise ValueError(f"{folder} is not a finished sharded checkpoint (no {META} or {DCP_METADATA})")
    return torch.load(folder / META, map_location="cpu", weights_only=True)


def load_into(folder: str | os.PathLike, tensors: dict) -> None:
    """Every rank: fill `tensors` (state dicts shaped for this run's mesh) in place from `folder`, resharded."""
    import torch.distributed.checkpoint as dcp

    dcp.load(tensors, storage_reader=dcp.FileSystemReader(str(folder)))


def consolidate(folder: str | os.PathLike) -> dict:
    """The whole checkpoint in one process, as a single-file checkpoint's dict: full tensors on the CPU, the
    optimizer states keyed by position as torch's optimizers keep them (a DDP run resumes from it)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner, _load_state_dict

    meta = read_meta(folder)
    meta.pop(PARTS, None)
    tensors: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to load in a single process": it is
        _load_state_dict(tensors, storage_reader=FileSystemReader(str(folder)), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    optimizers = {name: indexed(state) for name, state in tensors.pop("optimizers", {}).items()}
    return {**tensors, "optimizers": optimizers, **meta}


def indexed(state: dict) -> dict:
    """An optimizer state keyed by parameter names (torch.distributed.checkpoint.state_dict's form) -> keyed by
    the parameters' positions in the param groups (Optimizer.state_dict()'s form)."""
    position, groups = {}, []
    for group in state["param_groups"]:
        ids = []
        for name in group["params"]:
            position[name] = len(position)
            ids.append(position[name])
        groups.append({**group, "params": ids})
    return {"state": {position[name]: value for name, value in state["state"].items()}, "param_groups": groups}
