"""Denoising diffusion GAN (Xiao, Kreis & Vahdat, ICLR 2022) as a training method: `model.method=ddgan`.

A few large denoising steps (T = 2..4) make the true reverse step multimodal, so each is modelled
by a conditional GAN: the generator G(x_{k+1}, z, k, y) (our DiT with a latent code z) predicts
x_0, and x'_k is drawn from the Gaussian posterior q(x_k | x_{k+1}, x'_0); the discriminator
D(x_k, x_{k+1}, k, y) (models/discriminator.py) tells real pairs from the forward process from
generated ones. Non-saturating loss, lazy R1 on real pairs, separate Adam optimizers for D and G
(D first, then G, every step, as the official training loop), EMA of G. Sampling takes T
generator evaluations. The chain is diffusion/ddgan_schedule.py; the losses methods/gan_losses.py.
"""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from diffusion.ddgan_schedule import DDGANSchedule
from diffusion.noise import per_row_noise
from methods.base import NoExtraState, Objective
from methods.gan_losses import discriminator_loss, generator_loss, r1_penalty
from methods.spec import MethodSpec
from models.discriminator import create_discriminator
from models.flops import dit_forward_flops
from runtime.config import LEARNING_RATE, ConfigError, check_values


class DDGANMethod(NoExtraState):
    """D step: L_D = softplus(-D(real)) + softplus(D(fake)) [+ r1_gamma/2 R1 every lazy_reg steps]; G step:
    L_G = softplus(-D(fake)). Real pair (x_k, x_{k+1}) from q; fake x_k from the posterior around G's x_0."""

    def __init__(self, generator: nn.Module, discriminator: nn.Module, schedule: DDGANSchedule, z_dim: int,
                 r1_gamma: float, lazy_reg: int, d_lr_scale: float):
        self.generator = generator
        self.discriminator = discriminator
        self.schedule = schedule
        self.z_dim = z_dim
        self.r1_gamma = r1_gamma
        self.lazy_reg = lazy_reg
        self.d_lr_scale = d_lr_scale
        self.step = 0

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.generator, "discriminator": self.discriminator}

    def objectives(self) -> list[Objective]:
        return [Objective("discriminator", ("discriminator",), lr_scale=self.d_lr_scale), Objective("model", ("model",))]

    def begin_step(self, step: int) -> None:
        self.step = step

    def pairs(self, x: torch.Tensor, generator: torch.Generator):
        """(k, network time, x_k, x_{k+1}) for a batch of data x: k uniform in 0..T-1."""
        k = torch.randint(self.schedule.num_steps, (x.shape[0],), generator=generator).to(x.device)
        x_k, x_next = self.schedule.q_sample_pair(x, k, torch.randn_like(x), torch.randn_like(x))
        return k, self.schedule.network_time(k), x_k, x_next

    def fake(self, g: nn.Module, x_next: torch.Tensor, k: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
        """x'_k ~ q(x_k | x_{k+1}, x'_0 = G(x_{k+1}, z, k, y)) with z ~ N(0, I)."""
        z = torch.randn(x_next.shape[0], self.z_dim, device=x_next.device)
        x0 = g(x_next, t, y, z=z)[:, : x_next.shape[1]].float()
        return self.schedule.posterior_sample(x0, x_next, k, torch.randn_like(x_next))

    def loss(self, objective, nets, x, y, generator):
        x = x.float()
        k, t, x_k, x_next = self.pairs(x, generator)
        d = nets["discriminator"]
        if objective == "model":
            logits = d(self.fake(nets["model"], x_next, k, t, y), x_next, t, y).float()
            loss = generator_loss(logits)
            return loss, {"g_loss": loss.detach(), "d_fake_for_g": logits.mean().detach()}
        with torch.no_grad():
            fake = self.fake(nets["model"], x_next, k, t, y)
        regularise = self.r1_gamma > 0 and self.step % self.lazy_reg == 0
        real = x_k.detach().requires_grad_(regularise)
        # One forward for the real and the fake pairs (one DDP forward per backward).
        logits = d(torch.cat([real, fake]), torch.cat([x_next, x_next]), torch.cat([t, t]), torch.cat([y, y])).float()
        logits_real, logits_fake = logits.chunk(2)
        loss = discriminator_loss(logits_real, logits_fake)
        metrics = {"d_loss": loss.detach(), "d_real": logits_real.mean().detach(), "d_fake": logits_fake.mean().detach()}
        if regularise:
            r1 = r1_penalty(logits_real, real)
            loss = loss + 0.5 * self.r1_gamma * r1
            metrics["r1"] = r1.detach()
        return loss, metrics


def schedule_of(info: dict) -> DDGANSchedule:
    return DDGANSchedule(int(info["num_steps"]), float(info["beta_min"]), float(info["beta_max"]), float(info["eps"]))


def model_args(cfg: DictConfig, margs: dict) -> dict:
    """The generator: DiT predicting x_0 (C channels), a latent code, no null class (no guidance in DDGAN)."""
    return {**margs, "learn_sigma": False, "class_dropout_prob": 0.0, "z_dim": int(cfg.ddgan.z_dim)}


def flops_per_image(cfg: DictConfig, margs: dict) -> float:
    """Per image and update: G forward (D step) + G forward/backward (G step) = 4 G; D forward/backward on
    the real and the fake pair (D step) + D forward/backward (G step) = 9 D. D's forward is counted by
    torch's FLOP counter on one pair (the R1 double backward every lazy_reg steps is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    size, channels = margs["input_size"], margs["in_channels"]
    d = create_discriminator(str(cfg.ddgan.discriminator), size, channels, margs["num_classes"])
    x = torch.zeros(1, channels, size, size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        d(x, x, torch.zeros(1), torch.zeros(1, dtype=torch.long))
    return 4 * dit_forward_flops(margs) + 9 * float(counter.get_total_flops())


def metadata(cfg: DictConfig) -> dict:
    """What sampling a checkpoint needs besides the weights."""
    dc = cfg.ddgan
    schedule = DDGANSchedule(dc.num_steps, dc.beta_min, dc.beta_max)
    return {"ddgan": {"num_steps": schedule.num_steps, "beta_min": schedule.beta_min, "beta_max": schedule.beta_max,
                      "eps": schedule.eps, "z_dim": int(dc.z_dim), "discriminator": str(dc.discriminator)}}


def build(cfg: DictConfig, model: nn.Module, device: torch.device) -> DDGANMethod:
    """The training method for `train` with model.method=ddgan; `model` is the generator."""
    dc = cfg.ddgan
    if cfg.train.compile and dc.r1_gamma > 0:
        raise ConfigError("train.compile with ddgan.r1_gamma > 0 is not supported: the R1 penalty differentiates "
                          "the discriminator twice, which torch.compile cannot; set train.compile=false")
    schedule = DDGANSchedule(dc.num_steps, dc.beta_min, dc.beta_max)
    discriminator = create_discriminator(dc.discriminator, model.input_size, model.in_channels, model.num_classes)
    return DDGANMethod(model, discriminator.to(device), schedule, int(dc.z_dim), float(dc.r1_gamma), int(dc.lazy_reg),
                       float(dc.lr_d) / float(cfg.train.lr))


def check_config(cfg: DictConfig) -> None:
    """ddgan.*: the chain, the discriminator's optimiser and R1."""
    dc = cfg.ddgan
    for key in ("num_steps", "z_dim", "lazy_reg"):
        if dc[key] < 1:
            raise ConfigError(f"invalid value ddgan.{key}={dc[key]}: it must be at least 1")
    if not 0 < dc.beta_min < dc.beta_max:
        raise ConfigError(f"ddgan.beta_min={dc.beta_min}, ddgan.beta_max={dc.beta_max}: need 0 < beta_min < beta_max")
    check_values(cfg, ("ddgan.lr_d",), LEARNING_RATE)
    if dc.r1_gamma < 0:
        raise ConfigError(f"invalid value ddgan.r1_gamma={dc.r1_gamma}: it must be >= 0 (0: no R1)")


def check_settings(info: dict, settings: DictConfig) -> None:
    """A DDGAN generator samples one way: its own T steps (no guidance: methods/sampling.py refuses cfg_scale != 1)."""
    steps = int(info["num_steps"])
    if settings.steps not in (0, steps):
        raise ValueError(f"the checkpoint is a {steps}-step denoising diffusion GAN; steps={settings.steps} cannot be "
                         f"honoured (use steps={steps} or 0)")


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents: T generator evaluations, each followed by a posterior draw.

    The latent codes and the posterior noise of image i come from its own generator, so an image does not
    depend on its batch.
    """
    info = checkpoint["ddgan"]
    check_settings(info, settings)
    schedule = schedule_of(info)
    z_dim = int(info["z_dim"])

    def sample(noise: torch.Tensor, y: torch.Tensor, generators, progress: bool) -> torch.Tensor:
        x, batch, device = noise, noise.shape[0], noise.device
        for k in reversed(range(schedule.num_steps)):
            index = torch.full((batch,), k, dtype=torch.long, device=device)
            z = per_row_noise((batch, z_dim), generators, device)
            x0 = model(x, schedule.network_time(index), y, z=z)[:, : x.shape[1]].float()
            x = schedule.posterior_sample(x0, x.float(), index, per_row_noise(x.shape, generators, device))
        return x

    return sample


def describe_sampler(checkpoint: dict, settings: DictConfig, cfg: DictConfig) -> str:
    return f"ddgan x {checkpoint['ddgan']['num_steps']} steps (one generator evaluation each), no guidance"


SPEC = MethodSpec(
    name="ddgan",
    title="a denoising diffusion GAN",
    samplers=("ddgan",),
    generation_sampler=generation_sampler,
    describe_sampler=describe_sampler,
    guidance=False,
    cfg_interval=False,
    model_args=model_args,
    build=build,
    metadata=metadata,
    flops_per_image=flops_per_image,
    check_config=check_config,
)
