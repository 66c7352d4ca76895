"""One training loop for every method (IDDPM training, progressive distillation, ...).

Written once: the data order, DDP, mixed precision, gradient accumulation and clipping, EMA,
atomic checkpoints, exact resume, the NaN stop and logging. A method (methods/base.py) supplies
its modules, objectives and the loss of a micro-batch.

Exact resume: everything random in a step is seeded from (seed, step, rank) and the data order
from (seed, step), so a run resumed from a checkpoint continues exactly as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from methods.base import Method
from models.flops import mfu, peak_tflops
from runtime import distributed as dist
from runtime import parallel, sharded_checkpoint
from runtime.atomic_file import DiskFullError, remove_stale_temporaries
from runtime.checkpoint import (
    BrokenCheckpointError,
    checkpoint_dir,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
    load_latest_loadable,
    move_aside,
    prune,
    reading_shards,
    remove_checkpoint,
    save_checkpoint,
    sharded_path,
)
from runtime.config import ConfigError
from runtime.console import MetricsLog, format_metrics, info, progress_bar
from runtime.data_stream import StreamBatchSampler, mix_seed
from runtime.ema import update_ema
from runtime.lr_schedule import learning_rate
from runtime.model_spec import check_same_model
from runtime.precision import autocast
from runtime.preemption import Preempted, StopSignals


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left as it was."""


@dataclass(frozen=True)
class LoopSettings:
    """How to optimise; `train.*` for training, `distill.*` (one stage) for distillation."""

    seed: int
    batch_size: int  # global, over processes and accumulation steps
    max_steps: int
    lr: float
    grad_accum: int = 1
    betas: tuple = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"
    min_lr: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (the norm is still logged)
    ema_decay: float = 0.0  # 0: no EMA
    precision: str = "fp32"
    compile: bool = False
    ckpt_every: int = 1000
    ckpt_every_minutes: float = 0.0  # > 0: also a checkpoint every this many minutes (one such kept)
    keep_last: int = 0
    log_every: int = 100
    progress: bool = True
    num_workers: int = 0
    desc: str = "train"
    flops_per_image: float = 0.0  # model FLOPs of one update per image (models/flops.py), for MFU
    peak_tflops: float = 0.0  # the device's dense peak; 0: from its name when known (else no MFU)
    parallel: str = "ddp"  # runtime/parallel.py: ddp | fsdp | hsdp
    shard_size: int = 0  # hsdp's sharding group (0: the processes of a node)

    @classmethod
    def from_config(cls, section, seed: int, num_workers: int, **overrides) -> "LoopSettings":
        """From a config section that has these keys (train.*); `overrides` win."""
        names = [name for name in cls.__dataclass_fields__ if name not in ("seed", "num_workers")]
        values = {name: section[name] for name in names if name in section}
        values["betas"] = tuple(values.get("betas", (0.9, 0.999)))
        values.update(overrides)
        return cls(seed=seed, num_workers=num_workers, **values)

    def check(self, world_size: int) -> None:
        """Settings that cannot work, named before any work starts."""
        if self.batch_size % (self.grad_accum * world_size):
            raise ValueError(
                f"the global batch size {self.batch_size} must be divisible by grad_accum x processes = "
                f"{self.grad_accum} x {world_size}"
            )


@dataclass(frozen=True)
class Periodic:
    """Work the loop does every `every` steps (and at the last step when `at_end`), after that step's
    checkpoint: fn(step, model, ema) -> metrics to log ({} for none). Called on every rank; fn decides
    what only rank 0 does. `every` 0 is off."""

    every: int
    fn: Callable[[int, nn.Module, Optional[nn.Module]], dict]
    at_end: bool = True

    def due(self, step: int, last: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or (self.at_end and step == last))


@dataclass
class LoopState:
    """The objects a checkpoint holds besides the method's modules, and how they are spread over processes."""

    ema: Optional[nn.Module]
    optimizers: dict
    scaler: torch.amp.GradScaler
    parallel: parallel.Replicated


