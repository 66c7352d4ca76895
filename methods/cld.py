"""Critically-damped Langevin diffusion (Dockhorn, Vahdat & Kreis, ICLR 2022) as a training method:
`model.method=cld`.

Each latent x gets a velocity v of the same shape; the pair diffuses under a critically damped
Langevin SDE in which noise enters only through v (diffusion/cld.py). The network is our DiT with
2C input channels (x_t and v_t concatenated) and C output channels: alpha_theta, read as the
velocity score s = -ell_t alpha_theta - v_t / Svv (the paper's mixed score). It is trained by
hybrid score matching with lambda(t) = ell_t^-2, i.e. an eps_v regression, t ~ U[eps, 1], with
label dropout for classifier-free guidance. Sampling: SSCS, Euler-Maruyama or the probability-flow
ODE (diffusion/cld_samplers.py), guidance applied to alpha_theta with DiT's convention.
"""
from __future__ import annotations

import math

import torch
from omegaconf import DictConfig
from torch import nn

from diffusion.cld import CLD
from diffusion.cld_samplers import STRIDINGS, euler_maruyama_sample, probability_flow_sample, sscs_sample
from diffusion.guidance import guided_model_fn
from diffusion.noise import per_row_noise
from methods.base import SingleNetwork
from methods.sampling import interval_of, refuse_eta
from methods.spec import MethodSpec
from methods.timestep_buckets import TimestepBuckets
from models.flops import dit_forward_flops
from runtime.config import ConfigError, check_choices

SAMPLERS = ("sscs", "euler-maruyama", "cld-ode")
TIME_SCALE = 1000.0  # the network sees 1000 t: DiT's timestep range


