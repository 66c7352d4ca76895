"""The training methods, each registered once: its module (which holds its `SPEC`, methods/spec.py) and
its config section (the dataclass below, part of the typed schema of runtime/config.py).

Adding a method is its module plus one `Registration` here (and its section's dataclass when it has
settings of its own). Nothing else in the tool names a method: train asks the spec of `model.method`,
sampling the spec of the method a checkpoint records (published DiT checkpoints record none: they are
diffusion models). A method's section is checked (`SPEC.check_config`) only when the method runs.
Importing this module does not import torch; the method modules are imported on first use.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, List, Optional

from methods.spec import MethodSpec


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
    """DiT's IDDPM process (model.method=diffusion); also the schedule of published DiT checkpoints and of
    progressive distillation's teacher."""

    num_steps: int = 1000
    schedule: str = "linear"  # linear | cosine
    rescale_vb: bool = False  # IDDPM's RESCALED_MSE: VB term x num_steps/1000 (DiT: no rescale; same at 1000 steps)
    timesteps: TimestepsConfig = field(default_factory=TimestepsConfig)


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
    striding: str = "linear"  # sscs / euler-maruyama time grid: linear | quadratic (smaller steps near the data)
    ode_solver: str = "adaptive"  # cld-ode: adaptive (per-sample Dormand-Prince 5(4)) | rk4 | heun | euler
    ode_rtol: float = 1.0e-5
    ode_atol: float = 1.0e-5


@dataclass
class FlowConfig:
    """Flow matching on an interpolant x_t = alpha_t x + sigma_t eps (model.method=flow; SiT, REPA). Inside the
    tool t = 0 is data and t = 1 noise (REPA's time); `convention` is the time the network sees.
    Sampling: sample.sampler = ode | sde, with the solver settings below (docs/METHODS.md)."""

    path: str = "linear"  # linear (alpha = 1 - t, sigma = t) | gvp (cos, sin) | vp (SiT's VP, beta 0.1..20)
    prediction: str = "velocity"  # velocity | noise | score: what the network's first C output channels are
    loss_weight: str = "none"  # noise/score prediction: none | velocity | likelihood (SiT's weights)
    convention: Optional[str] = None  # repa (network time t, data at 0) | sit (1 - t, data at 1); training:
    #                                   None means repa; a bare published state dict: must be set
    time_sampling: str = "uniform"  # training times: uniform | logit_normal (t = sigmoid(N(time_mean, time_std)))
    time_mean: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0  # training times t' = s t / (1 + (s - 1) t) (SD3); s > 1 puts more weight near noise
    cosine_loss: float = 0.0  # weight of LightningDiT's 1 - cos(v_theta, u_t) term (1.0 as released; 0: off)
    train_eps: float = 1.0e-5  # kept away from t where the path is singular (vp; noise or score prediction)
    sample_eps: float = 1.0e-3  # the samplers stop or start this far from such t (SiT's sample_eps)
    ode_solver: str = "euler"  # sample.sampler=ode: euler | heun (fixed grid of sample.steps) | adaptive (dopri5)
    ode_atol: float = 1.0e-6  # adaptive: SiT's defaults
    ode_rtol: float = 1.0e-3
    sde_solver: str = "euler"  # sample.sampler=sde: euler (Euler-Maruyama) | heun
    diffusion_form: str = "sigma"  # the SDE's D(t): constant | sbdm | sigma | linear | decreasing | increasing-decreasing
    diffusion_norm: float = 1.0
    last_step: str = "mean"  # the SDE's last step to t = 0: mean | tweedie | euler | none
    last_step_size: float = 0.04


@dataclass
class MeanFlowConfig:
    """MeanFlow (model.method=meanflow; Geng et al. 2025): the average velocity u(z_t, r, t) from the MeanFlow
    identity, one network evaluation per sampling step. Sampling: sample.sampler=meanflow, sample.steps 1, 2, N."""

    t_mean: float = -0.4  # t and r: each sigmoid(N(mean, std)), ordered t >= r (the paper's ImageNet setting)
    t_std: float = 1.0
    r_mean: float = -0.4
    r_std: float = 1.0
    ratio: float = 0.25  # the share of samples with r != t (the rest: plain flow matching, r = t)
    norm_p: float = 1.0  # adaptive loss weight 1 / (error + norm_eps)^norm_p (0: plain squared error)
    norm_eps: float = 1.0e-3
    cfg_scale: float = 1.0  # w: guidance folded into training (1: none); labels dropped by model.class_dropout_prob


@dataclass(frozen=True)
class Registration:
    """A method: `name` (model.method, and the "method" its checkpoints record), the module holding its
    SPEC, its config section (attribute `section` of the config, of type `config`), and whether `-p train`
    runs it (progressive distillation has a phase of its own)."""

    name: str
    module: str
    section: Optional[str] = None
    config: Optional[type] = None
    trainable: bool = True


REGISTRATIONS = (
    Registration("diffusion", "methods.diffusion", "diffusion", DiffusionConfig),
    Registration("distill", "methods.distill", "distill", DistillConfig, trainable=False),
    Registration("ddgan", "methods.ddgan", "ddgan", DDGANConfig),
    Registration("cld", "methods.cld", "cld", CLDConfig),
    Registration("flow", "methods.flow", "flow", FlowConfig),
    Registration("meanflow", "methods.meanflow", "meanflow", MeanFlowConfig),
)
DEFAULT = "diffusion"  # the method of a checkpoint that records none (published DiT checkpoints)


def config_sections() -> list[tuple[str, type]]:
    """(section name, dataclass) of every registered method with settings of its own."""
    return [(r.section, r.config) for r in REGISTRATIONS if r.section]


def trainable_names() -> tuple:
    return tuple(r.name for r in REGISTRATIONS if r.trainable)


def names() -> tuple:
    return tuple(r.name for r in REGISTRATIONS)


def spec(name: str) -> MethodSpec:
    """The spec of a registered method (its module is imported now)."""
    for registration in REGISTRATIONS:
        if registration.name == name:
            return importlib.import_module(registration.module).SPEC
    raise ValueError(f"method {name!r} is not one of {', '.join(names())}")


def specs() -> list[MethodSpec]:
    return [spec(name) for name in names()]


def training_spec(cfg) -> MethodSpec:
    """The spec of model.method, which `-p train` runs; its config section is checked now."""
    name = cfg.model.method
    if name not in trainable_names():
        raise ValueError(f"model.method={name!r} is not one of {', '.join(trainable_names())}")
    method = spec(name)
    method.check_config(cfg)
    return method


def checkpoint_spec(meta: dict) -> MethodSpec:
    """The spec of the method that wrote a checkpoint (its entries besides the weights)."""
    name = meta.get("method", DEFAULT) if isinstance(meta, dict) else DEFAULT
    if name not in names():
        raise ValueError(f"the checkpoint was written by method {name!r}, which this version cannot sample "
                         f"(methods: {', '.join(names())})")
    return spec(name)


def sampler_owner(sampler: str) -> Optional[MethodSpec]:
    """The method whose checkpoints sample with `sampler` (None when no method offers it)."""
    for method in specs():
        if sampler in method.samplers:
            return method
    return None
