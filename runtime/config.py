"""Typed configuration: one schema with every default, YAML files inherited down `configs/`.

Load order (later wins): schema defaults <- every `base.yaml` from `configs/` down to the
experiment file's folder <- the experiment file <- command-line `a.b=value` overrides.
The section named after the phase holds that phase's settings; `inference:` may also set
the sampler keys of `sample:` (see `SAMPLER_KEYS`), which then apply to inference only.
An unknown key or a wrong type fails at start-up naming the key and the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from methods import registry
from runtime.atomic_file import write_text_atomic

PHASES = ("extract", "train", "sample", "inference", "evaluate", "distill")
SAMPLER_KEYS = ("sampler", "steps", "cfg_scale", "eta", "cfg_all_channels", "cfg_interval", "time_shift", "precision",
                "compile")


class ConfigError(ValueError):
    """A configuration problem, reported before any work starts."""


@dataclass
class ModelConfig:
    name: str = "DiT-XL/2"
    num_classes: int = 1000
    learn_sigma: bool = True
    class_dropout_prob: float = 0.1
    grad_checkpointing: bool = False
    init_from: Optional[str] = None  # a checkpoint to initialise training from (fine-tuning)
    init_mode: str = "strict"  # strict | resize (another image size or number of classes: see README)
    method: str = "diffusion"  # the training method of `train` (methods/registry.py): diffusion | flow | ddgan | cld
    # LightningDiT's block switches (None: the release's choice; a DiT-* model takes none of them)
    rmsnorm: Optional[bool] = None  # RMSNorm instead of LayerNorm (release: on)
    swiglu: Optional[bool] = None  # SwiGLU feed-forward (release: on)
    rope: Optional[bool] = None  # 2-D rotary embedding on q and k, beside the sin-cos table (release: on)
    qk_norm: Optional[bool] = None  # normalised q and k (release: off; against loss spikes in long runs)
    adaln_shift: Optional[bool] = None  # adaLN with its shift terms (release: on)


@dataclass
class DataConfig:
    source: str = "folder"  # folder: an ImageNet-style <class>/<file> tree; digits: scikit-learn demo
    image_root: Optional[str] = None
    cache_path: str = "data/latents.h5"
    image_size: int = 256
    num_workers: int = 4
    in_memory: bool = False  # load the whole cache into RAM (when it fits)
    sample_posterior: bool = True  # False: always use the posterior mean
    random_flip: bool = True  # False: always use the unflipped encoding
    holdout: int = 0  # N evenly spaced items kept out of training (validation loss)


@dataclass
class AutoencoderConfig:
    name: str = "stabilityai/sd-vae-ft-ema"  # a Hugging Face id, a local folder, or "identity"
    scale_factor: Optional[float] = None  # None: from the autoencoder's own config
    normalization: str = "scale"  # scale: latents x scale_factor | channel: (z - mean_c) / std_c x scale_factor
    #                                (the cache's per-channel statistics; LightningDiT on VA-VAE)
    latent_stats: Optional[str] = None  # channel, sampling without a cache: a file with per-channel mean/std
    #                                     (LightningDiT's latents_stats.pt)


@dataclass
class ExtractConfig:
    batch_size: int = 64  # per process
    num_workers: int = 4
    precision: str = "bf16"  # bf16 | fp32 (encoder autocast on CUDA)
    flush_every: int = 64  # batches between durable progress marks (resume granularity)
    store_images: str = "none"  # none | jpeg | png: also keep each item's crop (representation alignment needs it)
    jpeg_quality: int = 95  # store_images=jpeg (docs/PERFORMANCE.md: what it does to an encoder's features)


@dataclass
class TrainConfig:
    batch_size: int = 256  # global, over all processes and accumulation steps
    grad_accum: int = 1
    max_steps: int = 400_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine | linear (to min_lr at max_steps)
    min_lr: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping (the grad norm is still logged)
    ema_decay: float = 0.9999
    precision: str = "bf16"  # bf16 | fp16 | fp32
    compile: bool = False
    parallel: str = "ddp"  # ddp (replicas) | fsdp (every weight, gradient and optimizer state sharded over the
    #                        processes, per block) | hsdp (sharded inside groups of shard_size, replicated across)
    shard_size: int = 0  # hsdp: processes per sharding group; 0 = torchrun's processes per node
    ckpt_every: int = 50_000
    ckpt_every_minutes: float = 0.0  # > 0: also a checkpoint every N minutes (only the newest such one is kept)
    keep_last: int = 0  # 0 keeps every checkpoint
    log_every: int = 100
    eval_every: int = 0  # 0: off; else validation loss on the held-out items (data.holdout) every N steps
    eval_timesteps: int = 10  # stratified timesteps per held-out item for the validation loss
    loss_buckets: int = 10  # the unweighted eps-MSE logged in this many equal timestep ranges (0: off)
    sample_every: int = 0  # steps between grids of the EMA model (samples/train/NNNNNNN.png, wandb); 0: off
    fid_every: int = 0  # steps between FIDs of the new checkpoint (evaluate.num_samples, all ranks); 0: off
    sample_sampler: str = "ddim"  # the grids' sampler (fixed classes and noise: sample.classes, seed + i)
    sample_steps: int = 25
    progress: bool = True
    peak_tflops: float = 0.0  # the device's dense peak for MFU; 0: from its name (H100, H200, A100, ...)


@dataclass
class RepaConfig:
    """Representation alignment (Yu et al. 2025) for the methods that denoise (diffusion, flow): the hidden tokens
    after block `depth` go through a projector to a frozen encoder's patch features of the clean image (the cache's
    stored crop, same flip), L = L_method + weight * mean(-cos)."""

    enabled: bool = False
    encoder: str = "vit_base_patch14_dinov2"  # a timm ViT name (DINOv2-B/14 as the paper)
    encoder_weights: Optional[str] = None  # a local file of its weights (timm's or the original layout)
    encoder_kwargs: Dict[str, Any] = field(default_factory=dict)  # more timm arguments (a custom ViT's sizes)
    resolution: int = 224  # the encoder's input side for 256 px images (REPA: 224 x image_size / 256)
    depth: Optional[int] = None  # the aligned block (1-based); None: 8 for 24+ blocks (XL, L), 4 for 12 (B, S), else a third
    projector_dim: int = 2048
    weight: float = 0.5  # lambda


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "dit"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class SampleConfig:
    classes: List[int] = field(default_factory=lambda: [207, 360, 387, 974, 88, 979, 417, 279])
    per_class: int = 1
    sampler: str = "ddpm"  # the checkpoint's method's: ddpm | ddim | dpm++ | unipc | euler | diffusers-ddim (diffusion);
    #                        ode | sde (flow); distilled; ddgan; sscs | euler-maruyama | cld-ode (cld)
    steps: int = 250  # steps of the sampler's time grid (distilled, ddgan: 0 = the model's own step count)
    cfg_scale: float = 4.0
    eta: float = 0.0  # DDIM eta
    cfg_all_channels: Optional[bool] = None  # None: the method's default (DiT, CLD: channels 0-2 as DiT; flow: all)
    cfg_interval: Optional[List[float]] = None  # [lo, hi]: guidance only for times t in [lo, hi] (1 = noise)
    time_shift: float = 1.0  # flow: sampling grid t' = s t / (1 + (s - 1) t); s > 1 spends more steps near noise
    precision: str = "fp32"
    compile: bool = False
    batch_size: int = 64  # per process
    use_ema: bool = True
    output: Optional[str] = None  # default <experiment_dir>/samples


@dataclass
class InferenceConfig:
    num_samples: int = 50_000
    batch_size: int = 64  # per process
    output: Optional[str] = None  # default <experiment_dir>/inference/samples.npz
    class_balanced: bool = False
    save_png: bool = False
    evaluate: bool = False  # run the evaluate phase on the result
    # Sampler overrides for inference only (None: use sample.*)
    sampler: Optional[str] = None
    steps: Optional[int] = None
    cfg_scale: Optional[float] = None
    eta: Optional[float] = None
    cfg_all_channels: Optional[bool] = None
    cfg_interval: Optional[List[float]] = None
    time_shift: Optional[float] = None
    precision: Optional[str] = None
    compile: Optional[bool] = None


@dataclass
class EvaluateConfig:
    samples: Optional[str] = None  # default: inference.output
    reference: Optional[str] = None  # ADM reference batch .npz (images or mu/sigma)
    features: str = "inception"  # the feature network: inception (ADM's, for papers) | digits (the demo's classifier)
    inception_weights: Optional[str] = None  # local torch-fidelity Inception weights file
    digits_classifier: Optional[str] = None  # evaluate.features=digits: scripts/train_digits_classifier.py's file
    batch_size: int = 200
    output: Optional[str] = None  # default <experiment_dir>/eval/<samples stem>.json
    adm_distances: bool = False  # precision/recall distances in float16 (float32 fallback) as ADM; default float64
    checkpoints: Any = None  # "all" or [steps]: FID over the run's checkpoints (eval/fid_vs_step.json, .png)
    num_samples: int = 10_000  # images per checkpoint for evaluate.checkpoints and train.fid_every
    sampler: Optional[str] = None  # the sweep's sampler (None: the inference sampler)
    steps: Optional[int] = None
    keep_samples: bool = False  # keep each checkpoint's .npz after scoring it


@dataclass
class CoreConfig:
    experiment_dir: str = "runs/default"
    seed: int = 0
    ckpt: Optional[str] = None  # checkpoint for sample/inference; default: latest in the run folder
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


# The whole schema: the sections above and one section per registered method (methods/registry.py).
Config = make_dataclass("Config", [(name, section, field(default_factory=section))
                                   for name, section in registry.config_sections()], bases=(CoreConfig,))


def config_chain(path: Path) -> list[Path]:
    """Every base.yaml from the `configs` root down to `path`'s folder, then `path` itself."""
    path = path.resolve()
    folders = [path.parent]
    for parent in path.parent.parents:
        folders.append(parent)
        if parent.name == "configs":
            break
    else:  # not under a configs/ folder: only its own folder's base.yaml
        folders = [path.parent]
    chain = [f / "base.yaml" for f in reversed(folders) if (f / "base.yaml").is_file()]
    return [p for p in chain if p != path] + [path]


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or ""
        reason = str(err).splitlines()[0]
        if isinstance(err, ConfigKeyError):
            raise ConfigError(f"{source}: unknown key '{key}' ({reason}; every key is in runtime/config.py)") from None
        raise ConfigError(f"{source}: invalid value for '{key}': {reason}") from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- base.yaml chain <- file <- overrides, validated against the schema."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    cfg = OmegaConf.structured(Config)
    for file in config_chain(path):
        try:
            data = OmegaConf.load(file)
        except Exception as err:  # YAML syntax errors
            raise ConfigError(f"{file}: cannot parse YAML: {err}") from None
        if data is None or (isinstance(data, DictConfig) and len(data) == 0):
            continue
        if not isinstance(data, DictConfig):
            raise ConfigError(f"{file}: top level must be a mapping")
        cfg = _merge(cfg, data, str(file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"command line: override '{item}' is not of the form a.b=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"command line override '{item}'")
    try:
        OmegaConf.resolve(cfg)  # ${a.b} interpolations take their final values once, here
    except OmegaConfBaseException as err:
        raise ConfigError(f"{path}: cannot resolve an interpolation: {str(err).splitlines()[0]}") from None
    _validate(cfg)
    return cfg


PRECISIONS = ("bf16", "fp16", "fp32")
_CHOICES = {
    "train.precision": PRECISIONS,
    "sample.precision": PRECISIONS,
    "extract.precision": ("bf16", "fp32"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "train.parallel": ("ddp", "fsdp", "hsdp"),
    "wandb.mode": ("online", "offline", "disabled"),
    "data.source": ("folder", "digits"),
    "model.init_mode": ("strict", "resize"),
    "autoencoder.normalization": ("scale", "channel"),
    "extract.store_images": ("none", "jpeg", "png"),
    "model.method": registry.trainable_names(),
    "evaluate.features": ("inception", "digits"),
}
AT_LEAST_ONE = (lambda v: v >= 1, "it must be at least 1")
NON_NEGATIVE = (lambda v: v >= 0, "it must be >= 0")
POSITIVE = (lambda v: v > 0, "it must be > 0")
LEARNING_RATE = (lambda v: math.isfinite(v) and v > 0, "the learning rate must be a finite number > 0")
UNIT_INTERVAL = (lambda v: 0 <= v <= 1, "it must be in [0, 1]")


def check_choices(cfg: DictConfig, choices: dict) -> None:
    """Each key's value must be one of its choices (None is accepted for optional keys that allow it)."""
    for key, allowed in choices.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, allowed))}")