def network_input(x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The DiT input: position and velocity concatenated along the channels."""
    return torch.cat([x, v], dim=1)


class CLDMethod(SingleNetwork):
    """L = mean over the batch of ||alpha_theta + v_t / (ell_t Svv) - eps_v||^2 (HSM, lambda = ell_t^-2).

    Also keeps the loss per range of t (`buckets` equal ranges of [0, 1]), as the diffusion method
    does per timestep range.
    """

    def __init__(self, model: nn.Module, process: CLD, buckets: int = 0):
        super().__init__(model)
        self.process = process
        self.buckets = TimestepBuckets(1000, buckets) if buckets else None

    def loss(self, objective, nets, x, y, generator):
        x = x.float()
        eps = self.process.eps
        t = (eps + (1.0 - eps) * torch.rand(x.shape[0], generator=generator, dtype=torch.float64)).to(x.device)
        noise_x, noise_v = torch.randn_like(x), torch.randn_like(x)
        x_t, v_t = self.process.perturb(x, t, noise_x, noise_v)
        out = nets["model"](network_input(x_t, v_t), (TIME_SCALE * t).float(), y)[:, : x.shape[1]]
        per_sample = self.process.hsm_loss(out, x_t, v_t, noise_v, t)
        if self.buckets is not None:
            self.buckets.add((TIME_SCALE * t).long().clamp(max=999), per_sample.detach())
        loss = per_sample.mean()
        return loss, {"loss": loss.detach()}

    def log_metrics(self) -> dict:
        """Mean HSM loss per range of t since the last call, over all ranks (then reset)."""
        return self.buckets.report("hsm") if self.buckets is not None else {}


def process_of(info: dict) -> CLD:
    return CLD(**info)


def model_args(cfg: DictConfig, margs: dict) -> dict:
    """DiT on (x, v): 2C input channels, C output channels (alpha_theta), label dropout as configured."""
    return {**margs, "learn_sigma": False, "extra_in_channels": int(margs["in_channels"])}


def flops_per_image(cfg: DictConfig, margs: dict) -> float:
    return 3 * dit_forward_flops(margs)


def metadata(cfg: DictConfig) -> dict:
    """The process a checkpoint was trained with: sampling must use the same one."""
    c = cfg.cld
    process = CLD(mass=c.mass, gamma=c.gamma, beta=c.beta, eps=c.eps, sampling_eps=c.sampling_eps,
                  numerical_eps=c.numerical_eps, mixed_score=c.mixed_score)
    return {"cld": {name: getattr(process, name) for name in process.__dataclass_fields__}}


def build(cfg: DictConfig, model: nn.Module, device: torch.device) -> CLDMethod:
    """The training method for `train` with model.method=cld."""
    return CLDMethod(model, process_of(metadata(cfg)["cld"]), buckets=cfg.train.loss_buckets)


def check_config(cfg: DictConfig) -> None:
    """cld.*: the process and the ODE solver's settings."""
    cc = cfg.cld
    check_choices(cfg, {"cld.ode_solver": ("adaptive", "rk4", "heun", "euler"), "cld.striding": STRIDINGS})
    for key in ("mass", "beta", "gamma", "ode_rtol", "ode_atol"):
        if not cc[key] > 0:
            raise ConfigError(f"invalid value cld.{key}={cc[key]}: it must be > 0")
    if not 0 < cc.eps < 1 or not 0 < cc.sampling_eps < 1 or cc.numerical_eps < 0:
        raise ConfigError(f"cld.eps={cc.eps}, cld.sampling_eps={cc.sampling_eps} must lie in (0, 1) and "
                          f"cld.numerical_eps={cc.numerical_eps} be >= 0")


def check_settings(settings: DictConfig) -> None:
    """Settings of the CLD samplers, named before any sampling (the sampler name is checked by methods/sampling.py)."""
    if settings.sampler != "cld-ode" and settings.steps < 2:
        raise ValueError(f"{settings.sampler} needs steps >= 2 (score evaluations, the denoising step included), "
                         f"got steps={settings.steps}")
    refuse_eta(settings, "the CLD samplers")


def _solver_settings(cfg: DictConfig | None) -> dict:
    c = cfg.cld if cfg is not None else None
    return {"solver": c.ode_solver if c is not None else "adaptive",
            "rtol": c.ode_rtol if c is not None else 1e-5, "atol": c.ode_atol if c is not None else 1e-5,
            "striding": c.striding if c is not None else "linear"}


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents: `noise` is x_1 ~ N(0, I); v_1 ~ N(0, M I) and every
    later draw come from image i's own generator, so an image does not depend on its batch."""
    check_settings(settings)
    process = process_of(checkpoint["cld"])
    scale, all_channels = float(settings.cfg_scale), bool(settings.cfg_all_channels)
    num_classes, channels, steps = model_args["num_classes"], model_args["in_channels"], int(settings.steps)
    ode = _solver_settings(cfg)  # cld.ode_* and the SDE samplers' cld.striding
    interval = interval_of(settings)
    if settings.sampler == "cld-ode" and ode["solver"] != "adaptive" and steps < 1:
        raise ValueError(f"cld-ode with cld.ode_solver={ode['solver']} needs steps >= 1, got steps={steps}")

    def run(score, x, v, noise, progress):
        if settings.sampler == "sscs":
            return sscs_sample(process, score, x, v, steps, noise, progress=progress, striding=ode["striding"])
        if settings.sampler == "euler-maruyama":
            return euler_maruyama_sample(process, score, x, v, steps, noise, progress=progress,
                                         striding=ode["striding"])
        return probability_flow_sample(process, score, x, v, steps=steps, solver=ode["solver"], rtol=ode["rtol"],
                                       atol=ode["atol"], progress=progress)

    def sample(noise: torch.Tensor, y: torch.Tensor, generators, progress: bool) -> torch.Tensor:
        device = noise.device
        x = noise.float()
        v = per_row_noise(noise.shape, generators, device) * math.sqrt(process.mass)
        guide = lambda labels: guided_model_fn(model, labels, scale, num_classes, all_channels=all_channels,
                                               interval=interval, time_of=lambda t: t / TIME_SCALE)
        guided = guide(y)

        def score(x, v, t, rows=None):
            fn = guided if rows is None else guide(y[rows])
            out = fn(network_input(x, v), (TIME_SCALE * t).float().to(device))[:, :channels].float()
            return process.velocity_score(out, x, v, t.to(device))

        x, _ = run(score, x, v, lambda shape: per_row_noise(shape, generators, device), progress)
        return x

    return sample


def describe_sampler(checkpoint: dict, settings: DictConfig, cfg: DictConfig) -> str:
    if settings.sampler == "cld-ode":
        return f"cld-ode (probability-flow ODE, see cld.ode_solver), cfg scale {settings.cfg_scale}"
    striding = cfg.cld.striding if cfg is not None else "linear"
    return (f"{settings.sampler} x {settings.steps} score evaluations (CLD, {striding} time grid), "
            f"cfg scale {settings.cfg_scale}")


SPEC = MethodSpec(
    name="cld",
    title="a critically-damped Langevin diffusion",
    samplers=SAMPLERS,
    generation_sampler=generation_sampler,
    describe_sampler=describe_sampler,
    model_args=model_args,
    build=build,
    metadata=metadata,
    flops_per_image=flops_per_image,
    check_config=check_config,
)
