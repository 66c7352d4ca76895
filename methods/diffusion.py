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
from diffusion.sampler import build_sampler
from diffusion.timesteps import build_timestep_strategy
from methods.base import Objective
from methods.timestep_buckets import TimestepBuckets
from models.flops import dit_forward_flops
from runtime.config import ConfigError


class DiffusionMethod:
    """L = w(t) * ||eps - eps_hat||^2 + L_vb (learned sigma), t from the timestep strategy.

    Also keeps the unweighted eps-MSE per timestep bucket (`buckets` equal ranges of t) on the
    device, reported and reset at log steps: where in t the model still errs, whatever the weighting.
    """

    def __init__(self, model: nn.Module, diffusion, strategy, buckets: int = 0):
        self.model = model
        self.diffusion = diffusion
        self.strategy = strategy
        self.buckets = TimestepBuckets(diffusion.num_timesteps, buckets) if buckets else None

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def objectives(self) -> list[Objective]:
        return [Objective("model", ("model",))]

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

    def begin_step(self, step: int) -> None:
        pass

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


def describe_sampler(checkpoint: dict, settings: DictConfig) -> str:
    return f"{settings.sampler} x {settings.steps} steps, cfg scale {settings.cfg_scale}"


def build(cfg: DictConfig, model: nn.Module, device: torch.device) -> DiffusionMethod:
    """The training method for `train` with model.method=diffusion."""
    diffusion = create_diffusion(cfg.diffusion.num_steps, cfg.diffusion.schedule, learn_sigma=model.learn_sigma,
                                 rescale_vb=cfg.diffusion.rescale_vb)
    strategy = build_timestep_strategy(cfg.diffusion.timesteps, diffusion, device)
    return DiffusionMethod(model, diffusion, strategy, buckets=cfg.train.loss_buckets)


def check_null_class(model_args: dict, setting: str) -> None:
    """Guidance (asked for by `setting`) needs the null class that only label dropout creates."""
    if float(model_args.get("class_dropout_prob", 0.0)) <= 0:
        raise ConfigError(
            f"{setting} asks for classifier-free guidance, but the model was built with class_dropout_prob=0 and "
            "has no null class to guide with: use a scale of 1 (or train with model.class_dropout_prob > 0)"
        )


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents, for DiT checkpoints (ours or published)."""
    if settings.sampler == "distilled":
        raise ValueError(
            "sample.sampler=distilled needs a distilled student checkpoint (from -p distill); this checkpoint is "
            "a diffusion model: use ddpm, ddim, dpm++, unipc, euler or diffusers-ddim"
        )
    sampler = build_sampler(
        settings.sampler,
        settings.steps,
        num_steps=cfg.diffusion.num_steps,
        schedule=cfg.diffusion.schedule,
        learn_sigma=model_args["learn_sigma"],
        eta=settings.eta,
    )
    scale, all_channels, num_classes = float(settings.cfg_scale), bool(settings.cfg_all_channels), model_args["num_classes"]
    if scale != 1.0:
        check_null_class(model_args, f"cfg_scale={scale}")

    def sample(noise: torch.Tensor, y: torch.Tensor, generators, progress: bool) -> torch.Tensor:
        fn = guided_model_fn(model, y, scale, num_classes, all_channels=all_channels)
        return sampler(fn, noise, generators=generators, progress=progress)

    return sample
