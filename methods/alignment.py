"""Representation alignment (REPA, Yu et al. 2025) around any method that denoises: `repa.enabled`.

The method's own loss runs unchanged; its one network call is made through a proxy that also returns REPA's
projection of the hidden tokens after block `repa.depth` (models/projector.py), from the same forward pass.
The frozen encoder (models/encoders.py) sees the clean image of each item, the crop the latent was encoded
from with the same flip (the cache's stored images). Then

    L = L_method + weight * L_proj,   L_proj = mean over tokens of -cos(projection, encoder token)

(REPA's `loss.py`, in float32: REPA's users hit fp16 NaNs in the cosine). `proj_loss` is logged beside the
method's metrics, and per range of the method's time (`proj_t...`). The projector is part of the "model"
module: trained by its optimizer, EMA-averaged and checkpointed with it, under REPA's key names.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from methods.timestep_buckets import TimestepBuckets


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per sample [B]: the mean over tokens of -cos(projected, target), each token normalised (float32)."""
    projected, target = F.normalize(projected.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return -(projected * target).sum(dim=-1).mean(dim=1)


def default_depth(blocks: int) -> int:
    """REPA's aligned block: 8 for SiT-XL/L (28, 24 blocks), 4 for SiT-B (12); a third of a smaller model."""
    return {28: 8, 24: 8, 12: 4}.get(blocks, max(1, blocks // 3))


class _Projecting:
    """The network as the method calls it, also keeping REPA's projection (and the network time) of that call."""

    def __init__(self, net):
        self.net = net
        self.projected = self.time = None

    def __call__(self, x, t, y, **inputs):
        if self.projected is not None:
            raise RuntimeError("representation alignment needs the method to call its network once per loss")
        out, self.projected = self.net(x, t, y, project=True, **inputs)
        self.time = t
        return out


class AlignedMethod:
    """A denoising method with REPA's alignment term added to the loss of its "model" objective."""

    def __init__(self, inner, encoder: nn.Module, weight: float, buckets: int = 0):
        self.inner = inner
        self.encoder = encoder
        self.weight = weight
        self.buckets = TimestepBuckets(1000, buckets) if buckets else None

    def modules(self) -> dict:
        return self.inner.modules()

    def objectives(self) -> list:
        return self.inner.objectives()

    def begin_step(self, step: int) -> None:
        self.inner.begin_step(step)

    def loss(self, objective, nets, x, y, generator, images: torch.Tensor | None = None):
        if images is None:
            raise ValueError("representation alignment needs the images of the batch (a cache made with "
                             "extract.store_images)")
        target = self.encoder(images.to(x.device, non_blocking=True))
        network = _Projecting(nets["model"])
        loss, metrics = self.inner.loss(objective, {**nets, "model": network}, x, y, generator)
        proj = alignment_loss(network.projected, target)
        if self.buckets is not None:
            self.buckets.add(self.inner.time_key(network.time), proj.detach())
        total = loss + self.weight * proj.mean()
        return total, {**metrics, "loss": total.detach(), "proj_loss": proj.detach().mean()}

    def log_metrics(self) -> dict:
        out = self.inner.log_metrics()
        if self.buckets is not None:
            out.update(self.buckets.report("proj"))
        return out

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def __getattr__(self, name: str):
        """What the method's own helpers read (its diffusion, its path, ...)."""
        return getattr(self.__dict__["inner"], name)


def prepare(cfg, spec, margs: dict, cache: dict, device):
    """Checks and the frozen encoder for repa.enabled, before any work: (model args with the projector, encoder)."""
    from models import architecture
    from models.encoders import build_encoder
    from runtime.config import ConfigError

    if not spec.alignable:
        able = ", ".join(s.name for s in __import__("methods.registry", fromlist=["specs"]).specs() if s.alignable)
        raise ConfigError(f"repa.enabled: representation alignment adds to the methods that denoise ({able}), not "
                          f"model.method={spec.name}")
    if cache.get("image_format") is None:
        raise ValueError(f"repa.enabled needs the crops of the items, and the cache {cfg.data.cache_path} holds none: "
                         "add them with `python main.py -c CONFIG -p extract extract.store_images=jpeg` (the latents "
                         "are kept, only the images are read)")
    blocks, _, _, patch = architecture(margs["name"])
    depth = int(cfg.repa.depth or default_depth(blocks))
    if depth > blocks:
        raise ConfigError(f"repa.depth={depth} is beyond {margs['name']}'s {blocks} blocks")
    encoder = build_encoder(cfg.repa.encoder, cfg.repa.encoder_weights, int(cfg.repa.resolution),
                            int(cache["image_size"]), margs["input_size"] // patch, dict(cfg.repa.encoder_kwargs))
    alignment = {"depth": depth, "projector_dim": int(cfg.repa.projector_dim), "feature_dim": encoder.dim}
    return {**margs, "alignment": alignment}, encoder.to(device)


def flops_per_image(margs: dict, encoder, image_size: int) -> float:
    """Model FLOPs an alignment adds per image and update: the projector (forward and backward) and the encoder's
    forward (counted by torch's counter on one image)."""
    from torch.utils.flop_counter import FlopCounterMode

    from models import architecture

    _, width, _, patch = architecture(margs["name"])
    tokens = (margs["input_size"] // patch) ** 2
    a = margs["alignment"]
    projector = 2 * tokens * (width * a["projector_dim"] + a["projector_dim"] ** 2 + a["projector_dim"] * a["feature_dim"])
    with FlopCounterMode(display=False) as counter:
        encoder(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=next(encoder.buffers()).device))
    return 3 * projector + float(counter.get_total_flops())
