"""Progressive distillation as a training method, and sampling with its students.

One stage trains a student with N steps to match two DDIM steps of its teacher (2N steps) with one
of its own (diffusion/progressive_distillation.py). The first teacher is the trained DiT (epsilon
prediction, classifier-free guidance with DiT's convention folded into the targets); later
teachers are the previous stage's students. Time is continuous (diffusion/continuous_schedule.py).

A student is the DiT architecture with the teacher's weights: its first C output channels are read
as v, x or eps (`parameterization`); the learned-variance channels are ignored. Guidance: a fixed
scale is folded into the student, which then samples with one forward per step; with a scale range,
the student also gets the scale through a zero-initialised embedding (Meng et al. 2023) and samples
at any scale in the range.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from diffusion.continuous_ddim import ddim_sample, ddim_step
from diffusion.continuous_schedule import ContinuousSchedule
from diffusion.likelihood import mean_flat
from diffusion.progressive_distillation import distillation_target, loss_weight, stage_times, x_from_output
from diffusion.schedule import get_beta_schedule
from methods.base import SingleNetwork
from methods.spec import MethodSpec
from models import create_model
from runtime.checkpoint import latest_checkpoint
from runtime.config import (AT_LEAST_ONE, LEARNING_RATE, NON_NEGATIVE, PRECISIONS, ConfigError, check_choices,
                            check_values)

SAMPLER = "distilled"  # sample.sampler of the students
STAGE_FINISHED = "stage.json"  # written in a stage's folder once it has been trained and measured

# denoise(z_t, t [B] float64, y [B], scale: float | [B] tensor) -> x_hat, float32
Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, object], torch.Tensor]


@dataclass(frozen=True)
class Guidance:
    """How guidance enters a distillation run: one fixed scale, or a range drawn per sample."""

    scale: float = 1.0  # DiT's convention: 1 = no guidance
    range: Optional[tuple] = None  # (lo, hi): scale-conditioned student, s ~ U[lo, hi] per sample
    all_channels: bool = False

    @property
    def conditioned(self) -> bool:
        return self.range is not None

    def draw(self, batch: int, generator: torch.Generator, device: torch.device):
        """The scales of a training batch: a float, or a [B] tensor drawn uniformly from the range."""
        if self.range is None:
            return self.scale
        low, high = self.range
        return (low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)).float().to(device)

    def as_dict(self) -> dict:
        return {"cfg_scale": self.scale, "cfg_range": list(self.range) if self.range else None,
                "cfg_all_channels": self.all_channels}


def student_denoiser(net: nn.Module, schedule: ContinuousSchedule, parameterization: str, channels: int,
                     scale_conditioned: bool) -> Denoise:
    """x_hat of a student: one forward (the scale goes in only when the student is scale-conditioned)."""

    def denoise(z, t, y, scale):
        extra = {}
        if scale_conditioned:
            s = scale if isinstance(scale, torch.Tensor) else torch.full((z.shape[0],), float(scale), device=z.device)
            extra = {"s": s}
        out = net(z, schedule.model_timesteps(t).to(z.device), y, **extra)[:, :channels].float()
        alpha, sigma = schedule.alpha_sigma(t)
        return x_from_output(out, z, alpha, sigma, parameterization)

    return denoise


def make_student(model_args: dict, weights: dict, scale_conditioned: bool) -> tuple[nn.Module, dict]:
    """A copy of the teacher's architecture and weights (plus a zero-initialised scale embedding)."""
    margs = {**model_args, "guidance_embedding": bool(scale_conditioned or model_args.get("guidance_embedding"))}
    student = create_model(**margs)
    missing, unexpected = student.load_state_dict(weights, strict=False)
    new = [k for k in missing if not k.startswith("guidance_embedder.")]
    if new or unexpected:
        raise ValueError(f"teacher weights do not fit the student: missing {new[:5]}, unexpected {unexpected[:5]}")
    student.y_embedder.dropout_prob = 0.0  # the student learns the (guided) conditional teacher: no label dropout
    return student, margs


