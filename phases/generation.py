"""Turning a checkpoint into images: shared by the `sample` and `inference` phases.

Image i is generated from its own random generator seeded with `seed + i` (initial noise and
every per-step noise), so an image never depends on the batch it was generated in, the batch
size or the number of processes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from omegaconf import DictConfig

from datasets.autoencoder import load_autoencoder
from diffusion.guidance import guided_model_fn
from diffusion.noise import per_row_noise
from diffusion.sampler import build_sampler
from models import create_model
from models.pretrained import extract_state_dict, load_pretrained
from runtime.checkpoint import load_checkpoint
from runtime.console import info
from runtime.precision import autocast
from runtime.model_spec import check_same_model, model_args_from_config



@dataclass
class Generator:
    """A loaded model with everything needed to turn (label, seed) pairs into uint8 images."""

    model: torch.nn.Module
    autoencoder: object
    sampler: object
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
        device = self.device
        generators = [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]
        noise = per_row_noise((len(seeds), *self.latent_shape), generators, device)
        y = labels.to(device=device, dtype=torch.long)
        fn = guided_model_fn(
            self.model,
            y,
            float(self.settings.cfg_scale),
            self.model_args["num_classes"],
            all_channels=bool(self.settings.cfg_all_channels),
        )
        with autocast(device, self.settings.precision):
            latents = self.sampler(fn, noise, generators=generators, progress=progress)
        pixels = self.autoencoder.decode(latents.float() / self.autoencoder.scale_factor)
        return to_uint8(pixels)


def to_pil(image: torch.Tensor | np.ndarray) -> Image.Image:
    """One uint8 HWC image as a PIL image (greyscale when it has one channel)."""
    array = np.asarray(image)
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW float -> uint8 NHWC with DiT's mapping clamp(127.5 x + 128) (truncating)."""
    return torch.clamp(127.5 * pixels.float() + 128.0, 0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu()


def load_generator(cfg: DictConfig, ckpt_path: Path, settings: DictConfig, use_ema: bool, device: torch.device) -> Generator:
    """Build the model from a checkpoint (ours or a published DiT one), the autoencoder and the sampler."""
    torch.backends.cuda.matmul.allow_tf32 = True  # as DiT's sample_ddp.py (tf32 on by default)
    torch.backends.cudnn.allow_tf32 = True
    state = load_checkpoint(ckpt_path)
    if isinstance(state, dict) and "model_args" in state:  # our training checkpoint
        margs = dict(state["model_args"])
        margs["class_dropout_prob"] = margs.get("class_dropout_prob", cfg.model.class_dropout_prob)
        ae_name, scale = state["autoencoder"]["name"], state["autoencoder"]["scale_factor"]
        if (ae_name == "identity") != (cfg.autoencoder.name == "identity"):
            raise ValueError(
                f"{ckpt_path} was trained with autoencoder '{ae_name}' but autoencoder.name='{cfg.autoencoder.name}'"
            )
        if ae_name != "identity":
            ae_name = cfg.autoencoder.name  # the SD-VAE decoders (ema/mse) are interchangeable (DiT README)
        model = create_model(**margs)
        weights = extract_state_dict(state, prefer_ema=use_ema)
        model.load_state_dict(weights)
    else:  # a published DiT checkpoint: geometry from the config (or the cache)
        margs = model_args_from_config(cfg)
        model = create_model(**margs)
        load_pretrained(model, ckpt_path, prefer_ema=use_ema)
        ae_name, scale = cfg.autoencoder.name, cfg.autoencoder.scale_factor
    if "model_args" in state:
        check_same_model(state["model_args"], margs, str(ckpt_path))
    del state
    model.to(device).eval()
    if settings.compile:
        model = torch.compile(model)
    autoencoder = load_autoencoder(ae_name, device, scale_factor=scale)
    sampler = build_sampler(
        settings.sampler,
        settings.steps,
        num_steps=cfg.diffusion.num_steps,
        schedule=cfg.diffusion.schedule,
        learn_sigma=margs["learn_sigma"],
        eta=settings.eta,
    )
    info(
        f"loaded {margs['name']} from {ckpt_path} ({'EMA' if use_ema else 'raw'} weights); "
        f"sampler {settings.sampler} x {settings.steps} steps, cfg scale {settings.cfg_scale}, {settings.precision}"
    )
    return Generator(model, autoencoder, sampler, margs, settings, device)
