"""Randomly initialised networks of the published architectures, saved where our loaders read them.

Benchmarks and the GPU check (scripts/gpu_check.py) need the SD-VAE, a REPA encoder (DINOv2) and ADM's
Inception where nothing can be downloaded. A network of the same architecture with random weights runs at the
same speed through the same code: each function here writes one in the format its loader expects
(autoencoder.name=<folder>, repa.encoder_weights=<file>, evaluate.inception_weights=<file>).
"""
from __future__ import annotations

from pathlib import Path

import torch

# The architecture of stabilityai/sd-vae-ft-ema / -mse (their config.json): 8x down-sampling, 4 latent channels.
SD_VAE_ARCHITECTURE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
# The same design, 4x down-sampling and a few channels: for CPU runs of the same code paths.
TINY_VAE_ARCHITECTURE = {**SD_VAE_ARCHITECTURE, "down_block_types": ["DownEncoderBlock2D"] * 3,
                         "up_block_types": ["UpDecoderBlock2D"] * 3, "block_out_channels": [8, 16, 16],
                         "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 32}


def save_random_vae(folder: Path, architecture: dict | None = None) -> Path:
    """An AutoencoderKL (the SD-VAE's architecture by default) with random weights, loadable as
    autoencoder.name=<folder>."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(**(architecture or SD_VAE_ARCHITECTURE)).save_pretrained(folder)
    return Path(folder)


def save_random_encoder(name: str, path: Path, **kwargs) -> Path:
    """timm's `name` (e.g. vit_base_patch14_dinov2, REPA's DINOv2-B) with random weights, in timm's layout."""
    import timm

    torch.manual_seed(0)
    vit = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(vit.state_dict(), path)
    return Path(path)


def save_random_inception(path: Path) -> Path:
    """torch-fidelity's TF-compatible Inception with random weights, as a plain state dict (its classifier bias
    made non-zero, so that the unbiased logits differ from the biased ones)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    torch.manual_seed(0)
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None):
        net = tf_inception.FeatureExtractorInceptionV3("x", ["2048"])
    state = {k: v + 0.1 * torch.randn_like(v) if k == "fc.bias" else v for k, v in net.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return Path(path)
