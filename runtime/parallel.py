"""How the training loop spreads a run over processes: `train.parallel` = ddp | fsdp | hsdp.

One object owns what differs: wrapping the modules, suppressing gradient sync during accumulation, clipping
over (possibly sharded) gradients, the EMA's layout, reading a tensor's local part, and the checkpoint format.

* `ddp` (Replicated): every process holds the whole model, gradients are all-reduced by DDP; single-file
  checkpoints written by rank 0. The default, as DiT.
* `fsdp` / `hsdp` (Sharded): PyTorch's FSDP2 (`fully_shard` over a DeviceMesh, as torchtitan): every block,
  then the whole network, is sharded over the processes (hsdp: over groups of `train.shard_size` processes,
  replicated across groups, a 2-D mesh), so parameters, gradients, AdamW's moments and the EMA cost 1/N
  each per process. Blocks are gathered for their forward and backward and freed after. bf16 runs use
  FSDP's mixed precision (bf16 parameters and compute, fp32 gradient reduction and master weights). The
  EMA is a second sharded copy, updated shard by shard without gathering. Checkpoints are DCP folders
  (runtime/sharded_checkpoint.py) written by every rank, resumable on another number of processes.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from runtime import distributed as dist
from runtime.ema import create_ema


SHARDED = ("fsdp", "hsdp")  # the train.parallel values whose modules are sharded (every rank runs their forward)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a (possibly sharded) tensor."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class Replicated:
    """DDP (or one plain process): the modules whole on every rank. `functional`: the method's loss applies
    torch.func to the network (MeanFlow's JVP), which cannot run through DDP: the modules stay bare and
    `reduce_gradients` averages the gradients over the ranks, as DDP's all-reduce would."""

    name = "ddp"
    sharded = False

    def __init__(self, functional: bool = False):
        self.functional = functional

    def setup(self, modules: dict, settings, want_ema: bool) -> nn.Module | None:
        """Lay the modules out for training (in place); the EMA of "model", or None."""
        return create_ema(modules["model"]) if want_ema else None

    def wrap(self, modules: dict, settings, device: torch.device) -> dict:
        """The modules as the loss calls them: compiled if asked, DDP under torchrun."""
        nets = {}
        for name, module in modules.items():
            net = torch.compile(module) if settings.compile else module
            if dist.world_size() > 1 and not self.functional:
                net = DistributedDataParallel(net, device_ids=[dist.local_rank()] if device.type == "cuda" else None)
            nets[name] = net
        return nets

    @contextlib.contextmanager
    def no_sync(self, nets: dict):
        """No gradient all-reduce inside (the micro-batches before the last)."""
        with contextlib.ExitStack() as stack:
            for net in nets.values():
                if isinstance(net, DistributedDataParallel):
                    stack.enter_context(net.no_sync())
            yield

    def reduce_gradients(self, params: list) -> None:
        """After the last micro-batch: the mean of every rank's gradients, when DDP did not take them (functional
        methods); one flat all-reduce. A parameter without a gradient counts as zeros, as in DDP."""
        if not self.functional or dist.world_size() == 1:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= dist.world_size()
        for grad, mean in zip(grads, _unflatten_dense_tensors(flat, grads)):
            grad.copy_(mean)

    def clip(self, params: list, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` (inf: only measure); the total norm over every rank's gradients."""
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def state_tensors(self, modules: dict, ema: nn.Module | None, optimizers: dict, objectives: list) -> dict:
        """The checkpoint's tensors: each module's, the EMA's and each objective's optimizer state."""
        tensors = {name: module.state_dict() for name, module in modules.items()}
        if ema is not None:
            tensors["ema"] = ema.state_dict()
        tensors["optimizers"] = {o.name: self._optimizer_state(modules, o, optimizers[o.name]) for o in objectives}
        return tensors

    def load_tensors(self, saved: dict, modules: dict, ema: nn.Module | None, optimizers: dict,
                     objectives: list) -> None:
        """The inverse of `state_tensors` (`saved["optimizers"]` missing: a checkpoint from before the
        training-method seam, with its one "optimizer")."""
        for name, module in modules.items():
            module.load_state_dict(saved[name])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        states = saved.get("optimizers") or {"model": saved["optimizer"]}
        for objective in objectives:
            self._load_optimizer(modules, objective, optimizers[objective.name], states[objective.name])

    def _optimizer_state(self, modules: dict, objective, optimizer) -> dict:
        return optimizer.state_dict()

    def _load_optimizer(self, modules: dict, objective, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)


class Sharded(Replicated):
    """FSDP2 over a 1-D mesh (fsdp) or a 2-D (replicate, shard) mesh (hsdp)."""

    sharded = True

    def __init__(self, name: str, mesh_shape: tuple, precision: str, device: torch.device):
        from torch.distributed.device_mesh import init_device_mesh

        super().__init__()
        self.name = name
        names = ("replicate", "shard") if len(mesh_shape) == 2 else ("shard",)
        self.mesh = init_device_mesh(device.type, mesh_shape, mesh_dim_names=names)
        self.precision = precision

    def setup(self, modules: dict, settings, want_ema: bool) -> nn.Module | None:
        ema = create_ema(modules["model"]) if want_ema else None  # copied whole, then sharded alike
        for module in modules.values():
            self._shard(module, settings.compile, training=True)
        if ema is not None:
            self._shard(ema, False, training=False)
        return ema

    def _shard(self, module: nn.Module, compile_blocks: bool, training: bool) -> None:
        """Each transformer block, then the rest of the network, as one sharded unit (compiled per block)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy()
        if training and self.precision == "bf16":
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in getattr(module, "blocks", []):
            if compile_blocks:
                block.compile()
            fully_shard(block, mesh=self.mesh, mp_policy=policy)
        # The root resharded after its forward too (as torchtitan): else an evaluation's forward leaves the
        # network gathered until the next backward, and the EMA update would see whole tensors.
        fully_shard(module, mesh=self.mesh, mp_policy=policy, reshard_after_forward=True)

    def wrap(self, modules: dict, settings, device: torch.device) -> dict:
        return dict(modules)  # a sharded module is its own wrapper

    @contextlib.contextmanager
    def no_sync(self, nets: dict):
        for net in nets.values():
            net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            for net in nets.values():
                net.set_requires_gradient_sync(True)

    def clip(self, params: list, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    # Optimizer states keyed by parameter names (DCP reshards them to another mesh; consolidation turns them into
    # Optimizer.state_dict()'s positions, so a DDP run can continue from a sharded checkpoint).
    def _optimizer_state(self, modules: dict, objective, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(_networks(modules, objective), optimizer)

    def _load_optimizer(self, modules: dict, objective, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(_networks(modules, objective), optimizer, state)


def _networks(modules: dict, objective) -> nn.ModuleDict:
    """The networks an objective's optimizer steps, under their names (the optimizer state's name prefixes)."""
    return nn.ModuleDict({name: modules[name] for name in objective.modules})


def check(parallel: str, shard_size: int, precision: str, objectives: int, functional: bool = False) -> tuple:
    """The mesh shape for train.parallel (() for ddp), or a clear error, before any work."""
    from runtime.config import ConfigError

    if parallel == "ddp":
        return ()
    world = dist.world_size()
    if not dist.is_initialized():
        raise ConfigError(f"train.parallel={parallel} shards the model over processes: launch with torchrun "
                          "(torchrun --nproc_per_node=N main.py ...), or use train.parallel=ddp for one process")
    if precision == "fp16":
        raise ConfigError(f"train.parallel={parallel} with train.precision=fp16: use bf16 (no loss scaling needed) "
                          "or fp32")
    if objectives > 1:
        raise ConfigError(f"train.parallel={parallel}: this method trains several networks in alternation, which "
                          "the sharded loop does not support; use train.parallel=ddp")
    if functional:
        raise ConfigError(f"train.parallel={parallel}: this method differentiates the network forward-mode "
                          "(torch.func.jvp), which cannot run through FSDP's gathering hooks; use train.parallel=ddp")
    if parallel == "fsdp":
        return (world,)
    shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if shard < 1 or world % shard:
        raise ConfigError(f"train.parallel=hsdp: {world} processes do not split into sharding groups of "
                          f"train.shard_size={shard} (it must divide the number of processes)")
    return (world // shard, shard)


def strategy(parallel: str, shard_size: int, precision: str, objectives: int, device: torch.device,
             functional: bool = False) -> Replicated:
    """The strategy for train.parallel (checked first: see `check`)."""
    shape = check(parallel, shard_size, precision, objectives, functional)
    return Sharded(parallel, shape, precision, device) if shape else Replicated(functional)