def run(
    settings: LoopSettings,
    method: Method,
    dataset,
    items,
    run_dir: Path,
    metadata: dict,
    log: MetricsLog,
    periodic: tuple = (),
    log_offset: int = 0,
) -> Path | None:
    """Train `method` to settings.max_steps, resuming from the latest checkpoint in `run_dir`.

    Checkpoints are `run_dir/checkpoints/NNNNNNN.pt`, holding the method's modules, EMA,
    optimizers, scaler, method state, step, RNG and `metadata`. Metrics go to `log` at step
    `log_offset + step`. `periodic` hooks (validation, sample grids, FID) run after the step's
    checkpoint. Returns the last checkpoint written (or found).
    """
    settings.check(dist.world_size())
    device = dist.device()
    modules = method.modules()
    spread = parallel.strategy(settings.parallel, settings.shard_size, settings.precision, len(method.objectives()),
                               device, functional=getattr(method, "functional", False))
    ema = spread.setup(modules, settings, settings.ema_decay > 0)  # FSDP shards the modules (and the EMA) here
    state = LoopState(
        ema=ema,
        optimizers=_build_optimizers(method, settings, device),
        scaler=torch.amp.GradScaler(device.type, enabled=settings.precision == "fp16"),
        parallel=spread,
    )
    if dist.is_main():  # the caller holds the run's lock: these are a killed run's half-written files
        remove_stale_temporaries(checkpoint_dir(run_dir))
    start, last_saved = _resume(run_dir, method, state, metadata)
    if start >= settings.max_steps:
        info(f"already at step {start} >= {settings.max_steps} steps in {run_dir}; nothing to do")
        return last_saved
    log.truncate_after(log_offset + start)  # one history per run: drop what was logged after the checkpoint
    nets = spread.wrap(modules, settings, device)
    batches = iter(_loader(settings, dataset, items, start, device))
    bar = progress_bar(settings.max_steps, start, settings.desc, settings.progress)
    window = _Window(device, _throughput(settings, device))
    for module in modules.values():
        module.train()
    try:
        with StopSignals(settings.ckpt_every_minutes) as signals:
            for step in range(start, settings.max_steps):
                lr, grad_norms = _train_step(step, method, nets, state, batches, settings, window)
                done = step + 1
                bar.update(1)
                if done % settings.log_every == 0 or done == settings.max_steps:
                    _check_finite(window.nonfinite, done, last_saved)
                    metrics = window.metrics(grad_norms, lr, settings.batch_size)
                    _report(log, bar, log_offset + done, {**metrics, **method.log_metrics()})
                stop, time_due = signals.poll()
                if done % settings.ckpt_every == 0 or done == settings.max_steps or stop or time_due:
                    _check_finite(window.nonfinite, done, last_saved)
                    last_saved = _save(run_dir, done, method, state, settings, metadata, last_saved)
                for hook in periodic:
                    if hook.due(done, settings.max_steps):
                        metrics = hook.fn(done, modules["model"], state.ema)
                        if metrics:
                            _report(log, bar, log_offset + done, metrics)
                        for module in modules.values():
                            module.train()
                if stop:
                    raise Preempted(f"stopped at step {done} on {signals.name}; checkpoint {last_saved}; "
                                    "re-run the same command to continue", signals.received)
    finally:
        bar.close()
    return last_saved