def check_values(cfg: DictConfig, keys, rule: tuple) -> None:
    """Each key's value (when set) must pass rule = (test, what it must be)."""
    test, must = rule
    for key in keys:
        value = OmegaConf.select(cfg, key)
        if value is not None and not test(value):
            raise ConfigError(f"invalid value {key}={value}: {must}")


def check_interval(value, key: str) -> None:
    """[lo, hi] with 0 <= lo <= hi <= 1 (times of a method, 1 = noise), or None."""
    if value is None:
        return
    pair = list(value)
    if len(pair) != 2 or not 0 <= pair[0] <= pair[1] <= 1:
        raise ConfigError(f"invalid value {key}={pair}: it must be [lo, hi] with 0 <= lo <= hi <= 1 "
                          "(times of the method, 1 = noise)")


def _validate(cfg: DictConfig) -> None:
    """The core sections; a method's own section is checked when the method runs (its SPEC.check_config)."""
    check_choices(cfg, _CHOICES)
    check_choices(cfg, {"inference.precision": (None, *PRECISIONS)})
    check_values(cfg, ("train.batch_size", "train.max_steps", "train.grad_accum", "train.ckpt_every",
                       "train.log_every", "sample.batch_size", "sample.per_class", "inference.batch_size",
                       "inference.num_samples", "evaluate.batch_size", "extract.batch_size", "extract.flush_every",
                       "data.image_size", "model.num_classes", "evaluate.num_samples"), AT_LEAST_ONE)
    check_values(cfg, ("train.keep_last", "train.max_grad_norm", "train.warmup_steps", "train.min_lr",
                       "train.weight_decay", "train.ckpt_every_minutes", "train.eval_every", "data.holdout",
                       "data.num_workers", "extract.num_workers", "sample.cfg_scale", "sample.eta",
                       "train.peak_tflops", "train.loss_buckets", "train.sample_every", "train.fid_every",
                       "inference.cfg_scale", "inference.eta"), NON_NEGATIVE)
    check_values(cfg, ("sample.time_shift", "inference.time_shift"),
                 (lambda v: math.isfinite(v) and v > 0, "the time shift must be a finite number > 0 (1: none)"))
    check_values(cfg, ("train.lr",), LEARNING_RATE)
    check_values(cfg, ("repa.resolution", "repa.projector_dim", "repa.depth"), AT_LEAST_ONE)
    check_values(cfg, ("repa.weight",), NON_NEGATIVE)
    check_values(cfg, ("train.shard_size",), NON_NEGATIVE)
    check_values(cfg, ("extract.jpeg_quality",), (lambda v: 1 <= v <= 100, "it must be in 1..100"))
    check_values(cfg, ("train.ema_decay", "model.class_dropout_prob"), UNIT_INTERVAL)
    for key in ("sample.cfg_interval", "inference.cfg_interval"):
        check_interval(OmegaConf.select(cfg, key), key)
    for name in cfg.repa.encoder_kwargs:
        if not str(name).isidentifier():  # YAML reads {depth:1} as the key "depth:1" with no value
            raise ConfigError(f"repa.encoder_kwargs has the key {name!r}, not an argument name: write "
                              "{depth: 1} with a space after each colon")
    if cfg.train.fid_every and cfg.train.fid_every % cfg.train.ckpt_every:
        raise ConfigError(f"invalid value train.fid_every={cfg.train.fid_every}: it must be a multiple of "
                          f"train.ckpt_every={cfg.train.ckpt_every} (the FID is taken of the checkpoint)")


def sampler_settings(cfg: DictConfig, phase: str) -> DictConfig:
    """The sampler keys for `phase`: `sample.*`, overridden by `inference.*` when set there."""
    settings = OmegaConf.masked_copy(cfg.sample, list(SAMPLER_KEYS))
    if phase == "inference":
        for key in SAMPLER_KEYS:
            value = cfg.inference[key]
            if value is not None:
                settings[key] = value
    return settings


def record_config(cfg: DictConfig, phase: str) -> Path:
    """What ran: the resolved config of `phase` as <experiment_dir>/config.<phase>.yaml (call it on rank 0,
    once the phase's inputs have been checked)."""
    path = Path(cfg.experiment_dir) / f"config.{phase}.yaml"
    save_config(cfg, path)
    return path


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the resolved config (what actually ran) next to the run's outputs."""
    write_text_atomic(path, OmegaConf.to_yaml(cfg, resolve=True))


def to_container(cfg: DictConfig) -> dict:
    """Plain dict for checkpoints (weights_only-loadable, never an OmegaConf object)."""
    return OmegaConf.to_container(cfg, resolve=True)
