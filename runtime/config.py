"""Typed configuration: one schema with every default, YAML files inherited down `configs/`.

Load order (later wins): schema defaults <- every `base.yaml` from `configs/` down to the
experiment file's folder <- the experiment file <- command-line `a.b=value` overrides.
The section named after the phase holds that phase's settings; `inference:` may also set
the sampler keys of `sample:` (see `SAMPLER_KEYS`), which then apply to inference only.
An unknown key or a wrong type fails at start-up naming the key and the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from runtime.atomic_file import write_text_atomic

PHASES = ("extract", "train", "sample", "inference", "evaluate", "distill")
SAMPLER_KEYS = ("sampler", "steps", "cfg_scale", "eta", "cfg_all_channels", "precision", "compile")


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
    method: str = "diffusion"  # the training method of `train` (methods/): diffusion (IDDPM as DiT) | ddgan | cld


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


@dataclass
class ExtractConfig:
    batch_size: int = 64  # per process
    num_workers: int = 4
    precision: str = "bf16"  # bf16 | fp32 (encoder autocast on CUDA)
    flush_every: int = 64  # batches between durable progress marks (resume granularity)


@dataclass
class TimestepsConfig:
    sampler: str = "uniform"  # uniform | speed | speed_legacy | lognormal | logitnormal | logitnormal_index | loss_second_moment
    weighting: str = "none"  # none | speed | p2 | min_snr | edm
    tau: Any = "auto"  # SpeeD threshold in original steps, or "auto"
    k: float = 5.0  # SpeeD suppression intensity
    lam: float = 0.6  # SpeeD change-aware lambda
    dual: bool = True  # SpeeD dual (symmetric) sampling
    normalize: bool = False  # divide weights by E_{t~P}[w_t]
    gamma: float = 5.0  # min-SNR gamma / P2 gamma (see docs)
    p2_k: float = 1.0
    p2_gamma: float = 1.0
    mean: float = 0.0  # log-/logit-normal location
    std: float = 1.0  # log-/logit-normal scale
    history: int = 10  # loss_second_moment: losses kept per timestep
    uniform_prob: float = 0.001  # loss_second_moment: uniform mixture
    weight_vb: bool = False  # also multiply the learned-sigma VB term by the weighting


@dataclass
class DiffusionConfig:
    num_steps: int = 1000
    schedule: str = "linear"  # linear | cosine
    rescale_vb: bool = False  # IDDPM's RESCALED_MSE: VB term x num_steps/1000 (DiT: no rescale; same at 1000 steps)
    timesteps: TimestepsConfig = field(default_factory=TimestepsConfig)


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
class DistillConfig:
    """Progressive distillation (`-p distill`): the teacher's DDIM with start_steps -> students with
    start_steps/2, ..., end_steps steps, one stage per halving (Salimans & Ho 2022)."""

    teacher: Optional[str] = None  # a checkpoint (ours or published DiT); default: latest of experiment_dir
    use_teacher_ema: bool = True
    start_steps: int = 1024  # the teacher's DDIM steps that the first student halves (a power of two)
    end_steps: int = 1  # the last student's steps (a power of two, < start_steps)
    iters_per_stage: int = 50_000
    first_stage_iters: Optional[int] = None  # the first stage also learns the new head and the guidance: more updates
    batch_size: int = 2048  # global, over processes and accumulation steps
    grad_accum: int = 1
    lr: float = 1e-4  # Adam, linearly annealed to 0 within each stage
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    ema_decay: float = 0.0  # 0: no EMA of the student (as released)
    precision: str = "bf16"  # bf16 | fp16 | fp32
    compile: bool = False
    parameterization: str = "v"  # v | x | eps: how the student's first C output channels are read
    loss_weight: str = "snr_trunc"  # snr_trunc (max(SNR, 1)) | snr_plus_one (v-MSE)
    cfg_scale: float = 1.0  # guidance folded into the student (DiT's convention, 1 = none)
    cfg_range: Optional[List[float]] = None  # [lo, hi]: a scale-conditioned student (cfg_scale: its grids)
    cfg_all_channels: bool = False  # guide every latent channel, not DiT's first 3
    ckpt_every: int = 5000
    ckpt_every_minutes: float = 0.0
    keep_last: int = 2
    log_every: int = 100
    progress: bool = True
    peak_tflops: float = 0.0  # as train.peak_tflops
    eval_samples: int = 64  # images per stage for the student-vs-teacher latent MSE
    fid_samples: int = 0  # > 0: FID of every student on this many images (needs evaluate.reference / weights)


@dataclass
class DDGANConfig:
    """Denoising diffusion GAN (model.method=ddgan; Xiao et al. 2022). train.lr is the generator's LR,
    train.betas both optimizers' (the paper: [0.5, 0.9]), train.ema_decay the generator's EMA."""

    num_steps: int = 4  # T: denoising steps = generator evaluations per sample
    beta_min: float = 0.1  # the discretised VP SDE
    beta_max: float = 20.0
    z_dim: int = 100  # the generator's latent code
    discriminator: str = "D-S/2"  # D-{size}/{patch} (models/discriminator.py)
    lr_d: float = 1.25e-4  # the discriminator's LR (scaled by the same schedule as train.lr)
    r1_gamma: float = 0.02  # R1 weight on real pairs (gamma / 2 ||grad D||^2); 0: off
    lazy_reg: int = 15  # R1 every this many steps (the official lazy regularisation)


@dataclass
class CLDConfig:
    """Critically-damped Langevin diffusion (model.method=cld; Dockhorn et al. 2022), the paper's CIFAR-10
    settings. Sampling: sample.sampler = sscs | euler-maruyama | cld-ode."""

    mass: float = 0.25  # M; critical damping Gamma = 2 sqrt(M)
    gamma: float = 0.04  # initial velocity variance gamma M
    beta: float = 4.0  # constant beta(t) on t in [0, 1]
    eps: float = 1.0e-5  # training times t ~ U[eps, 1]
    sampling_eps: float = 1.0e-3  # the samplers stop here, then one denoising step to t = 0
    numerical_eps: float = 1.0e-9  # added to the kernel's variances (a finite Cholesky factor at tiny t)
    mixed_score: bool = True  # the network corrects the analytic score -v / Svv
    ode_solver: str = "adaptive"  # cld-ode: adaptive (per-sample Dormand-Prince 5(4)) | rk4 | heun | euler
    ode_rtol: float = 1.0e-5
    ode_atol: float = 1.0e-5


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
    sampler: str = "ddpm"  # ddpm | ddim | dpm++ | unipc | euler | diffusers-ddim | distilled (students of -p distill)
    steps: int = 250  # distilled: 0 = the student's own step count
    cfg_scale: float = 4.0
    eta: float = 0.0  # DDIM eta
    cfg_all_channels: bool = False  # DiT guides only latent channels 0-2
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
    precision: Optional[str] = None
    compile: Optional[bool] = None


@dataclass
class EvaluateConfig:
    samples: Optional[str] = None  # default: inference.output
    reference: Optional[str] = None  # ADM reference batch .npz (images or mu/sigma)
    inception_weights: Optional[str] = None  # local torch-fidelity Inception weights file
    batch_size: int = 200
    output: Optional[str] = None  # default <experiment_dir>/eval/<samples stem>.json
    adm_distances: bool = False  # precision/recall distances in float16 (float32 fallback) as ADM; default float64
    checkpoints: Any = None  # "all" or [steps]: FID over the run's checkpoints (eval/fid_vs_step.json, .png)
    num_samples: int = 10_000  # images per checkpoint for evaluate.checkpoints and train.fid_every
    sampler: Optional[str] = None  # the sweep's sampler (None: the inference sampler)
    steps: Optional[int] = None
    keep_samples: bool = False  # keep each checkpoint's .npz after scoring it


@dataclass
class Config:
    experiment_dir: str = "runs/default"
    seed: int = 0
    ckpt: Optional[str] = None  # checkpoint for sample/inference; default: latest in the run folder
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    ddgan: DDGANConfig = field(default_factory=DDGANConfig)
    cld: CLDConfig = field(default_factory=CLDConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


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


_CHOICES = {
    "train.precision": ("bf16", "fp16", "fp32"),
    "distill.precision": ("bf16", "fp16", "fp32"),
    "distill.parameterization": ("v", "x", "eps"),
    "distill.loss_weight": ("snr_trunc", "snr_plus_one"),
    "sample.precision": ("bf16", "fp16", "fp32"),
    "extract.precision": ("bf16", "fp32"),
    "train.lr_schedule": ("constant", "cosine", "linear"),
    "diffusion.schedule": ("linear", "cosine"),
    "wandb.mode": ("online", "offline", "disabled"),
    "data.source": ("folder", "digits"),
    "model.init_mode": ("strict", "resize"),
    "model.method": ("diffusion", "ddgan", "cld"),
    "cld.ode_solver": ("adaptive", "rk4", "heun", "euler"),
}


def _validate(cfg: DictConfig) -> None:
    for key, choices in _CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of {', '.join(choices)}")
    if cfg.inference.precision is not None and cfg.inference.precision not in _CHOICES["sample.precision"]:
        raise ConfigError(f"inference.precision={cfg.inference.precision!r} is not one of bf16, fp16, fp32")
    for key in ("train.batch_size", "train.max_steps", "train.grad_accum", "train.ckpt_every", "train.log_every",
                "distill.batch_size", "distill.iters_per_stage", "distill.grad_accum", "distill.ckpt_every",
                "distill.log_every", "distill.eval_samples", "sample.batch_size", "sample.per_class",
                "inference.batch_size", "inference.num_samples", "evaluate.batch_size", "extract.batch_size",
                "extract.flush_every", "data.image_size", "model.num_classes", "diffusion.num_steps",
                "evaluate.num_samples"):
        if OmegaConf.select(cfg, key) < 1:
            raise ConfigError(f"invalid value {key}={OmegaConf.select(cfg, key)}: it must be at least 1")
    for key in ("train.keep_last", "distill.keep_last", "train.max_grad_norm", "distill.max_grad_norm",
                "train.warmup_steps", "distill.warmup_steps", "train.min_lr", "train.weight_decay",
                "distill.weight_decay", "train.ckpt_every_minutes", "distill.ckpt_every_minutes", "train.eval_every",
                "data.holdout", "data.num_workers", "extract.num_workers", "sample.cfg_scale", "sample.eta",
                "train.peak_tflops", "distill.peak_tflops", "train.loss_buckets", "train.sample_every",
                "train.fid_every"):
        if OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"invalid value {key}={OmegaConf.select(cfg, key)}: it must be >= 0")
    for key in ("inference.cfg_scale", "inference.eta"):
        if OmegaConf.select(cfg, key) is not None and OmegaConf.select(cfg, key) < 0:
            raise ConfigError(f"invalid value {key}={OmegaConf.select(cfg, key)}: it must be >= 0")
    for key in ("train.lr", "distill.lr"):
        value = OmegaConf.select(cfg, key)
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"invalid value {key}={value}: the learning rate must be a finite number > 0")
    for key in ("train.ema_decay", "model.class_dropout_prob"):
        if not 0 <= OmegaConf.select(cfg, key) <= 1:
            raise ConfigError(f"invalid value {key}={OmegaConf.select(cfg, key)}: it must be in [0, 1]")
    if cfg.train.fid_every and cfg.train.fid_every % cfg.train.ckpt_every:
        raise ConfigError(f"invalid value train.fid_every={cfg.train.fid_every}: it must be a multiple of "
                          f"train.ckpt_every={cfg.train.ckpt_every} (the FID is taken of the checkpoint)")
    _validate_distill(cfg.distill)
    _validate_ddgan(cfg.ddgan)
    _validate_cld(cfg.cld)


def _validate_cld(cc: DictConfig) -> None:
    for key in ("mass", "beta", "gamma", "ode_rtol", "ode_atol"):
        if not cc[key] > 0:
            raise ConfigError(f"invalid value cld.{key}={cc[key]}: it must be > 0")
    if not 0 < cc.eps < 1 or not 0 < cc.sampling_eps < 1 or cc.numerical_eps < 0:
        raise ConfigError(f"cld.eps={cc.eps}, cld.sampling_eps={cc.sampling_eps} must lie in (0, 1) and "
                          f"cld.numerical_eps={cc.numerical_eps} be >= 0")


def _validate_ddgan(dc: DictConfig) -> None:
    for key in ("num_steps", "z_dim", "lazy_reg"):
        if dc[key] < 1:
            raise ConfigError(f"invalid value ddgan.{key}={dc[key]}: it must be at least 1")
    if not 0 < dc.beta_min < dc.beta_max:
        raise ConfigError(f"ddgan.beta_min={dc.beta_min}, ddgan.beta_max={dc.beta_max}: need 0 < beta_min < beta_max")
    if not (math.isfinite(dc.lr_d) and dc.lr_d > 0):
        raise ConfigError(f"invalid value ddgan.lr_d={dc.lr_d}: the learning rate must be a finite number > 0")
    if dc.r1_gamma < 0:
        raise ConfigError(f"invalid value ddgan.r1_gamma={dc.r1_gamma}: it must be >= 0 (0: no R1)")


def _validate_distill(dc: DictConfig) -> None:
    for key in ("start_steps", "end_steps"):
        value = dc[key]
        if value < 1 or value & (value - 1):
            raise ConfigError(f"distill.{key}={value} must be a power of two (1, 2, 4, ...)")
    if dc.end_steps >= dc.start_steps:
        raise ConfigError(
            f"distill.end_steps={dc.end_steps} must be smaller than distill.start_steps={dc.start_steps} "
            "(each stage halves the number of sampling steps)"
        )
    if dc.first_stage_iters is not None and dc.first_stage_iters < 1:
        raise ConfigError(f"distill.first_stage_iters={dc.first_stage_iters} must be at least 1 (or null)")
    if dc.fid_samples < 0:
        raise ConfigError(f"distill.fid_samples={dc.fid_samples} must be >= 0 (0: no FID per stage)")
    if dc.cfg_scale < 0:
        raise ConfigError(f"distill.cfg_scale={dc.cfg_scale} must be >= 0")
    if dc.cfg_range is not None:
        low_high = list(dc.cfg_range)
        if len(low_high) != 2 or not 0 <= low_high[0] < low_high[1]:
            raise ConfigError(f"distill.cfg_range={low_high} must be [lo, hi] with 0 <= lo < hi")
        if not low_high[0] <= dc.cfg_scale <= low_high[1]:
            raise ConfigError(
                f"distill.cfg_scale={dc.cfg_scale} (the scale of the stage grids) must lie in distill.cfg_range={low_high}"
            )
    if not 0 <= dc.ema_decay < 1:
        raise ConfigError(f"distill.ema_decay={dc.ema_decay} must be in [0, 1) (0: no EMA)")


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