def _train_step(step: int, method: Method, nets: dict, state: LoopState, batches, settings: LoopSettings,
                window: "_Window") -> tuple[float, dict]:
    """One optimizer step of every objective over grad_accum micro-batches; then the EMA. (lr, grad norms)."""
    lr = learning_rate(step, settings.lr, settings.warmup_steps, settings.lr_schedule, settings.max_steps, settings.min_lr)
    torch.manual_seed(mix_seed(settings.seed, step, dist.rank(), 2))  # the step's device-side randomness
    method.begin_step(step)
    waited = time.perf_counter()
    micro_batches = [next(batches) for _ in range(settings.grad_accum)]
    window.data_wait += time.perf_counter() - waited
    grad_norms = {
        objective.name: _update(objective, method, nets, state, micro_batches, settings, lr, step, window)
        for objective in method.objectives()
    }
    state.scaler.update()
    window.steps += 1
    if state.ema is not None:
        update_ema(state.ema, method.modules()["model"], settings.ema_decay)
    return lr, grad_norms


def _build_optimizers(method: Method, settings: LoopSettings, device: torch.device) -> dict:
    """AdamW per objective (fused on CUDA); weight_decay 0 makes it Adam."""
    modules = method.modules()
    optimizers = {}
    for objective in method.objectives():
        params = [p for name in objective.modules for p in modules[name].parameters() if p.requires_grad]
        optimizers[objective.name] = torch.optim.AdamW(
            params, lr=settings.lr * objective.lr_scale, betas=tuple(settings.betas),
            weight_decay=settings.weight_decay, fused=device.type == "cuda",
        )
    return optimizers


def _resume(run_dir: Path, method: Method, state: LoopState, metadata: dict) -> tuple[int, Path | None]:
    """Load the latest loadable checkpoint of `run_dir` into everything; (0, None) when there is none.

    Rank 0 alone picks it (moving broken ones aside) and tells the others which one to load. A sharded run
    reads a sharded folder on any number of processes; a DDP run reads a single file, or a folder consolidated.
    A folder whose shards turn out unreadable (every rank sees it) is moved aside too, and the previous one taken.
    """
    while True:
        latest, saved = load_latest_loadable(run_dir) if dist.is_main() else (None, None)
        latest = dist.broadcast_object(latest)
        if latest is None:
            return 0, None
        try:
            step = _load(latest, saved, method, state, metadata)
        except BrokenCheckpointError as err:
            if not latest.is_dir():
                raise
            if dist.is_main():
                move_aside(latest, err)
            dist.barrier()
            continue
        info(f"resumed from step {step} ({latest})")
        return step, latest


def _load(latest: Path, saved: dict | None, method: Method, state: LoopState, metadata: dict) -> int:
    """Everything the loop keeps from checkpoint `latest` (`saved`: what rank 0 read of it); its step."""
    sharded = state.parallel.sharded
    if sharded and not latest.is_dir():
        raise ConfigError(
            f"{latest} is a single-file checkpoint (a train.parallel=ddp run); train.parallel="
            f"{state.parallel.name} continues only from sharded checkpoint folders: continue this run with "
            f"train.parallel=ddp, or start a new experiment_dir with model.init_from={latest}")
    if latest.is_dir():
        saved = sharded_checkpoint.read_meta(latest) if sharded else load_checkpoint(latest)
    elif saved is None:
        saved = load_checkpoint(latest)
    if "model_args" in metadata:
        check_same_model(saved["model_args"], metadata["model_args"], str(latest))
    if state.ema is not None and "ema" not in saved.get(sharded_checkpoint.PARTS, saved):
        raise ValueError(f"{latest} has no EMA weights but an EMA decay is set now: keep the decay of the run")
    parts = (method.modules(), state.ema, state.optimizers, method.objectives())
    if sharded:  # this run's sharded state dicts, filled from the folder (resharded to this mesh)
        tensors = state.parallel.state_tensors(*parts)
        with reading_shards(latest):
            sharded_checkpoint.load_into(latest, tensors)
        saved = {**saved, **tensors}
    state.parallel.load_tensors(saved, *parts)
    state.scaler.load_state_dict(saved["scaler"])
    method.load_state_dict(saved["method_state"] if "method_state" in saved else {"timesteps": saved["timesteps"]})
    _restore_rng(saved["rng"])
    return int(saved["step"])


