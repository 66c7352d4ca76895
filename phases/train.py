"""The `train` phase: a DiT on cached latents with the configured method (model.method).

Guard rails, then build (model, method, data), then the shared loop (runtime/training_loop.py:
DDP, precision, EMA, checkpoints, exact resume, NaN stop, logging).
"""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from datasets.latent_cache import LatentDataset, read_cache_info
from datasets.latent_norm import autoencoder_entry, norm_from_cache
from methods import alignment, registry
from methods.sampling import checkpoint_meta
from models import create_model
from models.pretrained import extract_state_dict, load_pretrained
from models.projector import Aligned
from phases import fid_sweep
from phases.scoring import load_evaluator
from phases.training_grids import TrainingGrids
from phases.validation import holdout_split
from runtime import distributed as dist
from runtime import training_loop
from runtime.checkpoint import checkpoint_path, latest_checkpoint, load_checkpoint
from runtime.config import ConfigError, record_config, to_container
from runtime.console import MetricsLog, info
from runtime.model_spec import check_cache_matches_config, model_args_from_cache
from runtime.run_lock import RunLock


def checkpoint_fid(cfg: DictConfig):
    """The periodic hook of train.fid_every: FID of the checkpoint just written (every rank samples)."""
    evaluator = load_evaluator(cfg)  # the reference and the feature network, before training starts
    settings = fid_sweep.sweep_settings(cfg)

    def fid(step, model, ema) -> dict:
        points = fid_sweep.run(cfg, [(step, checkpoint_path(cfg.experiment_dir, step))], evaluator, settings)
        return {"fid": points[0]["fid"]} if points else {}

    return fid


def initialise(cfg: DictConfig, spec, model) -> None:
    """model.init_from (fine-tuning; a resumed run loads its own weights instead): ours, a published file, or one
    of the reference repos' train.py checkpoints, read once; the method says whether it can start from it."""
    exp = Path(cfg.experiment_dir)
    if not cfg.model.init_from or latest_checkpoint(exp) is not None:
        return
    obj = load_checkpoint(cfg.model.init_from)
    published = checkpoint_meta(obj, cfg, spec)
    spec.check_init(published.meta, cfg)
    target, drop = model, tuple(published.drop) + ("projectors.",)
    if isinstance(model, Aligned):  # REPA's projector continues from the file when it has one
        has_projector = any(k.startswith("projectors.") for k in extract_state_dict(obj, prefer_ema=True))
        target, drop = (model, ()) if has_projector else (model.backbone, drop)
    used = load_pretrained(target, cfg.model.init_from, prefer_ema=True, obj=obj, mode=cfg.model.init_mode,
                           drop_prefixes=drop)
    fresh = " (a new projector)" if target is not model else ""
    info(f"initialised from {cfg.model.init_from} ({used}){fresh}")


def run(cfg: DictConfig) -> Path | None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = dist.device()
    exp = Path(cfg.experiment_dir)

    # Guard rails: nothing long starts before the inputs are known to fit together.
    spec = registry.training_spec(cfg)  # model.method, its config section checked now
    cache = read_cache_info(cfg.data.cache_path)
    check_cache_matches_config(cfg, cache)
    norm = norm_from_cache(cfg.autoencoder.normalization, cache, cfg.data.cache_path)
    margs = spec.model_args(cfg, model_args_from_cache(cfg, cache))
    train_items, _ = holdout_split(cache["num_items"], cfg.data.holdout)
    encoder = None
    if cfg.repa.enabled:  # the encoder is loaded now: a missing or mismatched file stops the run here
        margs, encoder = alignment.prepare(cfg, spec, margs, cache, device)
    flops = spec.flops_per_image(cfg, margs)
    if encoder is not None and flops:
        flops += alignment.flops_per_image(margs, encoder, int(cache["image_size"]))
    settings = training_loop.LoopSettings.from_config(cfg.train, seed=cfg.seed, num_workers=cfg.data.num_workers,
                                                      flops_per_image=flops)
    settings.check(dist.world_size())
    if cfg.train.eval_every and cfg.data.holdout and spec.validation_loss is None:
        raise ConfigError(f"train.eval_every: model.method={cfg.model.method} has no validation loss; set "
                          "train.eval_every=0")

    torch.manual_seed(cfg.seed)  # the same initial weights for the same seed
    model = create_model(**margs, grad_checkpointing=cfg.model.grad_checkpointing)
    initialise(cfg, spec, model)
    method = spec.build(cfg, model.to(device), device)
    dataset = LatentDataset.from_config(cfg.data, norm)  # validation and grids: the latents alone
    train_data = dataset
    if encoder is not None:
        method = alignment.AlignedMethod(method, encoder, cfg.repa.weight, cfg.train.loss_buckets)
        train_data = LatentDataset.from_config(cfg.data, norm, images=True)
        a = margs["alignment"]
        info(f"representation alignment: block {a['depth']} -> {cfg.repa.encoder} tokens ({a['feature_dim']} "
             f"channels), weight {cfg.repa.weight}, crops {cache['image_format']}")
    info(
        f"training {margs['name']} ({sum(p.numel() for p in model.parameters()):,} parameters, method "
        f"{cfg.model.method}) on {len(train_items)} items, latent {margs['in_channels']}x{margs['input_size']}x"
        f"{margs['input_size']}, global batch {cfg.train.batch_size}, {dist.world_size()} process(es), "
        f"{device.type}, {cfg.train.precision}"
    )

    def validate(step, model, ema) -> dict:
        """The method's validation loss on the held-out items, raw and EMA weights."""
        metrics = spec.validation_loss(cfg, method, model.eval(), dataset, cache["num_items"], device)
        if ema is not None:
            ema_metrics = spec.validation_loss(cfg, method, ema, dataset, cache["num_items"], device)
            metrics.update({key.replace("val_", "val_ema_"): value for key, value in ema_metrics.items()})
        return metrics

    metadata = {
        "method": spec.name,
        **spec.metadata(cfg),
        "model_args": margs,
        "autoencoder": autoencoder_entry(cache, norm),
        "image_size": int(cache["image_size"]),
        **({"repa": {"encoder": cfg.repa.encoder, "weight": float(cfg.repa.weight)}} if encoder is not None else {}),
        "config": to_container(cfg),
    }
    with RunLock(exp):  # one run per folder, for the whole run
        if dist.is_main():
            record_config(cfg, "train")
        log = MetricsLog(cfg, "train")
        try:
            periodic = [training_loop.Periodic(cfg.train.eval_every if cfg.data.holdout else 0, validate)]
            if cfg.train.sample_every:
                grids = TrainingGrids(cfg, margs, metadata, norm, log)
                periodic.append(training_loop.Periodic(cfg.train.sample_every, grids, at_end=False))
            if cfg.train.fid_every:
                periodic.append(training_loop.Periodic(cfg.train.fid_every, checkpoint_fid(cfg)))
            last = training_loop.run(settings, method, train_data, train_items, exp, metadata, log, periodic=periodic)
        finally:
            log.close()
    info(f"finished at step {cfg.train.max_steps}; checkpoint {last}")
    return last
