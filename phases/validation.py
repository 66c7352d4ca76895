"""Validation loss on held-out cache items, measured identically for every training strategy.

Uniform stratified timesteps, no loss weights, fixed draws and fixed noise: the number only
changes when the model changes, so curves from different timestep strategies are comparable.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig

from datasets.latent_cache import LatentDataset
from methods.timestep_buckets import TimestepBuckets
from runtime import distributed as dist
from runtime.data_stream import mix_seed


def holdout_split(num_items: int, holdout: int) -> tuple[list[int], list[int]]:
    """Training items, and `holdout` evenly spaced items kept out for validation.

    Evenly spaced rather than the last N: image-folder caches are sorted by class, so the last
    items would all come from the last classes.
    """
    if holdout < 0 or holdout >= num_items:
        raise ValueError(f"data.holdout={holdout} must be in [0, {num_items - 1}] for a cache of {num_items} items")
    held = sorted({(i * num_items) // holdout for i in range(holdout)}) if holdout else []
    kept = set(held)
    return [i for i in range(num_items) if i not in kept], held


def stratified_timesteps(count: int, num_timesteps: int) -> torch.Tensor:
    """`count` timesteps at the centres of equal strata of [0, T)."""
    return ((torch.arange(count, dtype=torch.float64) + 0.5) * num_timesteps / count).long()


@torch.no_grad()
def validation_loss(cfg: DictConfig, model, diffusion, dataset: LatentDataset, num_items: int, device, batch_size: int = 256) -> dict:
    """Mean unweighted eps-MSE (and VB) over held-out items x stratified timesteps (every rank gets it)."""
    _, items = holdout_split(num_items, cfg.data.holdout)
    per_item = stratified_timesteps(cfg.train.eval_timesteps, diffusion.num_timesteps)
    keys = [(i, mix_seed(cfg.seed, i, 7)) for i in items for _ in range(len(per_item))]
    steps = per_item.repeat(len(items))
    sums = torch.zeros(3, dtype=torch.float64)
    buckets = TimestepBuckets(diffusion.num_timesteps, cfg.train.loss_buckets) if cfg.train.loss_buckets else None
    generator = torch.Generator().manual_seed(mix_seed(cfg.seed, 11))
    for start in range(0, len(keys), batch_size):
        chunk = keys[start : start + batch_size]
        x, y = stacked([dataset[k] for k in chunk])
        noise = torch.randn(x.shape, generator=generator)
        t = steps[start : start + len(chunk)]
        terms = diffusion.training_losses(
            model, x.to(device), t.to(device), model_kwargs={"y": y.to(device)}, noise=noise.to(device)
        )
        sums[0] += terms["mse"].double().sum().cpu()
        if buckets is not None:
            buckets.add(t.to(device), terms["mse"])
        if "vb" in terms:
            sums[1] += terms["vb"].double().sum().cpu()
        sums[2] += len(chunk)
    mse, vb = (sums[0] / sums[2]).item(), (sums[1] / sums[2]).item()
    per_bucket = buckets.report("val_mse") if buckets is not None else {}  # every rank did the same items
    dist.barrier()
    return {"val_mse": mse, "val_vb": vb, "val_loss": mse + vb, **per_bucket}


def stacked(pairs):
    """(latents [B, ...], labels [B]) from dataset items."""
    latents, labels = zip(*pairs)
    return torch.stack(latents), torch.stack([torch.as_tensor(label) for label in labels])