class DistillMethod(SingleNetwork):
    """Loss of one stage: w(t) ||x_tilde - x_hat_student(z_t)||^2 with x_tilde from two teacher DDIM steps."""

    def __init__(self, student: nn.Module, teacher: Denoise, schedule: ContinuousSchedule, student_steps: int,
                 parameterization: str, weighting: str, guidance: Guidance):
        super().__init__(student)
        self.teacher = teacher
        self.schedule = schedule
        self.steps = student_steps
        self.parameterization = parameterization
        self.weighting = weighting
        self.guidance = guidance

    def loss(self, objective, nets, x, y, generator):
        device = x.device
        index = torch.randint(self.steps, (x.shape[0],), generator=generator).to(device)
        scale = self.guidance.draw(x.shape[0], generator, device)
        x = x.float()
        z_t, target, (alpha, sigma) = self.targets(x, y, index, scale, torch.randn_like(x))
        student = student_denoiser(nets["model"], self.schedule, self.parameterization, x.shape[1],
                                   self.guidance.conditioned)
        x_hat = student(z_t, self.times(index)[0], y, scale)
        mse = mean_flat((target - x_hat) ** 2)
        loss = (loss_weight(self.weighting, alpha, sigma) * mse).mean()
        return loss, {"loss": loss.detach(), "x_mse": mse.mean().detach()}

    def times(self, index: torch.Tensor):
        return stage_times(index, self.steps)

    @torch.no_grad()
    def targets(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, scale, noise: torch.Tensor):
        """(z_t, x_tilde, (alpha_t, sigma_t)): the noisy input and what the student must predict there."""
        t, t_mid, t_end = self.times(index)
        (a_t, s_t), (a_mid, s_mid), (a_end, s_end) = (self.schedule.alpha_sigma(u) for u in (t, t_mid, t_end))
        shape = (-1,) + (1,) * (x.ndim - 1)
        z_t = a_t.float().view(shape) * x + s_t.float().view(shape) * noise
        z_mid = ddim_step(z_t, self.teacher(z_t, t, y, scale), a_t, s_t, a_mid, s_mid)
        z_end = ddim_step(z_mid, self.teacher(z_mid, t_mid, y, scale), a_mid, s_mid, a_end, s_end)
        return z_t, distillation_target(z_t, z_end, a_t, s_t, a_end, s_end), (a_t, s_t)


def schedule_of(info: dict) -> ContinuousSchedule:
    """The continuous schedule a student checkpoint was distilled on."""
    return ContinuousSchedule(get_beta_schedule(info["schedule"], int(info["num_steps"])))


def sampling_scale(info: dict, requested: float) -> float:
    """The guidance scale a student samples at; a clear error when it cannot honour `requested`."""
    if info["cfg_range"]:
        low, high = info["cfg_range"]
        if not low <= requested <= high:
            raise ValueError(
                f"this student was distilled for cfg scales in [{low}, {high}]; cfg_scale={requested} is outside"
            )
        return float(requested)
    if abs(float(requested) - float(info["cfg_scale"])) > 1e-9:
        raise ValueError(
            f"this student has cfg scale {info['cfg_scale']} folded in and cannot sample at cfg_scale={requested}: "
            f"set sample.cfg_scale={info['cfg_scale']} (or inference.cfg_scale), or distil with distill.cfg_range"
        )
    return float(info["cfg_scale"])


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents: the student's own N-step DDIM, one forward per step."""
    info = checkpoint["distill"]
    steps = int(info["steps"])
    if settings.steps not in (0, steps):
        raise ValueError(
            f"the checkpoint is a {steps}-step distilled student; steps={settings.steps} cannot be honoured "
            f"(use steps={steps} or 0, or the student of another stage)"
        )
    if settings.eta:
        raise ValueError(f"the distilled sampler is deterministic; eta={settings.eta} cannot be honoured (set eta=0)")
    scale = sampling_scale(info, float(settings.cfg_scale))
    schedule = schedule_of(info)
    denoise = student_denoiser(model, schedule, info["parameterization"], model_args["in_channels"],
                               bool(info["cfg_range"]))

    def sample(noise: torch.Tensor, y: torch.Tensor, generators, progress: bool) -> torch.Tensor:
        return ddim_sample(lambda z, t: denoise(z, t, y, scale), noise, schedule, steps, progress=progress)

    return sample


