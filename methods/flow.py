"""Flow matching on interpolants (SiT, Ma et al. 2024; REPA, Yu et al. 2025) as a training method:
`model.method=flow`.

The DiT (SiT-XL/2 is exactly DiT-XL/2) learns, from x_t = alpha_t x + sigma_t eps (flow.path), the
velocity u_t = alpha' x + sigma' eps, or the noise, or the score (flow.prediction; SiT's loss weights for
the last two), with times uniform or logit-normal and optionally shifted, and LightningDiT's
velocity-direction term (flow.cosine_loss). Only the first C output channels are read: the learned-sigma
channels of a DiT (and of SiT's release) are ignored.

Time: inside the tool t = 0 is the data and t = 1 the noise (diffusion/flow_paths.py). A checkpoint
records the convention its network was trained in: "repa" (the network sees t, its velocity points to the
noise: REPA, MeanFlow, SD3) or "sit" (it sees 1 - t and predicts the negative velocity: SiT and
LightningDiT). The conversion happens here, at the network's boundary, and nowhere else.

Sampling: `sample.sampler=ode` (flow.ode_solver euler | heun on sample.steps intervals, or a per-sample
adaptive Dormand-Prince) and `sde` (SiT's SDE family, flow.sde_solver / diffusion_form / last_step),
classifier-free guidance on the velocity (all channels by default; 3 as SiT with cfg_all_channels=false),
with sample.cfg_interval and sample.time_shift (diffusion/flow_samplers.py).
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from diffusion.flow_paths import (DIFFUSION_FORMS, LOSS_WEIGHTS, PATHS, PREDICTIONS, Interpolant, sample_training_times,
                                  training_interval)
from diffusion.flow_samplers import (LAST_STEPS, ODE_SOLVERS, SDE_SOLVERS, SDESettings, network_evaluations,
                                     ode_adaptive, ode_fixed, ode_interval, sde_grid, sde_interval, sde_sample,
                                     time_grid)
from diffusion.guidance import guided_model_fn
from diffusion.likelihood import mean_flat
from diffusion.noise import per_row_noise
from methods.base import SingleNetwork
from methods.sampling import interval_of, refuse_eta
from methods.spec import MethodSpec, Published
from methods.timestep_buckets import TimestepBuckets
from models.flops import dit_forward_flops
from models.pretrained import extract_state_dict
from runtime.config import NON_NEGATIVE, POSITIVE, ConfigError, check_choices, check_values

SAMPLERS = ("ode", "sde")
CONVENTIONS = ("repa", "sit")
REPA_PATHS = {"linear": "linear", "cosine": "gvp"}  # REPA's --path-type -> ours
SIT_PATHS = {"Linear": "linear", "GVP": "gvp", "VP": "vp"}  # SiT's --path-type -> ours
BUCKET_SCALE = 1000  # loss buckets in thousandths of t


@dataclass(frozen=True)
class FlowProcess:
    """What a flow checkpoint records: sampling must read its network the same way."""

    path: str = "linear"
    prediction: str = "velocity"
    convention: str = "repa"
    loss_weight: str = "none"
    train_eps: float = 1e-5
    sample_eps: float = 1e-3

    def network_time(self, t: torch.Tensor) -> torch.Tensor:
        """The time the network sees for our t (float32)."""
        return (t if self.convention == "repa" else 1.0 - t).float()

    @property
    def sign(self) -> float:
        """Network velocity = sign x our velocity (SiT's velocity points to the data); noise and score are
        the same in both times."""
        return -1.0 if self.convention == "sit" and self.prediction == "velocity" else 1.0


def process_of(cfg: DictConfig) -> FlowProcess:
    fc = cfg.flow
    return FlowProcess(fc.path, fc.prediction, fc.convention or "repa", fc.loss_weight, float(fc.train_eps),
                       float(fc.sample_eps))


class FlowMethod(SingleNetwork):
    """L = w(t) ||f_theta(x_t, t) - target||^2 (+ cosine_loss (1 - cos(v_theta, u_t)) per pixel), t as configured.

    Also keeps the loss per range of t (`buckets` equal ranges of [0, 1], 1 = noise), as the diffusion method
    does per timestep range.
    """

    def __init__(self, model: nn.Module, process: FlowProcess, time_sampling: str, time_mean: float, time_std: float,
                 time_shift: float, cosine_loss: float, buckets: int = 0):
        super().__init__(model)
        self.process = process
        self.path = Interpolant(process.path)
        self.interval = training_interval(process.path, process.prediction, process.train_eps)
        self.times = dict(sampling=time_sampling, mean=time_mean, std=time_std, shift=time_shift)
        self.cosine_loss = cosine_loss
        self.buckets = TimestepBuckets(BUCKET_SCALE, buckets) if buckets else None

    def loss(self, objective, nets, x, y, generator):
        x = x.float()
        t = sample_training_times(x.shape[0], generator, self.interval, **self.times).to(x.device)
        noise = torch.randn_like(x)
        x_t, u_t = self.path.interpolate(x, noise, t)
        out = nets["model"](x_t, self.process.network_time(t), y)[:, : x.shape[1]].float()
        per_sample = prediction_error(self.process, self.path, out, u_t, noise, t, self.process.loss_weight)
        loss = per_sample.mean()
        metrics = {"mse": per_sample.detach().mean()}
        if self.cosine_loss:
            direction = mean_flat(1.0 - F.cosine_similarity(self.process.sign * out, u_t, dim=1))
            loss = loss + self.cosine_loss * direction.mean()
            metrics["cos_loss"] = direction.detach().mean()
        if self.buckets is not None:
            self.buckets.add((BUCKET_SCALE * t).long().clamp(max=BUCKET_SCALE - 1), per_sample.detach())
        return loss, {"loss": loss.detach(), **metrics}

    def time_key(self, t_network: torch.Tensor) -> torch.Tensor:
        """The network's time as a bucket key in thousandths of our t (1000 = noise)."""
        t = t_network if self.process.convention == "repa" else 1.0 - t_network
        return (BUCKET_SCALE * t.double()).long().clamp(0, BUCKET_SCALE - 1)

    def log_metrics(self) -> dict:
        """Mean loss per range of t since the last call, over all ranks (then reset)."""
        return self.buckets.report("mse") if self.buckets is not None else {}


def prediction_error(process: FlowProcess, path: Interpolant, out: torch.Tensor, u_t: torch.Tensor,
                     noise: torch.Tensor, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-sample weighted squared error of the network output (SiT's `training_losses`): velocity
    ||v - u_t||^2; noise w ||eps_hat - eps||^2; score w ||s_hat sigma_t + eps||^2."""
    if process.prediction == "velocity":
        return mean_flat((out - process.sign * u_t) ** 2)
    weight = path.loss_weight(t, weighting).float()
    if process.prediction == "noise":
        return weight * mean_flat((out - noise) ** 2)
    sigma = path.alpha_sigma(t)[1].float().view(-1, *([1] * (out.dim() - 1)))
    return weight * mean_flat((out * sigma + noise) ** 2)


def model_args(cfg: DictConfig, margs: dict) -> dict:
    """The DiT as configured: model.learn_sigma keeps SiT's layout (the variance channels are ignored)."""
    return margs


def flops_per_image(cfg: DictConfig, margs: dict) -> float:
    return 3 * dit_forward_flops(margs)


def metadata(cfg: DictConfig) -> dict:
    return {"flow": asdict(process_of(cfg))}


def build(cfg: DictConfig, model: nn.Module, device: torch.device) -> FlowMethod:
    """The training method for `train` with model.method=flow."""
    fc = cfg.flow
    return FlowMethod(model, process_of(cfg), fc.time_sampling, float(fc.time_mean), float(fc.time_std),
                      float(fc.time_shift), float(fc.cosine_loss), buckets=cfg.train.loss_buckets)


def check_config(cfg: DictConfig) -> None:
    """flow.*: the process, the training times and the samplers' settings."""
    fc = cfg.flow
    check_choices(cfg, {"flow.path": PATHS, "flow.prediction": PREDICTIONS, "flow.loss_weight": LOSS_WEIGHTS,
                        "flow.convention": (None, *CONVENTIONS), "flow.time_sampling": ("uniform", "logit_normal"),
                        "flow.ode_solver": ODE_SOLVERS, "flow.sde_solver": SDE_SOLVERS,
                        "flow.diffusion_form": DIFFUSION_FORMS, "flow.last_step": LAST_STEPS})
    check_values(cfg, ("flow.time_std", "flow.time_shift", "flow.ode_atol", "flow.ode_rtol"), POSITIVE)
    check_values(cfg, ("flow.cosine_loss", "flow.diffusion_norm"), NON_NEGATIVE)
    for key in ("train_eps", "sample_eps"):
        if not 0 <= fc[key] < 0.5:
            raise ConfigError(f"invalid value flow.{key}={fc[key]}: it must be in [0, 0.5)")
    if not 0 < fc.last_step_size < 1:
        raise ConfigError(f"invalid value flow.last_step_size={fc.last_step_size}: it must be in (0, 1)")
    if fc.cosine_loss and fc.prediction != "velocity":
        raise ConfigError(f"flow.cosine_loss is a term on the velocity; flow.prediction={fc.prediction} does not "
                          "predict one: set flow.cosine_loss=0")
    if fc.loss_weight != "none" and fc.prediction == "velocity":
        raise ConfigError(f"flow.loss_weight={fc.loss_weight} weights SiT's noise and score losses; with "
                          "flow.prediction=velocity set flow.loss_weight=none")
    if fc.diffusion_form == "sbdm" and fc.sample_eps == 0 and fc.path != "vp":
        raise ConfigError("flow.diffusion_form=sbdm is infinite at pure noise: it starts flow.sample_eps below "
                          "t = 1, so flow.sample_eps must be > 0")


def check_init(meta: dict, cfg: DictConfig) -> None:
    """A flow run starts from a flow model of its own time convention only (the network's time and sign)."""
    if meta.get("method") != "flow":
        return
    theirs, ours = meta["flow"]["convention"], process_of(cfg).convention
    if theirs != ours:
        raise ConfigError(f"model.init_from={cfg.model.init_from} was trained in the {theirs} time convention and "
                          f"this run trains in {ours}: set flow.convention={theirs} to fine-tune it")


def _velocity_field(model, process: FlowProcess, path: Interpolant, y, settings: DictConfig, num_classes: int,
                    channels: int):
    """velocity(x, t, rows=None) in our time, from the (guided) network in its own time."""
    in_our_time = lambda x, t, labels: model(x, process.network_time(t), labels)
    interval = interval_of(settings)

    def guide(labels):
        return guided_model_fn(in_our_time, labels, float(settings.cfg_scale), num_classes,
                               all_channels=bool(settings.cfg_all_channels), interval=interval, time_of=lambda t: t)

    guided = guide(y)

    def velocity(x, t, rows=None):
        fn = guided if rows is None else guide(y[rows])
        out = process.sign * fn(x, t)[:, :channels].float()
        return path.velocity(out, x.float(), t.to(x.device), process.prediction)

    return velocity


def check_settings(fc: DictConfig, settings: DictConfig) -> None:
    """Settings of the flow samplers, named before any sampling (the sampler name: methods/sampling.py)."""
    refuse_eta(settings, "the flow samplers")
    adaptive = settings.sampler == "ode" and fc.ode_solver == "adaptive"
    if adaptive and float(settings.time_shift) != 1.0:
        raise ValueError(f"time_shift={settings.time_shift} shifts a fixed time grid; flow.ode_solver=adaptive "
                         "chooses its own steps: set sample.time_shift=1 or flow.ode_solver=euler/heun")
    least = 2 if settings.sampler == "sde" and fc.last_step != "none" else 1
    if not adaptive and settings.steps < least:
        raise ValueError(f"{settings.sampler} needs steps >= {least}, got steps={settings.steps}")


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents: `noise` is x_1 ~ N(0, I); the SDE's draws come from image
    i's own generator, so an image does not depend on its batch (nor, with the adaptive ODE, on its neighbours)."""
    fc = cfg.flow
    check_settings(fc, settings)
    process = FlowProcess(**checkpoint["flow"])
    path = Interpolant(process.path)
    steps, shift = int(settings.steps), float(settings.time_shift)
    num_classes, channels = model_args["num_classes"], model_args["in_channels"]

    def sample(noise: torch.Tensor, y: torch.Tensor, generators, progress: bool) -> torch.Tensor:
        velocity = _velocity_field(model, process, path, y, settings, num_classes, channels)
        if settings.sampler == "ode":
            start, end = ode_interval(process.path, process.prediction, process.sample_eps)
            if fc.ode_solver == "adaptive":
                return ode_adaptive(velocity, noise, start, end, fc.ode_rtol, fc.ode_atol, progress)
            return ode_fixed(velocity, noise, time_grid(start, end, steps, shift), fc.ode_solver, progress)
        sde = SDESettings(fc.sde_solver, fc.diffusion_form, float(fc.diffusion_norm), fc.last_step)
        start, end = sde_interval(process.path, process.prediction, fc.diffusion_form, process.sample_eps,
                                  fc.last_step, float(fc.last_step_size))
        grid = sde_grid(start, end, steps, fc.last_step, shift)
        draw = lambda shape: per_row_noise(shape, generators, noise.device)
        return sde_sample(velocity, path, noise, grid, draw, sde, progress)

    return sample


def describe_sampler(checkpoint: dict, settings: DictConfig, cfg: DictConfig) -> str:
    info, fc = checkpoint["flow"], cfg.flow
    solver = fc.ode_solver if settings.sampler == "ode" else f"{fc.sde_solver}, D = {fc.diffusion_form}"
    if settings.sampler == "ode" and fc.ode_solver == "adaptive":
        grid = f"adaptive (rtol {fc.ode_rtol}, atol {fc.ode_atol})"
    else:
        last = "" if settings.sampler == "ode" else f", last step {fc.last_step}"
        evaluations = network_evaluations(settings.sampler, solver.split(",")[0], int(settings.steps), fc.last_step)
        grid = f"{solver} x {settings.steps} steps{last}: {evaluations} network evaluations"
    channels = "all channels" if settings.cfg_all_channels else "channels 0-2"
    shift = f", time shift {settings.time_shift}" if float(settings.time_shift) != 1.0 else ""
    return (f"{settings.sampler} {grid} (flow: {info['path']} path, {info['prediction']} prediction, "
            f"{info['convention']} time), cfg scale {settings.cfg_scale} on {channels}{shift}")


def _args_of(obj) -> dict:
    """The pickled arguments of a reference train.py checkpoint as a dict ({} when there are none)."""
    args = obj.get("args") if isinstance(obj, Mapping) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    if isinstance(args, Mapping):
        return dict(args)
    return {}


def _transport_of(obj):
    """The `transport` section of a LightningDiT train.py checkpoint's "config" (None for anything else)."""
    config = obj.get("config") if isinstance(obj, Mapping) else None
    transport = config.get("transport") if isinstance(config, Mapping) else None
    return dict(transport) if isinstance(transport, Mapping) and "path_type" in transport else None


def _flow_meta(path: str, prediction: str, convention: str, cfg: DictConfig, **extra) -> dict:
    process = FlowProcess(path, prediction, convention, extra.get("loss_weight") or "none",
                          float(extra.get("train_eps") if extra.get("train_eps") is not None else cfg.flow.train_eps),
                          float(extra.get("sample_eps") if extra.get("sample_eps") is not None else cfg.flow.sample_eps))
    return {"method": "flow", "flow": asdict(process)}


def recognise(obj, cfg: DictConfig):
    """SiT's and REPA's train.py checkpoints (their args name the path and the prediction) and REPA's released
    ones (projector weights beside the SiT: dropped, they only serve training)."""
    args = _args_of(obj)
    if args.get("path_type") in SIT_PATHS:
        loss_weight = args.get("loss_weight") or "none"
        meta = _flow_meta(SIT_PATHS[args["path_type"]], args.get("prediction", "velocity"), "sit", cfg,
                          loss_weight=loss_weight, train_eps=args.get("train_eps"), sample_eps=args.get("sample_eps"))
        return Published(meta, source=f"a checkpoint of SiT's train.py ({args['path_type']}, "
                                      f"{args.get('prediction', 'velocity')}; data at t = 1)")
    transport = _transport_of(obj)
    if transport is not None:  # LightningDiT's train.py: SiT's transport settings in its config
        path = SIT_PATHS.get(transport.get("path_type", "Linear"), cfg.flow.path)
        meta = _flow_meta(path, transport.get("prediction", "velocity"), "sit", cfg,
                          loss_weight=transport.get("loss_weight"))
        return Published(meta, source=f"a checkpoint of LightningDiT's train.py ({path}; data at t = 1)")
    repa_args = "enc_type" in args or "proj_coeff" in args
    weights = extract_state_dict(obj) if isinstance(obj, Mapping) else {}
    has_projectors = any(k.startswith("projectors.") for k in weights)
    if repa_args or has_projectors:
        path = REPA_PATHS.get(args.get("path_type"), cfg.flow.path)
        return Published(_flow_meta(path, "velocity", "repa", cfg), drop=("projectors.",),
                         source=f"a REPA checkpoint ({path} path, velocity; data at t = 0; projectors dropped)")
    return None


def read_bare(obj, cfg: DictConfig) -> Published:
    """A state dict that cannot say how it was trained (SiT's release SiT-XL-2-256x256.pt is one): the config says."""
    fc = cfg.flow
    if fc.convention is None:
        raise ValueError("this checkpoint cannot say how it was trained: to sample it as a flow model set "
                         "flow.convention=sit (SiT's release SiT-XL-2-256x256.pt: data at t = 1) or flow.convention=repa "
                         "(data at t = 0), and flow.path / flow.prediction unless linear / velocity")
    return Published(_flow_meta(fc.path, fc.prediction, fc.convention, cfg, loss_weight=fc.loss_weight),
                     source=f"a flow state dict ({fc.path}, {fc.prediction}, {fc.convention} time, from flow.*)")


@torch.no_grad()
def validation_loss(cfg: DictConfig, method: FlowMethod, model: nn.Module, dataset, num_items: int, device) -> dict:
    """The unweighted error of the prediction on the held-out items at train.eval_timesteps stratified times,
    with fixed noise: comparable across runs whatever their time sampling."""
    from phases.validation import holdout_split, stacked
    from runtime import distributed as dist
    from runtime.data_stream import mix_seed

    _, items = holdout_split(num_items, cfg.data.holdout)
    count = cfg.train.eval_timesteps
    lo, hi = method.interval
    per_item = lo + (hi - lo) * (torch.arange(count, dtype=torch.float64) + 0.5) / count
    keys = [(i, mix_seed(cfg.seed, i, 7)) for i in items for _ in range(count)]
    times = per_item.repeat(len(items))
    generator = torch.Generator().manual_seed(mix_seed(cfg.seed, 11))
    buckets = TimestepBuckets(BUCKET_SCALE, cfg.train.loss_buckets) if cfg.train.loss_buckets else None
    total, seen = 0.0, 0
    for start in range(0, len(keys), 256):
        x, y = stacked([dataset[k] for k in keys[start:start + 256]])
        x, y = x.to(device).float(), y.to(device)
        noise = torch.randn(x.shape, generator=generator).to(device)
        t = times[start:start + len(x)].to(device)
        x_t, u_t = method.path.interpolate(x, noise, t)
        out = model(x_t, method.process.network_time(t), y)[:, : x.shape[1]].float()
        error = prediction_error(method.process, method.path, out, u_t, noise, t, "none")
        total, seen = total + float(error.double().sum()), seen + len(x)
        if buckets is not None:
            buckets.add((BUCKET_SCALE * t).long().clamp(max=BUCKET_SCALE - 1), error)
    per_bucket = buckets.report("val_mse") if buckets is not None else {}
    dist.barrier()
    return {"val_mse": total / seen, "val_loss": total / seen, **per_bucket}


SPEC = MethodSpec(
    name="flow",
    title="a flow-matching model (SiT, REPA)",
    samplers=SAMPLERS,
    generation_sampler=generation_sampler,
    describe_sampler=describe_sampler,
    time_shift=True,
    guide_all_channels=True,
    alignable=True,
    model_args=model_args,
    build=build,
    metadata=metadata,
    flops_per_image=flops_per_image,
    validation_loss=validation_loss,
    check_config=check_config,
    recognise=recognise,
    read_bare=read_bare,
    check_init=check_init,
)
