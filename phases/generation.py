"""Turning a checkpoint into images: shared by the `sample` and `inference` phases.

Image i is generated from its own random generator seeded with `seed + i` (initial noise and
every per-step noise), so an image never depends on the batch it was generated in, the batch
size or the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from omegaconf import DictConfig

from datasets.autoencoder import load_autoencoder
from datasets.latent_cache import read_cache_info
from datasets.latent_norm import LatentNorm, norm_from_cache, norm_of_checkpoint, read_stats_file
from diffusion.noise import per_row_noise
from methods import registry, sampling
from methods.sampling import checkpoint_meta, describe_sampler, generation_sampler
from models import create_model
from models.pretrained import extract_state_dict, load_pretrained
from runtime.checkpoint import load_checkpoint
from runtime.config import sampler_settings
from runtime.console import info
from runtime.precision import autocast
from runtime.model_spec import check_cache_matches_config, check_same_model, model_args_from_config


@dataclass
class Generator:
    """A loaded model with everything needed to turn (label, seed) pairs into uint8 images."""

    model: torch.nn.Module
    autoencoder: object
    sample: Callable  # sample(noise, y, generators, progress) -> latents, from the checkpoint's method
    model_args: dict
    settings: DictConfig
    device: torch.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        size = self.model_args["input_size"]
        return (self.model_args["in_channels"], size, size)

    @torch.no_grad()
    def images(self, labels: torch.Tensor, seeds: list[int], progress: bool = False) -> torch.Tensor:
        """uint8 images [B, H, W, C] for `labels`, image b from generator seed `seeds[b]`."""
        return to_uint8(self.decode(self.latents(labels, seeds, progress)))

    @torch.no_grad()
    def latents(self, labels: torch.Tensor, seeds: list[int], progress: bool = False) -> torch.Tensor:
        """float32 latents [B, C, h, w] for `labels`, latent b from generator seed `seeds[b]`."""
        device = self.device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        noise = per_row_noise((len(seeds), *self.latent_shape), generators, device)
        y = labels.to(device=device, dtype=torch.long)
        with autocast(device, self.settings.precision):
            return self.sample(noise, y, generators, progress).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> pixels in [-1, 1] through the autoencoder."""
        return self.autoencoder.decode_latents(latents)


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """One uint8 HWC image as a PIL image (greyscale when it has one channel)."""
    array = np.asarray(image)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW float -> uint8 NHWC with DiT's mapping clamp(127.5 x + 128) (truncating)."""
    return torch.clamp(127.5 * pixels.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


@dataclass
class LoadedModel:
    """A model built from a checkpoint, with what was stored beside its weights."""

    model: torch.nn.Module
    model_args: dict
    autoencoder: str
    scale_factor: float | None
    meta: dict  # the checkpoint's entries other than weights (method, distill, config, ...); {} if published
    weights: str = "EMA"  # which weights were loaded: "EMA" or "raw"
    norm: LatentNorm | None = None  # how its latents are normalised (None: the autoencoder's scale factor)


def load_model(cfg: DictConfig, ckpt_path: Path, use_ema: bool, sampler: str | None = None) -> LoadedModel:
    """Build the model of a checkpoint on the CPU, weights loaded strictly: ours (with its metadata), or another
    tool's (a published DiT, SiT or REPA file, or one of their train.py checkpoints: the geometry from the
    config, what it is from methods/sampling.py `checkpoint_meta`, a bare state dict read as the checkpoints of
    the method that offers `sampler`, diffusion when None)."""
    state = load_checkpoint(ckpt_path)
    if isinstance(state, dict) and "model_args" in state:  # our checkpoint
        margs = dict(state["model_args"])
        margs["class_dropout_prob"] = margs.get("class_dropout_prob", cfg.model.class_dropout_prob)
        ae_name, scale = state["autoencoder"]["name"], state["autoencoder"]["scale_factor"]
        if (ae_name == "identity") != (cfg.autoencoder.name == "identity"):
            raise ValueError(
                f"{ckpt_path} was trained with autoencoder '{ae_name}' but autoencoder.name='{cfg.autoencoder.name}'"
            )
        if ae_name != "identity":
            ae_name = cfg.autoencoder.name  # the SD-VAE decoders (ema/mse) are interchangeable (DiT README)
        check_same_model(state["model_args"], margs, str(ckpt_path))
        margs.pop("alignment", None)  # REPA's projector trains with the model; generating needs the backbone only
        model = create_model(**margs)
        weights_found = extract_state_dict(state, prefer_ema=use_ema)
        model.load_state_dict({k: v for k, v in weights_found.items() if not k.startswith("projectors.")})
        meta = checkpoint_meta(state, cfg, None).meta
        weights = "EMA" if use_ema and "ema" in state else "raw"
        norm = norm_of_checkpoint(state["autoencoder"])
    else:
        owner = registry.sampler_owner(sampler) if sampler else registry.spec(registry.DEFAULT)
        try:
            published = checkpoint_meta(state, cfg, owner)
            weights_found = extract_state_dict(state, prefer_ema=use_ema)
        except ValueError as err:
            raise ValueError(f"{ckpt_path}: {err}") from None
        margs = model_args_from_config(cfg, weights_found)
        model = create_model(**margs)
        load_pretrained(model, ckpt_path, prefer_ema=use_ema, obj=state, drop_prefixes=published.drop)
        ae_name, scale, meta = cfg.autoencoder.name, cfg.autoencoder.scale_factor, published.meta
        weights = "EMA" if use_ema else "raw"
        norm = published_norm(cfg)
        info(f"{ckpt_path}: read as {published.source}")
    del state
    return LoadedModel(model, margs, ae_name, scale, meta, weights, norm)


def published_norm(cfg: DictConfig) -> LatentNorm | None:
    """The normalisation of a checkpoint without our metadata: the config's kind, with per-channel statistics from
    the cache (data.cache_path, made with this autoencoder) or autoencoder.latent_stats; None for the scale
    factor (the config's, else the autoencoder's own)."""
    ac = cfg.autoencoder
    if ac.normalization != "channel":
        return None
    if ac.latent_stats:
        mean, std = read_stats_file(ac.latent_stats)
        return LatentNorm.from_statistics(mean, std, 1.0 if ac.scale_factor is None else ac.scale_factor)
    cache = Path(cfg.data.cache_path)
    if not cache.is_file():
        raise ValueError("autoencoder.normalization=channel needs per-channel latent statistics: set "
                         "autoencoder.latent_stats=PATH (LightningDiT's latents_stats.pt) or data.cache_path to a "
                         "cache extracted with this autoencoder")
    info_ = read_cache_info(cache)
    check_cache_matches_config(cfg, info_)
    return norm_from_cache("channel", info_, str(cache))


def load_generator(cfg: DictConfig, ckpt_path: Path, settings: DictConfig, use_ema: bool, device: torch.device) -> Generator:
    """Build the model from a checkpoint, the autoencoder, and the sampler of the checkpoint's method."""
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT's sample_ddp.py (tf32 on by default)
    torch.backends.cudnn.allow_tf32 = True
    loaded = load_model(cfg, ckpt_path, use_ema, settings.sampler)
    model = loaded.model.to(device).eval()
    net = torch.compile(model) if settings.compile else model
    sample = generation_sampler(cfg, net, loaded.model_args, loaded.meta, settings)
    autoencoder = load_autoencoder(loaded.autoencoder, device, scale_factor=loaded.scale_factor, norm=loaded.norm)
    info(
        f"loaded {loaded.model_args['name']} from {ckpt_path} ({loaded.weights} weights); "
        f"sampler {describe_sampler(loaded.meta, settings, cfg)}, {settings.precision}"
    )
    return Generator(model, autoencoder, sample, loaded.model_args, settings, device)


def output_root(cfg: DictConfig, phase: str) -> Path:
    """Where `phase` (sample, inference; evaluate reads inference's) writes by default (methods/sampling.py)."""
    return sampling.output_root(cfg, sampler_settings(cfg, phase))
