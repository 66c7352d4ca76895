"""What model a run builds, from one source of truth, with guard rails before long work.

Training: the latent size and channels come from the cache's attributes; the config's image
size and autoencoder must agree with the cache. Sampling: our checkpoints carry their own
`model_args`; a published checkpoint (a bare state dict) takes them from the cache if there is
one, else from the config and the autoencoder's geometry (SD VAE: 8x down-sampling, 4 channels;
a local folder or LDM file: read off it).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


def check_cache_matches_config(cfg: DictConfig, info: dict) -> None:
    """A cache made for another image size or autoencoder is an error, not a silent mix."""
    problems = []
    if int(info["image_size"]) != int(cfg.data.image_size):
        problems.append(f"image size {info['image_size']} (config data.image_size={cfg.data.image_size})")
    if str(info["autoencoder"]) != str(cfg.autoencoder.name):
        problems.append(f"autoencoder '{info['autoencoder']}' (config autoencoder.name='{cfg.autoencoder.name}')")
    if problems:
        raise ValueError(
            f"the cache {cfg.data.cache_path} was made for " + " and ".join(problems)
            + ": fix the config, or point data.cache_path at a cache extracted with these settings"
        )
    if int(info["num_classes"]) > int(cfg.model.num_classes) or int(info.get("max_label", -1)) >= int(cfg.model.num_classes):
        raise ValueError(
            f"the cache {cfg.data.cache_path} has {info['num_classes']} classes (labels up to {info.get('max_label')}) "
            f"but model.num_classes={cfg.model.num_classes}: set model.num_classes={info['num_classes']} or more"
        )


def model_args_from_cache(cfg: DictConfig, info: dict) -> dict:
    channels, height, width = (int(v) for v in info["latent_shape"])
    if height != width:
        raise ValueError(f"non-square latents {height}x{width} are not supported")
    return model_args(cfg, input_size=height, in_channels=channels)


def model_args(cfg: DictConfig, input_size: int, in_channels: int) -> dict:
    """The architecture and its geometry; a LightningDiT's block switches resolved (None: the release's)."""
    from models import SWITCHES, resolve_switches

    mc = cfg.model
    try:
        switches = resolve_switches(str(mc.name), **{k: mc[k] for k in SWITCHES})
    except ValueError as err:
        from runtime.config import ConfigError

        raise ConfigError(str(err)) from None
    return {
        "name": str(mc.name),
        "input_size": int(input_size),
        "in_channels": int(in_channels),
        "num_classes": int(mc.num_classes),
        "learn_sigma": bool(mc.learn_sigma),
        "class_dropout_prob": float(mc.class_dropout_prob),
        **switches,
    }


def model_args_from_config(cfg: DictConfig, weights: dict | None = None) -> dict:
    """For published checkpoints with no metadata: the geometry implied by the config (the cache's when it
    exists). With the checkpoint's `weights`, model.learn_sigma is read off its output layer (SiT's release
    has the variance channels, REPA's checkpoints do not), and a LightningDiT's block switches off its keys
    (a file of the other family stays an error that names it)."""
    from models.pretrained import block_switches_of

    margs = _geometry_from_config(cfg)
    learn_sigma = learned_sigma_of(weights, margs["in_channels"]) if weights is not None else None
    if learn_sigma is not None:
        margs["learn_sigma"] = learn_sigma
    switches = block_switches_of(weights) if weights is not None else None
    if switches is not None and "rope" in margs:  # a LightningDiT: its switches as the file has them
        margs.update(switches)
    return margs


def learned_sigma_of(weights: dict, channels: int) -> bool | None:
    """True/False when a DiT state dict's output layer has 2C or C channels per pixel, else None (let the strict
    load name the mismatch)."""
    proj, final = weights.get("x_embedder.proj.weight"), weights.get("final_layer.linear.weight")
    if proj is None or final is None or proj.ndim != 4:
        return None
    per_pixel = final.shape[0] // (proj.shape[2] * proj.shape[3])
    return {2 * channels: True, channels: False}.get(per_pixel)


def _geometry_from_config(cfg: DictConfig) -> dict:
    cache = Path(cfg.data.cache_path)
    if cache.is_file():
        from datasets.latent_cache import read_cache_info

        try:
            info = read_cache_info(cache)
        except ValueError:
            info = None
        if info is not None:
            check_cache_matches_config(cfg, info)
            return model_args_from_cache(cfg, info)
    if cfg.autoencoder.name == "identity":
        return model_args(cfg, input_size=cfg.data.image_size, in_channels=3)
    from datasets.autoencoder import autoencoder_geometry

    downsample, channels = autoencoder_geometry(str(cfg.autoencoder.name))
    if cfg.data.image_size % downsample:
        raise ValueError(f"data.image_size={cfg.data.image_size} is not a multiple of the autoencoder's "
                         f"down-sampling {downsample}")
    return model_args(cfg, input_size=cfg.data.image_size // downsample, in_channels=channels)


def check_same_model(stored: dict, current: dict, source: str) -> None:
    """Resuming or fine-tuning with a different architecture or latent shape is an error. The model args are
    compared by equality, with what older checkpoints left out filled in (the family's block switches)."""
    from models import SWITCHES, family_of

    keys = ("name", "input_size", "in_channels", "num_classes", "learn_sigma", "guidance_embedding",
            "interval_embedding", "z_dim", "extra_in_channels", "alignment", *SWITCHES)
    defaults = {"guidance_embedding": False, "interval_embedding": False, "z_dim": 0, "extra_in_channels": 0,
                "alignment": None}  # what older checkpoints left out

    def value(args: dict, key: str):
        if key in SWITCHES:
            try:
                return family_of(str(args["name"])).switches(args)[key]
            except ValueError:
                return args.get(key)
        return args.get(key, defaults.get(key))

    diffs = [f"{k}: {value(stored, k)} in {source}, {value(current, k)} now" for k in keys
             if value(stored, k) != value(current, k)]
    if diffs:
        raise ValueError(f"{source} was made for a different model or latent shape: " + "; ".join(diffs))
