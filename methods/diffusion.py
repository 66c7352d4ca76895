"""The IDDPM method DiT trains with: epsilon prediction, learned-range variance, hybrid loss.

Timesteps and loss weights come from the configured strategy (uniform, SpeeD and the baselines,
diffusion/timesteps/); sampling uses DDPM, DDIM or a diffusers scheduler with DiT's
classifier-free guidance.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from diffusion import create_diffusion
from diffusion.guidance import guided_model_fn
from diffusion.sampler import SAMPLERS, build_sampler
from diffusion.timesteps import build_timestep_strategy
from methods.base import SingleNetwork
from methods.sampling import interval_of
from methods.spec import MethodSpec, Published
from methods.timestep_buckets import TimestepBuckets
from models.flops import dit_forward_flops
from runtime.config import AT_LEAST_ONE, check_choices, check_values


class DiffusionMethod(SingleNetwork):
    """L = w(t) * ||eps - eps_hat||^2 + L_vb (learned sigma), t from the timestep strategy.

    Also keeps the unweighted eps-MSE per timestep bucket (`buckets` equal ranges of t) on the
    device, reported and reset at log steps: where in t the model still errs, whatever the weighting.
    """

    def __init__(self, model: nn.Module, diffusion, strategy, buckets: int = 0):
        super().__init__(model)
        self.diffusion = diffusion
        self.strategy = strategy
        self.buckets = TimestepBuckets(diffusion.num_timesteps, buckets) if buckets else None

    def loss(self, objective, nets, x, y, generator):
        ts = self.strategy.sample(x.shape[0], generator)
        terms = self.diffusion.training_losses(
            nets["model"], x, ts.t, model_kwargs={"y": y}, mse_weights=ts.mse_weight, vb_weights=ts.vb_weight
        )
        raw = terms["mse"].detach() + (terms["vb"].detach() if "vb" in terms else 0.0)
        self.strategy.update(ts.t, raw)  # the loss-aware sampler's history (a no-op for the others)
        if self.buckets is not None:
            self.buckets.add(ts.t, terms["mse"].detach())
        loss = terms["loss"].float().mean()
        return loss, {"loss": loss.detach(), "mse": terms["mse"].detach().float().mean()}

    def time_key(self, t: torch.Tensor) -> torch.Tensor:
        """The network's timestep as a bucket key in thousandths of the chain (step k of 1000 -> k; for the
        per-time log of representation alignment)."""
        steps = self.diffusion.num_timesteps
        return (t.long() * 1000 // steps).clamp(0, 999)

    def log_metrics(self) -> dict:
        """Mean eps-MSE per timestep bucket since the last call, over all ranks (then reset)."""
        return self.buckets.report("mse") if self.buckets is not None else {}

    def state_dict(self) -> dict:
        return {"timesteps": self.strategy.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_state_dict(state["timesteps"])


def model_args(cfg: DictConfig, margs: dict) -> dict:
    """DiT as configured (model.learn_sigma, model.class_dropout_prob)."""
    return margs


def flops_per_image(cfg: DictConfig, margs: dict) -> float:
    return 3 * dit_forward_flops(margs)  # a forward and a backward twice as expensive


def metadata(cfg: DictConfig) -> dict:
    return {}  # sampling reads diffusion.* from the config, as for published checkpoints


def describe_sampler(checkpoint: dict, settings: DictConfig, cfg: DictConfig) -> str:
    return f"{settings.sampler} x {settings.steps} steps, cfg scale {settings.cfg_scale}"


def build(cfg: DictConfig, model: nn.Module, device: torch.device) -> DiffusionMethod:
    """The training method for `train` with model.method=diffusion."""
    diffusion = create_diffusion(cfg.diffusion.num_steps, cfg.diffusion.schedule, learn_sigma=model.learn_sigma,
                                 rescale_vb=cfg.diffusion.rescale_vb)
    strategy = build_timestep_strategy(cfg.diffusion.timesteps, diffusion, device)
    return DiffusionMethod(model, diffusion, strategy, buckets=cfg.train.loss_buckets)


def check_config(cfg: DictConfig) -> None:
    """diffusion.*: the process (the timestep strategy checks its own keys when it is built)."""
    check_choices(cfg, {"diffusion.schedule": ("linear", "cosine")})
    check_values(cfg, ("diffusion.num_steps",), AT_LEAST_ONE)


def method_time(num_steps: int):
    """Original timestep k -> the method's time (k + 1) / T in (0, 1] (1 = noise), as distillation maps it."""
    return lambda k: (k.double() + 1.0) / num_steps


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents, for DiT checkpoints (ours or published)."""
    sampler = build_sampler(
        settings.sampler,
        settings.steps,
        num_steps=cfg.diffusion.num_steps,
        schedule=cfg.diffusion.schedule,
        learn_sigma=model_args["learn_sigma"],
        eta=settings.eta,
    )
    scale, all_channels, num_classes = float(settings.cfg_scale), bool(settings.cfg_all_channels), model_args["num_classes"]
    interval, time_of = interval_of(settings), method_time(cfg.diffusion.num_steps)

    def sample(noise: torch.Tensor, y: torch.Tensor, generators, progress: bool) -> torch.Tensor:
        fn = guided_model_fn(model, y, scale, num_classes, all_channels=all_channels, interval=interval, time_of=time_of)
        return sampler(fn, noise, generators=generators, progress=progress)

    return sample


def validation_loss(cfg: DictConfig, method: DiffusionMethod, model: nn.Module, dataset, num_items: int, device) -> dict:
    """The unweighted eps-MSE (and VB) on the held-out items (phases/validation.py)."""
    from phases.validation import validation_loss as eps_validation_loss

    return eps_validation_loss(cfg, model, method.diffusion, dataset, num_items, device)


def eps_denoiser(model: nn.Module, schedule, num_classes: int, channels: int, all_channels: bool):
    """denoise(z, t, y, scale) -> x_hat of a trained DiT in continuous time (diffusion/continuous_schedule.py):
    DiT's guided epsilon (one batched forward for the CFG pair), then x."""
    from diffusion.progressive_distillation import x_from_output

    def denoise(z, t, y, scale):
        fn = guided_model_fn(model, y, scale, num_classes, all_channels=all_channels)
        eps = fn(z, schedule.model_timesteps(t).to(z.device))[:, :channels].float()
        alpha, sigma = schedule.alpha_sigma(t)
        return x_from_output(eps, z, alpha, sigma, "eps")

    return denoise


def eps_teacher(model: nn.Module, model_args: dict, cfg: DictConfig, all_channels: bool):
    """A trained DiT as a progressive-distillation teacher, on the continuous version of diffusion.*."""
    from diffusion.continuous_schedule import ContinuousSchedule
    from diffusion.schedule import get_beta_schedule

    schedule = ContinuousSchedule(get_beta_schedule(cfg.diffusion.schedule, cfg.diffusion.num_steps))
    return eps_denoiser(model, schedule, model_args["num_classes"], model_args["in_channels"], all_channels)


SPEC = MethodSpec(
    name="diffusion",
    title="a diffusion model (IDDPM, as DiT)",
    samplers=SAMPLERS,
    generation_sampler=generation_sampler,
    describe_sampler=describe_sampler,
    model_args=model_args,
    build=build,
    metadata=metadata,
    flops_per_image=flops_per_image,
    validation_loss=validation_loss,
    check_config=check_config,
    alignable=True,
    read_bare=lambda state, cfg: Published({}, source="a DiT checkpoint without metadata (diffusion.* from the config)"),
    teacher=eps_teacher,
)
