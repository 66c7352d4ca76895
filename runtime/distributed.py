"""torchrun / DDP plumbing: the same code runs as one plain process or as N ranks.

NCCL on CUDA, gloo on CPU. Every helper is a no-op (or the identity) without a process group,
so phases never branch on whether they were launched with torchrun.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as tdist


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init() -> None:
    """Join the process group torchrun describes in the environment (if any; of one process too, which a
    sharded run needs for its device mesh)."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ
    if is_initialized() or not launched:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        backend = "nccl"
    else:
        backend = "gloo"
    tdist.init_process_group(backend=backend, timeout=timedelta(minutes=30))


def shutdown() -> None:
    """Leave the process group (no barrier: a rank that failed must not hang the others' exit)."""
    global _CPU_GROUP
    if is_initialized():
        tdist.destroy_process_group()
    _CPU_GROUP = None


_CPU_GROUP = None


def cpu_group():
    """A gloo group for small host-side exchanges that must not wait for the GPU stream.

    Created on first use: every rank must make that first call at the same point.
    """
    global _CPU_GROUP
    if _CPU_GROUP is None and is_initialized():
        _CPU_GROUP = tdist.new_group(backend="gloo")
    return _CPU_GROUP


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; the input is left untouched)."""
    out = tensor.detach().clone()
    if is_initialized():
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        out /= world_size()
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    out = tensor.detach().clone()
    if is_initialized():
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors from every rank along dim 0, in rank order."""
    if not is_initialized():
        return tensor.detach().clone()
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    tdist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


def broadcast_object(obj):
    """Rank 0's Python object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]
