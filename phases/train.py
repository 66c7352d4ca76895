"""The `train` phase: DiT on cached latents, DDP, mixed precision, EMA, exact resume.

Everything random in a step (timesteps, noise, label dropout, data draws) is seeded from
(seed, step, rank), and the data order from (seed, step), so a run resumed from a checkpoint
continues exactly as an uninterrupted run would.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from datasets.latent_cache import LatentDataset, read_cache_info
from diffusion import create_diffusion
from diffusion.timesteps import build_timestep_strategy
from models import create_model
from models.pretrained import load_pretrained
from phases.validation import holdout_split, validation_loss
from runtime import distributed as dist
from runtime.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from runtime.config import save_config, to_container
from runtime.console import MetricsLog, format_metrics, info, progress_bar
from runtime.data_stream import StreamBatchSampler, mix_seed
from runtime.ema import create_ema, update_ema
from runtime.lr_schedule import learning_rate
from runtime.precision import autocast
from runtime.model_spec import check_cache_matches_config, check_same_model, model_args_from_cache

class NonFiniteLossError(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left as it was."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_loader(cfg: DictConfig, dataset: LatentDataset, items, start_step: int, device: torch.device) -> DataLoader:
    sampler = StreamBatchSampler(
        items,
        seed=cfg.seed,
        global_batch=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        rank=dist.rank(),
        world_size=dist.world_size(),
        start_step=start_step,
    )
    workers = cfg.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )


def run(cfg: DictConfig) -> Path | None:
    device = dist.device()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    exp = Path(cfg.experiment_dir)
    tc = cfg.train

    # Guard rails first: nothing long starts before the inputs are known to fit together.
    cache = read_cache_info(cfg.data.cache_path)
    check_cache_matches_config(cfg, cache)
    margs = model_args_from_cache(cfg, cache)
    if tc.batch_size % (tc.grad_accum * dist.world_size()):
        raise ValueError(
            f"train.batch_size={tc.batch_size} must be divisible by grad_accum*world_size="
            f"{tc.grad_accum * dist.world_size()}"
        )
    train_items, _ = holdout_split(cache["num_items"], cfg.data.holdout)
    latest = latest_checkpoint(exp)
    state = load_checkpoint(latest) if latest is not None else None
    if state is not None:
        check_same_model(state["model_args"], margs, str(latest))

    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
    model = create_model(**margs, grad_checkpointing=cfg.model.grad_checkpointing)
    if state is not None:
        model.load_state_dict(state["model"])
    elif cfg.model.init_from:
        load_pretrained(model, cfg.model.init_from, prefer_ema=True)
        info(f"initialised from {cfg.model.init_from}")
    model.to(device)
    ema = create_ema(model)
    if state is not None:
        ema.load_state_dict(state["ema"])

    diffusion = create_diffusion(cfg.diffusion.num_steps, cfg.diffusion.schedule, learn_sigma=margs["learn_sigma"])
    strategy = build_timestep_strategy(cfg.diffusion.timesteps, diffusion, device)
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=tc.lr,
        betas=tuple(tc.betas),
        weight_decay=tc.weight_decay,
        fused=device.type == "cuda",
    )
    scaler = torch.amp.GradScaler(device.type, enabled=tc.precision == "fp16")
    start_step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        strategy.load_state_dict(state["timesteps"])
        restore_rng(state["rng"])
        start_step = int(state["step"])
        info(f"resumed from step {start_step} ({latest})")
    del state
    if dist.is_main():
        save_config(cfg, exp / "config.yaml")
    if start_step >= tc.max_steps:
        info(f"already at step {start_step} >= train.max_steps={tc.max_steps}; nothing to do")
        return latest

    net = torch.compile(model) if tc.compile else model
    if dist.world_size() > 1:
        net = DistributedDataParallel(net, device_ids=[dist.local_rank()] if device.type == "cuda" else None)
    dataset = LatentDataset(
        cfg.data.cache_path,
        sample_posterior=cfg.data.sample_posterior,
        random_flip=cfg.data.random_flip,
        in_memory=cfg.data.in_memory,
    )
    loader = build_loader(cfg, dataset, train_items, start_step, device)
    batches = iter(loader)
    log = MetricsLog(cfg, "train")
    info(
        f"training {margs['name']} ({sum(p.numel() for p in model.parameters()):,} parameters) on "
        f"{len(train_items)} items, latent {margs['in_channels']}x{margs['input_size']}x{margs['input_size']}, "
        f"global batch {tc.batch_size}, {dist.world_size()} process(es), {device.type}, {tc.precision}"
    )

    bar = progress_bar(tc.max_steps, start_step, "train", tc.progress)
    nonfinite = torch.zeros((), dtype=torch.bool, device=device)
    loss_sum = torch.zeros((), device=device)
    window_start, window_steps = time.perf_counter(), 0
    last_saved = latest
    model.train()
    for step in range(start_step, tc.max_steps):
        lr = learning_rate(step, tc.lr, tc.warmup_steps, tc.lr_schedule, tc.max_steps, tc.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(mix_seed(cfg.seed, step, dist.rank(), 2))  # noise + label dropout of this step
        for micro in range(tc.grad_accum):
            x, y = next(batches)
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            draw = torch.Generator().manual_seed(mix_seed(cfg.seed, step, micro, dist.rank(), 3))
            ts = strategy.sample(x.shape[0], draw)
            sync = micro == tc.grad_accum - 1 or not isinstance(net, DistributedDataParallel)
            with contextlib.nullcontext() if sync else net.no_sync():
                with autocast(device, tc.precision):
                    terms = diffusion.training_losses(
                        net, x, ts.t, model_kwargs={"y": y}, mse_weights=ts.mse_weight, vb_weights=ts.vb_weight
                    )
                loss = terms["loss"].float().mean() / tc.grad_accum
                scaler.scale(loss).backward()
            raw = terms["mse"].detach() + (terms["vb"].detach() if "vb" in terms else 0.0)
            strategy.update(ts.t, raw)
            loss_sum += loss.detach()
            nonfinite |= ~torch.isfinite(loss.detach())
        scaler.unscale_(optimizer)
        max_norm = tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, tc.ema_decay)
        done = step + 1
        window_steps += 1
        bar.update(1)

        if done % tc.log_every == 0 or done == tc.max_steps:
            _check_finite(nonfinite, done, last_saved)
            elapsed = time.perf_counter() - window_start
            metrics = {
                "loss": dist.all_reduce_mean(loss_sum / window_steps).item(),
                "grad_norm": dist.all_reduce_mean(grad_norm.float()).item(),
                "lr": lr,
                "img/s": window_steps * tc.batch_size / max(elapsed, 1e-9),
            }
            log.log(done, metrics)
            if dist.is_main():
                bar.write(format_metrics(done, metrics))
            loss_sum.zero_()
            window_start, window_steps = time.perf_counter(), 0
        if tc.eval_every and cfg.data.holdout and (done % tc.eval_every == 0 or done == tc.max_steps):
            model.eval()
            metrics = validation_loss(cfg, model, diffusion, dataset, cache["num_items"], device)
            ema_metrics = validation_loss(cfg, ema, diffusion, dataset, cache["num_items"], device)
            metrics.update({key.replace("val_", "val_ema_"): value for key, value in ema_metrics.items()})
            model.train()
            log.log(done, metrics)
            if dist.is_main():
                bar.write(format_metrics(done, metrics))
        if done % tc.ckpt_every == 0 or done == tc.max_steps:
            _check_finite(nonfinite, done, last_saved)
            if dist.is_main():
                state = {
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "timesteps": strategy.state_dict(),
                    "step": done,
                    "data_position": done * tc.batch_size,
                    "rng": rng_state(),
                    "model_args": margs,
                    "autoencoder": {"name": cache["autoencoder"], "scale_factor": float(cache["scale_factor"])},
                    "image_size": int(cache["image_size"]),
                    "config": to_container(cfg),
                }
                last_saved = save_checkpoint(state, exp, done, keep_last=tc.keep_last)
                del state
            dist.barrier()
            last_saved = Path(exp) / "checkpoints" / f"{done:07d}.pt"
    bar.close()
    log.close()
    info(f"finished at step {tc.max_steps}; checkpoint {last_saved}")
    return last_saved


def _check_finite(nonfinite: torch.Tensor, step: int, last_saved) -> None:
    """Stop on NaN/inf before anything is written (a host sync, only at log/checkpoint steps)."""
    bad = dist.all_reduce_sum(nonfinite.float()).item() > 0
    if bad:
        where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was written"
        raise NonFiniteLossError(
            f"non-finite loss (NaN or inf) before step {step}; {where}. Lower train.lr, use "
            "train.max_grad_norm, or switch train.precision to bf16/fp32, then re-run to resume."
        )