def _loader(settings: LoopSettings, dataset, items, start_step: int, device: torch.device) -> DataLoader:
    sampler = StreamBatchSampler(
        items, seed=settings.seed, global_batch=settings.batch_size, grad_accum=settings.grad_accum,
        rank=dist.rank(), world_size=dist.world_size(), start_step=start_step,
    )
    workers = settings.num_workers
    return DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
    )


def _update(objective, method: Method, nets: dict, state: LoopState, micro_batches, settings: LoopSettings,
            lr: float, step: int, window: "_Window") -> torch.Tensor:
    """Accumulate the objective's gradients over the micro-batches, clip, step; returns the grad norm."""
    optimizer = state.optimizers[objective.name]
    for group in optimizer.param_groups:
        group["lr"] = lr * objective.lr_scale
    device = dist.device()
    index = [o.name for o in method.objectives()].index(objective.name)
    for micro, (x, y, *extras) in enumerate(micro_batches):  # extras: what the dataset adds (REPA's crops)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        extras = [extra.to(device, non_blocking=True) for extra in extras]
        parts = (settings.seed, step, micro, dist.rank(), 3) + ((index,) if index else ())
        generator = torch.Generator().manual_seed(mix_seed(*parts))
        last = micro == len(micro_batches) - 1
        with contextlib.nullcontext() if last else state.parallel.no_sync(nets):  # gradients reduced on the last
            with autocast(device, settings.precision):
                loss, metrics = method.loss(objective.name, nets, x, y, generator, *extras)
            state.scaler.scale(loss / len(micro_batches)).backward()
        window.add(metrics, loss)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state.parallel.reduce_gradients(params)  # functional methods: what DDP would have all-reduced
    state.scaler.unscale_(optimizer)
    max_norm = settings.max_grad_norm if settings.max_grad_norm > 0 else float("inf")
    grad_norm = state.parallel.clip(params, max_norm)
    state.scaler.step(optimizer)
    for module in method.modules().values():
        module.zero_grad(set_to_none=True)
    return grad_norm


