"""The `train` phase: a DiT on cached latents with the configured method (model.method).

Guard rails, then build (model, method, data), then the shared loop (runtime/training_loop.py:
DDP, precision, EMA, checkpoints, exact resume, NaN stop, logging).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from datasets.latent_cache import LatentDataset, read_cache_info
from datasets.latent_norm import autoencoder_entry, norm_from_cache
from methods import alignment, registry
from methods.sampling import checkpoint_meta
from models import create_model
from models.pretrained import extract_state_dict, load_pretrained
from models.conditioning import Conditioned
from models.projector import Aligned
from phases import fid_sweep
from phases.scoring import load_evaluator
from phases.training_grids import TrainingGrids
from phases.validation import holdout_split
from runtime import distributed as dist
from runtime import training_loop
from runtime.checkpoint import checkpoint_dir, latest_checkpoint, list_checkpoints, load_checkpoint
from runtime.config import ConfigError, record_config, to_container
from runtime.console import MetricsLog, info
from runtime.model_spec import check_cache_matches_config, model_args_from_cache
from runtime.run_lock import RunLock


def checkpoint_fid(cfg: DictConfig):
    """The periodic hook of train.fid_every: FID of the checkpoint just written (every rank samples)."""
    evaluator = load_evaluator(cfg)  # the reference and the feature network, before training starts
    settings = fid_sweep.sweep_settings(cfg)

    def fid(step, model, ema) -> dict:
        path = dict(list_checkpoints(checkpoint_dir(cfg.experiment_dir)))[step]  # a file, or a sharded folder
        points = fid_sweep.run(cfg, [(step, path)], evaluator, settings)
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
    keys = list(extract_state_dict(obj, prefer_ema=True))
    target, drop = model, tuple(published.drop) + ("projectors.",)
    if isinstance(model, Aligned):  # REPA's projector continues from the file when it has one
        has_projector = any(k.startswith("projectors.") for k in keys)
        target, drop = (model, ()) if has_projector else (model.backbone, drop)
    fresh = " (a new projector)" if target is not model else ""
    if isinstance(target, Conditioned) and not any(k.startswith(f"{own}.") for own in target.own_names for k in keys):
        fresh = f" (new {', '.join(target.own_names)}: zero-initialised, the model starts as the file's)"
        target = target.backbone  # e.g. MeanFlow's interval embedding, from a flow or DiT model
    used = load_pretrained(target, cfg.model.init_from, prefer_ema=True, obj=obj, mode=cfg.model.init_mode,
                           drop_prefixes=drop)
    info(f"initialised from {cfg.model.init_from} ({used}){fresh}")


@dataclass
class _Plan:
    """What the guard rails established, before anything is built."""

    spec: object
    cache: dict
    norm: object
    margs: dict
    train_items: list
    settings: training_loop.LoopSettings
    encoder: object = None  # REPA's frozen encoder when repa.enabled


def check_inputs(cfg: DictConfig, device) -> _Plan:
    """Guard rails: nothing long starts before the inputs are known to fit together (the method's section, the
    cache against the config, the normalisation, REPA's encoder file and crops, the loop's settings)."""
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
    return _Plan(spec, cache, norm, margs, train_items, settings, encoder)


def build(cfg: DictConfig, plan: _Plan, device):
    """(model, method, the latents for validation and grids, the training data), the same initial weights for the
    same seed; REPA wraps the method and adds the crops to the training data."""
    torch.manual_seed(cfg.seed)
    model = create_model(**plan.margs, grad_checkpointing=cfg.model.grad_checkpointing)
    initialise(cfg, plan.spec, model)
    method = plan.spec.build(cfg, model.to(device), device)
    dataset = LatentDataset.from_config(cfg.data, plan.norm)
    train_data = dataset
    if plan.encoder is not None:
        method = alignment.AlignedMethod(method, plan.encoder, cfg.repa.weight, cfg.train.loss_buckets)
        train_data = LatentDataset.from_config(cfg.data, plan.norm, images=True)
        a = plan.margs["alignment"]
        info(f"representation alignment: block {a['depth']} -> {cfg.repa.encoder} tokens ({a['feature_dim']} "
             f"channels), weight {cfg.repa.weight}, crops {plan.cache['image_format']}")
    margs = plan.margs
    info(
        f"training {margs['name']} ({sum(p.numel() for p in model.parameters()):,} parameters, method "
        f"{cfg.model.method}) on {len(plan.train_items)} items, latent {margs['in_channels']}x{margs['input_size']}x"
        f"{margs['input_size']}, global batch {cfg.train.batch_size}, {dist.world_size()} process(es), "
        f"{device.type}, {cfg.train.precision}"
    )
    return model, method, dataset, train_data


def checkpoint_metadata(cfg: DictConfig, plan: _Plan) -> dict:
    """What every checkpoint of the run carries beside the weights (how to sample and check it later)."""
    repa = {"repa": {"encoder": cfg.repa.encoder, "weight": float(cfg.repa.weight)}} if plan.encoder is not None else {}
    return {
        "method": plan.spec.name,
        **plan.spec.metadata(cfg),
        "model_args": plan.margs,
        "autoencoder": autoencoder_entry(plan.cache, plan.norm),
        "image_size": int(plan.cache["image_size"]),
        **repa,
        "config": to_container(cfg),
    }


def periodic_hooks(cfg: DictConfig, plan: _Plan, method, dataset, metadata: dict, log, device) -> list:
    """The loop's hooks: validation loss (raw and EMA), grids, FID during training, as configured."""

    def validate(step, model, ema) -> dict:
        metrics = plan.spec.validation_loss(cfg, method, model.eval(), dataset, plan.cache["num_items"], device)
        if ema is not None:
            ema_metrics = plan.spec.validation_loss(cfg, method, ema, dataset, plan.cache["num_items"], device)
            metrics.update({key.replace("val_", "val_ema_"): value for key, value in ema_metrics.items()})
        return metrics

    hooks = [training_loop.Periodic(cfg.train.eval_every if cfg.data.holdout else 0, validate)]
    if cfg.train.sample_every:
        grids = TrainingGrids(cfg, plan.margs, metadata, plan.norm, log)
        hooks.append(training_loop.Periodic(cfg.train.sample_every, grids, at_end=False))
    if cfg.train.fid_every:
        hooks.append(training_loop.Periodic(cfg.train.fid_every, checkpoint_fid(cfg)))
    return hooks


def run(cfg: DictConfig) -> Path | None:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    device = dist.device()
    exp = Path(cfg.experiment_dir)
    plan = check_inputs(cfg, device)
    _, method, dataset, train_data = build(cfg, plan, device)
    metadata = checkpoint_metadata(cfg, plan)
    with RunLock(exp):  # one run per folder, for the whole run
        if dist.is_main():
            record_config(cfg, "train")
        log = MetricsLog(cfg, "train")
        try:
            hooks = periodic_hooks(cfg, plan, method, dataset, metadata, log, device)
            last = training_loop.run(plan.settings, method, train_data, plan.train_items, exp, metadata, log,
                                     periodic=hooks)
        finally:
            log.close()
    info(f"finished at step {cfg.train.max_steps}; checkpoint {last}")
    return last
