"""MeanFlow (Geng, Deng, Bai, Kolter, He 2025): one- and few-step generation trained from scratch,
`model.method=meanflow`.

Time: t = 0 is the data and t = 1 the noise; z_t = (1 - t) x + t e and v = e - x (the linear path,
REPA's convention: the network sees t). The network learns the average velocity over [r, t],

    u(z_t, r, t) = 1 / (t - r) * integral_r^t v(z_s, s) ds,

conditioned on t (the backbone's timestep embedder) and h = t - r (models/conditioning.py's
IntervalEmbedder, zero-initialised). Differentiating (t - r) u = integral along the flow gives the
MeanFlow identity u = v - (t - r) du/dt, with du/dt = v . d_z u + d_t u the total derivative along the
flow: ONE forward-mode Jacobian-vector product of u_theta at (z_t, t, h) with tangents (v, 1, 1) gives u and
du/dt together. The regression target u_tgt = v - h du/dt is detached; the loss per sample is the squared
error summed over the latent, divided by the detached adaptive weight (error + norm_eps)^norm_p.

Guidance is folded into training (the paper's section 4.2): for a labelled sample the field is
v_g = w v + (1 - w) u_theta(z_t, t, t | null), the unconditional model's instantaneous velocity (h = 0,
detached), used as the JVP's tangent and in the target; a label dropped (model.class_dropout_prob) keeps v.
Sampling then needs one network evaluation per step: z_r = z_t - (t - r) u(z_t, r, t) over `sample.steps`
equal intervals from t = 1 to 0 (1 step: x = e - u(e, 0, 1)).

Under torchrun the JVP cannot run through DistributedDataParallel (calling the inner module would skip
its gradient all-reduce silently), so the method says `functional`: the loop passes the bare module and
averages the gradients over the ranks itself, exactly as DDP would (runtime/parallel.py). Fused attention
kernels have no forward-mode derivative: the JVP pass uses the math attention path, only that pass.
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from methods.base import SingleNetwork
from methods.sampling import refuse_eta
from methods.spec import MethodSpec
from models.flops import dit_forward_flops
from runtime.config import NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, ConfigError, check_values

SAMPLERS = ("meanflow",)


@dataclass(frozen=True)
class TimeSampling:
    """(t, r) for training: each logit-normal, ordered so t >= r; a share `ratio` keeps r != t (the rest is plain
    flow matching, r = t)."""

    t_mean: float = -0.4
    t_std: float = 1.0
    r_mean: float = -0.4
    r_std: float = 1.0
    ratio: float = 0.25

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.sigmoid(self.t_mean + self.t_std * torch.randn(n, generator=generator))
        b = torch.sigmoid(self.r_mean + self.r_std * torch.randn(n, generator=generator))
        t, r = torch.maximum(a, b), torch.minimum(a, b)
        kept = torch.rand(n, generator=generator) < self.ratio
        return t, torch.where(kept, r, t)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t, v): the linear path z_t = (1 - t) x + t e and its velocity v = e - x."""
    tt = t.view(-1, *([1] * (x.dim() - 1)))
    return (1.0 - tt) * x + tt * noise, noise - x