def describe_sampler(checkpoint: dict, settings: DictConfig, cfg: DictConfig) -> str:
    steps = checkpoint["distill"]["steps"]
    return f"distilled x {steps} steps (one forward each), cfg scale {settings.cfg_scale} folded into the student"


def check_config(cfg: DictConfig) -> None:
    """distill.*, checked when -p distill runs or a student is sampled."""
    check_choices(cfg, {"distill.precision": PRECISIONS, "distill.parameterization": ("v", "x", "eps"),
                        "distill.loss_weight": ("snr_trunc", "snr_plus_one")})
    check_values(cfg, ("distill.batch_size", "distill.iters_per_stage", "distill.grad_accum", "distill.ckpt_every",
                       "distill.log_every", "distill.eval_samples"), AT_LEAST_ONE)
    check_values(cfg, ("distill.keep_last", "distill.max_grad_norm", "distill.warmup_steps", "distill.weight_decay",
                       "distill.ckpt_every_minutes", "distill.peak_tflops"), NON_NEGATIVE)
    check_values(cfg, ("distill.lr",), LEARNING_RATE)
    dc = cfg.distill
    for key in ("start_steps", "end_steps"):
        value = dc[key]
        if value < 1 or value & (value - 1):
            raise ConfigError(f"distill.{key}={value} must be a power of two (1, 2, 4, ...)")
    if dc.end_steps >= dc.start_steps:
        raise ConfigError(f"distill.end_steps={dc.end_steps} must be smaller than distill.start_steps={dc.start_steps} "
                          "(each stage halves the number of sampling steps)")
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
            raise ConfigError(f"distill.cfg_scale={dc.cfg_scale} (the scale of the stage grids) must lie in "
                              f"distill.cfg_range={low_high}")
    if not 0 <= dc.ema_decay < 1:
        raise ConfigError(f"distill.ema_decay={dc.ema_decay} must be in [0, 1) (0: no EMA)")


def stage_dir(experiment_dir: str | Path, steps: int) -> Path:
    """The folder of the distillation stage whose student samples in `steps` steps."""
    return Path(experiment_dir) / "distill" / f"{steps:04d}_steps"


def students(experiment_dir: str | Path) -> dict[int, tuple[Path, bool]]:
    """steps -> (latest checkpoint of that stage, whether the stage finished) for every stage with a checkpoint."""
    found = {}
    root = Path(experiment_dir) / "distill"
    for folder in sorted(root.glob("*_steps")) if root.is_dir() else []:
        match = re.match(r"^(\d+)_steps$", folder.name)
        latest = latest_checkpoint(folder) if match else None
        if latest is not None:
            found[int(match.group(1))] = (latest, (folder / STAGE_FINISHED).is_file())
    return found


def locate(experiment_dir: str | Path, steps: int) -> Path:
    """The student of the `steps`-step stage, or (steps 0) of the last finished stage."""
    found = students(experiment_dir)
    if steps:
        if steps not in found:
            have = ", ".join(str(n) for n in sorted(found, reverse=True)) or "none"
            raise FileNotFoundError(
                f"no {steps}-step student in {Path(experiment_dir) / 'distill'} (students with a checkpoint: {have}); "
                "run -p distill, or pass ckpt=PATH"
            )
        return found[steps][0]
    finished = [n for n, (_, done) in found.items() if done]
    if not finished:
        raise FileNotFoundError(
            f"no finished distillation stage in {Path(experiment_dir) / 'distill'}: run -p distill first, "
            "choose a stage with steps=N, or pass ckpt=PATH"
        )
    return found[min(finished)][0]


def output_root(experiment_dir: str | Path, ckpt: Path) -> Path:
    """A student of this run writes into its stage folder, so it never overwrites the teacher's files."""
    ckpt, distill = Path(ckpt).resolve(), (Path(experiment_dir) / "distill").resolve()
    if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.parent == distill:
        return Path(experiment_dir) / "distill" / ckpt.parent.parent.name
    return Path(experiment_dir)


SPEC = MethodSpec(
    name="distill",
    title="a distilled student (from -p distill)",
    samplers=(SAMPLER,),
    generation_sampler=generation_sampler,
    describe_sampler=describe_sampler,
    cfg_interval=False,
    check_config=check_config,
    locate=locate,
    output_root=output_root,
)