def _throughput(settings: LoopSettings, device: torch.device) -> Callable[[float], dict]:
    """img/s -> {"mfu": ...} against the device's dense peak (train.peak_tflops, else by name), and the
    peak memory on CUDA; nothing when the peak is unknown (the CPU)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = settings.peak_tflops or peak_tflops(name, settings.precision) or 0.0

    def extra(images_per_second: float) -> dict:
        out = {}
        if peak and settings.flops_per_image:
            out["mfu"] = mfu(images_per_second, settings.flops_per_image, peak, dist.world_size())
        if device.type == "cuda":
            out["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        return out

    return extra


class _Window:
    """Metric sums since the last log step, kept on the device (no host sync per step)."""

    def __init__(self, device: torch.device, throughput: Callable[[float], dict]):
        self.device = device
        self.throughput = throughput
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)  # sticky: a NaN stops the run
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.steps = 0
        self.data_wait = 0.0  # host seconds spent waiting for batches
        self.start = time.perf_counter()

    def add(self, metrics: dict, loss: torch.Tensor) -> None:
        for key, value in metrics.items():
            self.sums[key] = self.sums.get(key, torch.zeros((), device=self.device)) + value.float()
            self.counts[key] = self.counts.get(key, 0) + 1
        self.nonfinite |= ~torch.isfinite(loss.detach())

    def metrics(self, grad_norms: dict, lr: float, batch_size: int) -> dict:
        """Means over ranks and micro-batches, the last grad norms, lr and img/s; then a new window."""
        names = list(self.sums)
        values = [self.sums[n] / self.counts[n] for n in names] + [norm.float() for norm in grad_norms.values()]
        values = dist.all_reduce_mean(torch.stack(values)).tolist()
        out = dict(zip(names, values[: len(names)]))
        for name, value in zip(grad_norms, values[len(names):]):
            out["grad_norm" if name == "model" else f"grad_norm_{name}"] = value
        out["lr"] = lr
        out["img/s"] = self.steps * batch_size / max(time.perf_counter() - self.start, 1e-9)
        out["data_wait_ms"] = 1000.0 * self.data_wait / max(self.steps, 1)
        out.update(self.throughput(out["img/s"]))
        self.reset()
        return out


def _report(log: MetricsLog, bar, step: int, metrics: dict) -> None:
    log.log(step, metrics)
    if dist.is_main():
        bar.write(format_metrics(step, metrics))


def _save(run_dir: Path, step: int, method: Method, state: LoopState, settings: LoopSettings, metadata: dict,
          last_saved: Path | None) -> Path:
    """Write the step's checkpoint atomically after checking the weights are finite (DDP: rank 0 writes one
    file; sharded: every rank its shards of a folder); every rank waits.

    Off-cycle checkpoints (time-based or on a stop signal) are kept only until a newer one exists.
    """
    _check_finite_weights(method, state, step, last_saved)
    meta = dict(scaler=state.scaler.state_dict(), method_state=method.state_dict(), step=step,  # rank 0 writes it
                data_position=step * settings.batch_size, rng=_rng_state(), **metadata) if dist.is_main() else {}
    parts = (method.modules(), state.ema, state.optimizers, method.objectives())
    try:
        if state.parallel.sharded:
            path = sharded_path(run_dir, step)
            sharded_checkpoint.save(path, state.parallel.state_tensors(*parts), meta)
        else:
            path = checkpoint_path(run_dir, step)
            if dist.is_main():
                save_checkpoint({**state.parallel.state_tensors(*parts), **meta}, run_dir, step)
    except DiskFullError as err:
        kept = f"the previous checkpoint {last_saved} is intact" if last_saved else "no checkpoint was written"
        raise DiskFullError(err.errno, f"{err.strerror}; {kept}; free space (keep_last=K needs room for "
                                       "K+1 checkpoints) and re-run to continue") from None
    if dist.is_main():
        _write_line(f"saved checkpoint {path}")
        prune(checkpoint_dir(run_dir), settings.keep_last)
        for old_step, old in list_checkpoints(checkpoint_dir(run_dir)):
            if old_step < step and old_step % settings.ckpt_every:  # a superseded time/stop checkpoint
                remove_checkpoint(old)
    dist.barrier()
    return path


def _write_line(message: str) -> None:
    """A console line that does not break a progress bar (rank 0)."""
    if dist.is_main():
        from tqdm import tqdm

        tqdm.write(message, file=sys.stdout)


def _check_finite_weights(method: Method, state: LoopState, step: int, last_saved: Path | None) -> None:
    """Never save divergence: NaN/inf in the weights or the EMA stops the run before anything is written."""
    params = [p for module in method.modules().values() for p in module.parameters()]
    if state.ema is not None:
        params += list(state.ema.parameters())
    bad = torch.stack([~torch.isfinite(parallel.local(p)).all() for p in params]).any().float()
    if dist.all_reduce_sum(bad).item() > 0:
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
        raise NonFiniteLossError(
            f"non-finite weights (NaN or inf) at step {step}: nothing was saved; {where}. Lower the learning "
            "rate, set a max_grad_norm, or switch the precision to bf16/fp32, then re-run to resume."
        )


def _check_finite(nonfinite: torch.Tensor, step: int, last_saved) -> None:
    """Stop on NaN/inf before anything is written (a host sync, only at log/checkpoint steps)."""
    if dist.all_reduce_sum(nonfinite.float()).item() > 0:
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
        raise NonFiniteLossError(
            f"non-finite loss (NaN or inf) before step {step}; {where}. Lower the learning rate, set a "
            "max_grad_norm, or switch the precision to bf16/fp32, then re-run to resume."
        )


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