def average_velocity_and_target(u_fn, z: torch.Tensor, t: torch.Tensor, h: torch.Tensor,
                                velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(u_theta(z, t, h), the detached target v - h du/dt) from one JVP along the flow (tangents v, 1, 1:
    dz/dt = v, dt/dt = 1, and h = t - r grows with t while r stays)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    ones = torch.ones_like(t)
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():  # the attention path with a forward derivative
        warnings.simplefilter("ignore", FutureWarning)  # torch.func's own use of torch.jit.script
        u, dudt = torch.func.jvp(u_fn, (z, t, h), (velocity, ones, ones))
    target = velocity - h.view(-1, *([1] * (z.dim() - 1))) * dudt
    return u, target.detach()


def adaptive_loss(u: torch.Tensor, target: torch.Tensor, p: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss ||u - target||^2 / sg(||u - target||^2 + eps)^p, the squared errors): p = 0 is the plain
    squared error, p = 1 about a log-loss (MeanFlow's adaptive weighting)."""
    error = (u.float() - target.float()).square().flatten(1).sum(dim=1)
    weight = (error.detach() + eps).pow(-p)
    return weight * error, error.detach()


class MeanFlowMethod(SingleNetwork):
    """The MeanFlow loss of a micro-batch (see the module docstring)."""

    functional = True  # torch.func.jvp on the bare network: the loop averages its gradients (runtime/parallel.py)

    def __init__(self, model: nn.Module, times: TimeSampling, cfg_scale: float, label_dropout: float,
                 norm_p: float, norm_eps: float):
        super().__init__(model)
        self.times, self.cfg_scale, self.label_dropout = times, cfg_scale, label_dropout
        self.norm_p, self.norm_eps = norm_p, norm_eps
        self.num_classes = model.y_embedder.num_classes
        model.y_embedder.dropout_prob = 0.0  # labels are dropped here: the target must know which were

    def loss(self, objective, nets, x, y, generator):
        net, x = nets["model"], x.float()
        n, channels = x.shape[0], x.shape[1]
        t, r = (v.to(x.device) for v in self.times.draw(n, generator))
        dropped = (torch.rand(n, generator=generator) < self.label_dropout).to(x.device)
        labels = torch.where(dropped, torch.full_like(y, self.num_classes), y)
        z, v = interpolate(x, torch.randn(x.shape, generator=generator).to(x.device), t)
        if self.cfg_scale != 1.0:
            with torch.no_grad():
                null = torch.full_like(y, self.num_classes)
                unconditional = net(z, t, null, h=torch.zeros_like(t))[:, :channels].float()
            guided = self.cfg_scale * v + (1.0 - self.cfg_scale) * unconditional
            v = torch.where(dropped.view(-1, 1, 1, 1), v, guided)
        u_fn = lambda z_, t_, h_: net(z_, t_, labels, h=h_)[:, :channels]  # noqa: E731
        u, target = average_velocity_and_target(u_fn, z, t, t - r, v)
        per_sample, error = adaptive_loss(u, target, self.norm_p, self.norm_eps)
        loss = per_sample.mean()
        mse = error.mean() / x[0].numel()
        return loss, {"loss": loss.detach(), "mse": mse, "mse_flow": _masked_mean(error, r == t) / x[0].numel()}


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean over the masked entries (0 when there are none)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def settings_of(cfg: DictConfig) -> dict:
    mc = cfg.meanflow
    times = TimeSampling(float(mc.t_mean), float(mc.t_std), float(mc.r_mean), float(mc.r_std), float(mc.ratio))
    return {"times": asdict(times), "cfg_scale": float(mc.cfg_scale), "norm_p": float(mc.norm_p),
            "norm_eps": float(mc.norm_eps)}


def model_args(cfg: DictConfig, margs: dict) -> dict:
    """The backbone with the second time input, h = t - r."""
    return {**margs, "interval_embedding": True}


def flops_per_image(cfg: DictConfig, margs: dict) -> float:
    """The JVP (a forward and its tangent, about two forwards), the backward through u (two), and the
    unconditional forward of the folded guidance."""
    return (4 + (1 if float(cfg.meanflow.cfg_scale) != 1.0 else 0)) * dit_forward_flops(margs)


def metadata(cfg: DictConfig) -> dict:
    return {"meanflow": {**settings_of(cfg), "path": "linear", "convention": "repa"}}


def build(cfg: DictConfig, model: nn.Module, device: torch.device) -> MeanFlowMethod:
    s = settings_of(cfg)
    return MeanFlowMethod(model, TimeSampling(**s["times"]), s["cfg_scale"], float(cfg.model.class_dropout_prob),
                          s["norm_p"], s["norm_eps"])


def check_config(cfg: DictConfig) -> None:
    """meanflow.* and the training settings the JVP cannot use, before any work."""
    check_values(cfg, ("meanflow.t_std", "meanflow.r_std", "meanflow.norm_p", "meanflow.cfg_scale"), NON_NEGATIVE)
    check_values(cfg, ("meanflow.norm_eps",), POSITIVE)
    check_values(cfg, ("meanflow.ratio",), UNIT_INTERVAL)
    mc = cfg.meanflow
    if mc.ratio > 0 and mc.t_std == 0 and mc.r_std == 0 and mc.t_mean == mc.r_mean:
        raise ConfigError(f"meanflow.ratio={mc.ratio} asks for samples with r != t, but t and r are both fixed at "
                          f"sigmoid({mc.t_mean}) (t_std = r_std = 0): give them a spread or different means")
    if float(mc.cfg_scale) != 1.0 and float(cfg.model.class_dropout_prob) <= 0:
        raise ConfigError(f"meanflow.cfg_scale={mc.cfg_scale} folds guidance into training, which needs the null "
                          "class of label dropout: set model.class_dropout_prob > 0 (0.1 as the paper)")
    if "train" in cfg and cfg.train.compile:
        raise ConfigError("train.compile=true: torch.compile does not trace MeanFlow's forward-mode JVP "
                          "(torch.func.jvp); set train.compile=false")
    if cfg.model.grad_checkpointing:
        raise ConfigError("model.grad_checkpointing=true: activation checkpointing cannot recompute MeanFlow's "
                          "forward-mode JVP; set it to false (and lower the per-GPU batch to save memory)")


def check_init(meta: dict, cfg: DictConfig) -> None:
    """A MeanFlow run may start from a flow model whose network sees our time and predicts the velocity of the
    linear path (u at h = 0), from a MeanFlow model, or from any DiT's weights."""
    if meta.get("method") != "flow":
        return
    flow = meta["flow"]
    if (flow["convention"], flow["path"], flow["prediction"]) != ("repa", "linear", "velocity"):
        raise ConfigError(f"model.init_from={cfg.model.init_from} is a flow model with a {flow['path']} path, "
                          f"{flow['prediction']} prediction in {flow['convention']} time; MeanFlow continues only "
                          "from a linear-path velocity model in repa time (the network sees t, data at 0)")


def check_settings(settings: DictConfig) -> None:
    refuse_eta(settings, "the meanflow sampler")
    if int(settings.steps) < 1:
        raise ValueError(f"the meanflow sampler needs steps >= 1 (1: one network evaluation), got {settings.steps}")


def generation_sampler(cfg: DictConfig, model: nn.Module, model_args: dict, checkpoint: dict, settings: DictConfig):
    """sample(noise, y, generators, progress) -> latents: `steps` jumps z_r = z_t - (t - r) u(z_t, r, t) over equal
    intervals of [0, 1], one network evaluation each (deterministic: the noise is the only draw)."""
    check_settings(settings)
    steps, channels = int(settings.steps), model_args["in_channels"]

    def sample(noise: torch.Tensor, y: torch.Tensor, generators, progress: bool) -> torch.Tensor:
        grid = torch.linspace(1.0, 0.0, steps + 1)
        z = noise.float()
        for k in tqdm(range(steps), desc=f"meanflow{steps}", disable=not progress):
            t = grid[k].expand(z.shape[0]).to(z.device)
            h = (grid[k] - grid[k + 1]).expand(z.shape[0]).to(z.device)
            z = z - h.view(-1, 1, 1, 1) * model(z, t, y, h=h)[:, :channels].float()
        return z

    return sample


def describe_sampler(checkpoint: dict, settings: DictConfig, cfg: DictConfig) -> str:
    scale = checkpoint["meanflow"]["cfg_scale"]
    guidance = f"guidance {scale} folded in by training" if scale != 1.0 else "no guidance"
    return f"meanflow {settings.steps} step(s): {settings.steps} network evaluation(s), {guidance}"


SPEC = MethodSpec(
    name="meanflow",
    title="a MeanFlow model (average velocity, one- or few-step)",
    samplers=SAMPLERS,
    generation_sampler=generation_sampler,
    describe_sampler=describe_sampler,
    guidance=False,
    cfg_interval=False,
    model_args=model_args,
    build=build,
    metadata=metadata,
    flops_per_image=flops_per_image,
    check_config=check_config,
    check_init=check_init,
)
