"""Sampling a checkpoint through its method's spec, after the checks every method shares.

A checkpoint records its method (published DiT checkpoints record none: diffusion). The sampler
settings are checked against what that method offers before any work: a sampler it does not have
(naming the ones it has, and the method a requested sampler belongs to), guidance without a null
class, a guidance interval or a time shift it cannot honour. `cfg_all_channels` None takes the
method's default.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from methods import registry
from methods.spec import MethodSpec, Published
from runtime.checkpoint import resolve_checkpoint
from runtime.config import ConfigError


def check_null_class(model_args: dict, setting: str) -> None:
    """Guidance (asked for by `setting`) needs the null class that only label dropout creates."""
    if float(model_args.get("class_dropout_prob", 0.0)) <= 0:
        raise ConfigError(
            f"{setting} asks for classifier-free guidance, but the model was built with class_dropout_prob=0 and "
            "has no null class to guide with: use a scale of 1 (or train with model.class_dropout_prob > 0)"
        )


def refuse_eta(settings: DictConfig, samplers: str) -> None:
    """eta is DDIM's: `samplers` (e.g. "the flow samplers") have no such knob, so a non-zero eta is an error."""
    if settings.eta:
        raise ValueError(f"eta is DDIM's; {samplers} cannot honour eta={settings.eta} (set eta=0)")


def resolved_settings(spec: MethodSpec, settings: DictConfig) -> DictConfig:
    """The settings with the method's defaults filled in (cfg_all_channels None)."""
    out = OmegaConf.create(OmegaConf.to_container(settings))
    if out.get("cfg_all_channels") is None:
        out.cfg_all_channels = spec.guide_all_channels
    return out


def check_settings(spec: MethodSpec, settings: DictConfig, model_args: dict) -> None:
    """What every method's sampler must be able to honour, named before any sampling."""
    if settings.sampler not in spec.samplers:
        owner = registry.sampler_owner(settings.sampler)
        other = f"; {settings.sampler!r} is a sampler of {owner.title}" if owner else ""
        raise ValueError(f"the checkpoint is {spec.title}: it samples with {', '.join(spec.samplers)} (set "
                         f"sample.sampler, or inference.sampler), not {settings.sampler!r}{other}")
    scale = float(settings.cfg_scale)
    if scale != 1.0 and not spec.guidance:
        raise ValueError(f"classifier-free guidance is not part of {spec.title}; cfg_scale={scale} cannot be "
                         "honoured: set sample.cfg_scale=1")
    if scale != 1.0:
        check_null_class(model_args, f"cfg_scale={scale}")
    if settings.get("cfg_interval") is not None and not spec.cfg_interval:
        raise ValueError(f"{spec.title} cannot limit guidance to an interval; cfg_interval="
                         f"{list(settings.cfg_interval)} cannot be honoured: set sample.cfg_interval=null")
    if float(settings.get("time_shift", 1.0)) != 1.0 and not spec.time_shift:
        raise ValueError(f"time_shift={settings.time_shift} shifts a flow sampler's time grid; {spec.title} "
                         "cannot honour it: set sample.time_shift=1")


def generation_sampler(cfg: DictConfig, model, model_args: dict, meta: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents, for the checkpoint's method and the sampler settings."""
    spec = registry.checkpoint_spec(meta)
    settings = resolved_settings(spec, settings)
    check_settings(spec, settings, model_args)
    spec.check_config(cfg)
    return spec.generation_sampler(cfg, model, model_args, meta, settings)


def describe_sampler(meta: dict, settings: DictConfig, cfg: DictConfig) -> str:
    """One line for the console: how this checkpoint will be sampled."""
    spec = registry.checkpoint_spec(meta)
    settings = resolved_settings(spec, settings)
    text = spec.describe_sampler(meta, settings, cfg)
    if settings.get("cfg_interval") is not None and float(settings.cfg_scale) != 1.0:
        text += f", guidance only for t in {list(settings.cfg_interval)}"
    return text


def interval_of(settings: DictConfig):
    """sample.cfg_interval as a (lo, hi) tuple, or None for guidance everywhere."""
    value = settings.get("cfg_interval")
    return None if value is None else (float(value[0]), float(value[1]))


def sampled_checkpoint(cfg: DictConfig, settings: DictConfig) -> Path:
    """The checkpoint a phase samples: ckpt=, else where the sampler's method keeps it (a distilled
    student's stage folder), else the run's latest checkpoint."""
    owner = registry.sampler_owner(settings.sampler)
    if not cfg.ckpt and owner is not None and owner.locate is not None:
        return owner.locate(cfg.experiment_dir, int(settings.steps))
    return resolve_checkpoint(cfg.ckpt, cfg.experiment_dir)


def output_root(cfg: DictConfig, settings: DictConfig) -> Path:
    """Where sample/inference/evaluate write by default: the run folder, or where the sampler's method puts
    the outputs of that checkpoint (a student's stage folder: it never overwrites the teacher's files)."""
    owner = registry.sampler_owner(settings.sampler)
    if owner is None or owner.output_root is None:
        return Path(cfg.experiment_dir)
    return owner.output_root(cfg.experiment_dir, sampled_checkpoint(cfg, settings))


WEIGHT_ENTRIES = ("model", "ema", "optimizer", "optimizers", "scaler", "rng")  # our checkpoints' non-metadata


def checkpoint_meta(obj, cfg: DictConfig, bare: MethodSpec | None) -> Published:
    """What a loaded checkpoint is: ours carry their metadata; a file of another tool is recognised by the method
    that knows its format (SiT's and REPA's train.py, REPA's projector keys); a file that cannot say what it is
    (a bare state dict, DiT's train.py) is read as the `bare` method's (the method of the sampler asked for,
    or of the training run)."""
    if isinstance(obj, dict) and "model_args" in obj:
        return Published({k: v for k, v in obj.items() if k not in WEIGHT_ENTRIES}, source="a checkpoint of this tool")
    for spec in registry.specs():
        found = spec.recognise(obj, cfg) if spec.recognise is not None else None
        if found is not None:
            return found
    if bare is None or bare.read_bare is None:
        readers = [s.title for s in registry.specs() if s.read_bare is not None]
        raise ValueError(f"the checkpoint carries none of this tool's metadata, and {bare.title if bare else 'this'} "
                         f"checkpoints come only from this tool; published state dicts can be read as "
                         f"{' or '.join(readers)}")
    return bare.read_bare(obj, cfg)
