"""An LDM-format AutoencoderKL file (the CompVis layout: encoder.down.{i}.block.{j}, ...) as diffusers'
AutoencoderKL: VA-VAE f16d32 from LightningDiT's release, or any other LDM VAE.

The architecture is read off the file's keys and shapes (base width, channel multipliers, residual blocks
per level, latent channels, the levels with attention), so nothing about it is hard-coded: VA-VAE f16d32
comes out as 5 levels (128 x 1, 1, 2, 2, 4: 16x down-sampling), 32 latent channels and attention in the
lowest-resolution level, which diffusers holds with AttnDownEncoderBlock2D / AttnUpDecoderBlock2D. The
weights go through diffusers' own LDM converter, plus those in-level attentions that its converter does not
map; the file's training-only parts (the loss and its discriminator, the vision-foundation projection) are
dropped. Loading is strict: a file that does not fit this architecture is an error naming the keys.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

TRAINING_ONLY = ("loss.", "foundation_model.", "linear_proj")  # VA-VAE's training parts, not the autoencoder


def read_ldm_state(path: Path) -> dict:
    """The file's autoencoder weights (under "state_dict" in Lightning checkpoints), with weights_only=True."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or "encoder.conv_in.weight" not in state:
        raise ValueError(f"{path} is not an LDM-format autoencoder (no encoder.conv_in.weight): give autoencoder.name "
                         "a folder saved with save_pretrained, a Hugging Face id, or an LDM VAE file")
    return {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}


def ldm_architecture(state: dict) -> dict:
    """diffusers AutoencoderKL config of an LDM VAE state dict."""
    levels = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k)))
    blocks = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)))
    widths = [int(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in range(levels)]
    attention = [f"encoder.down.{i}.attn.0.q.weight" in state for i in range(levels)]
    latent = int(state["post_quant_conv.weight"].shape[0])
    return {
        "in_channels": int(state["encoder.conv_in.weight"].shape[1]),
        "out_channels": int(state["decoder.conv_out.weight"].shape[0]),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)],
        "block_out_channels": widths,
        "layers_per_block": blocks,
        "latent_channels": latent,
        "norm_num_groups": 32,  # LDM's GroupNorm
        "scaling_factor": 1.0,  # normalisation is the cache's business (datasets/latent_norm.py)
    }


def convert_ldm_vae(state: dict, config: dict) -> dict:
    """LDM keys -> diffusers keys: diffusers' converter, then the attentions inside the levels."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, update_vae_attentions_ldm_to_diffusers

    inner = re.compile(r"(encoder\.down|decoder\.up)\.(\d+)\.attn\.")
    converted = {k: v for k, v in convert_ldm_vae_checkpoint(state, config).items() if not inner.search(k)}
    levels = len(config["block_out_channels"])
    for key in [k for k in state if inner.match(k)]:
        side, level = inner.match(key).group(1), int(inner.match(key).group(2))
        j = key.split(".")[4]
        if side == "encoder.down":
            old, new = f"encoder.down.{level}.attn.{j}", f"encoder.down_blocks.{level}.attentions.{j}"
        else:
            old, new = f"decoder.up.{level}.attn.{j}", f"decoder.up_blocks.{levels - 1 - level}.attentions.{j}"
        update_vae_attentions_ldm_to_diffusers([key], converted, state, mapping={"old": old, "new": new})
    return converted


def load_ldm_vae(path: Path):
    """diffusers' AutoencoderKL holding the LDM file's autoencoder, loaded strictly."""
    from diffusers import AutoencoderKL

    state = read_ldm_state(Path(path))
    config = ldm_architecture(state)
    vae = AutoencoderKL(**config)
    missing, unexpected = vae.load_state_dict(convert_ldm_vae(state, config), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the LDM autoencoder read off its keys: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    return vae
