"""IDDPM Gaussian diffusion as used by DiT: epsilon prediction, learned-range variance (spec section 4).

References: Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (IDDPM, "learned range" variance and the
hybrid loss), Song et al. 2021 (DDIM, Eq. 12). Every schedule array is float64 numpy, as in the
reference; values are cast to float32 torch tensors when indexed by a batch of timesteps.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from diffusion.likelihood import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from diffusion.noise import noise_like

ModelFn = Callable[..., torch.Tensor]


class GaussianDiffusion:
    """The forward process q, the reverse process p_theta, the training loss and the DDPM/DDIM loops.

    `learn_sigma=True`: the model outputs 2C channels, [eps, v], and the reverse variance is
    the IDDPM learned range between beta_t and the posterior variance. `learn_sigma=False`:
    C channels (eps) and DiT's fixed "large" variance beta_t (beta~_1 at t = 0).
    """

    def __init__(self, betas: np.ndarray, learn_sigma: bool = True, rescale_vb: bool = False):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(f"betas must be a 1-D array of at least 2 steps, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        self.betas = betas
        self.learn_sigma = bool(learn_sigma)
        self.rescale_vb = bool(rescale_vb)
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        # q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta~_t)  (Ho et al. Eq. 6-7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta~_0 = 0, so its log is -inf; the reference uses beta~_1 there.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        # Fixed "large" variance (DiT with learn_sigma=False, sigma_small=False).
        self.fixed_variance = np.append(self.posterior_variance[1], betas[1:])
        self.fixed_log_variance = np.log(self.fixed_variance)

        self._tables: dict = {}  # (array name, device) -> float32 tensor, so no host copy per step

    # ---- indexing -------------------------------------------------------------------------
    def _gather(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """float32 values of schedule array `name` at timesteps t, shaped [B, 1, ..., 1] to broadcast over x.

        Casting the float64 array to float32 before indexing gives the same values as the
        reference's index-then-cast, since the cast is elementwise.
        """
        key = (name, t.device)
        table = self._tables.get(key)
        if table is None:
            table = torch.from_numpy(getattr(self, name)).to(torch.float32).to(t.device)
            self._tables[key] = table
        return table[t].reshape(-1, *([1] * (x.ndim - 1)))

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """The timesteps the model sees for indices t (identity here; respaced processes map them)."""
        return t

    # ---- forward process ------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)  (Ho et al. Eq. 4)."""
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x0 shape {tuple(x0.shape)}")
        mean_coef = self._gather("sqrt_alphas_cumprod", t, x0)
        std = self._gather("sqrt_one_minus_alphas_cumprod", t, x0)
        return mean_coef * x0 + std * noise

    def q_posterior_mean_variance(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)  (Ho et al. Eq. 6-7)."""
        mean = self._gather("posterior_mean_coef1", t, x_t) * x0 + self._gather("posterior_mean_coef2", t, x_t) * x_t
        variance = self._gather("posterior_variance", t, x_t)
        log_variance = self._gather("posterior_log_variance_clipped", t, x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t), written as the reference does."""
        return (
            self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t
            - self._gather("sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """Inverse of predict_xstart_from_eps."""
        return (self._gather("sqrt_recip_alphas_cumprod", t, x_t) * x_t - x0) / self._gather(
            "sqrt_recipm1_alphas_cumprod", t, x_t
        )

    # ---- reverse process ------------------------------------------------------------------
    def split_output(self, output: torch.Tensor, x: torch.Tensor):
        """(eps, variance values or None) from the model output; checks the channel count."""
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if output.shape[0] != x.shape[0] or output.shape[1] != expected or output.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"model output has shape {tuple(output.shape)}, expected {(x.shape[0], expected, *x.shape[2:])} "
                f"(learn_sigma={self.learn_sigma}, input channels={channels})"
            )
        if self.learn_sigma:
            return output[:, :channels], output[:, channels:]
        return output, None

    def mean_variance_from_output(self, output: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> dict:
        """p(x_{t-1} | x_t) from a model output: mean, variance, log_variance, pred_xstart, eps.

        Learned range (IDDPM Eq. 15): frac = (v + 1) / 2, log sigma^2 = frac log beta_t +
        (1 - frac) log beta~_t. v is not clamped and x_0 is not clipped (latents are unbounded).
        """
        eps, var_values = self.split_output(output, x)
        if var_values is not None:
            min_log = self._gather("posterior_log_variance_clipped", t, x)
            max_log = self._gather("log_betas", t, x)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            variance = self._gather("fixed_variance", t, x).expand_as(x)
            log_variance = self._gather("fixed_log_variance", t, x).expand_as(x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": variance,
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[dict] = None
    ) -> dict:
        """Run the model at x_t (it receives model_timesteps(t)) and return p(x_{t-1} | x_t)."""
        output = model_fn(x, self.model_timesteps(t), **(model_kwargs or {})).float()
        return self.mean_variance_from_output(output, x, t)

    # ---- training loss --------------------------------------------------------------------
    def vb_terms_bpd(self, output: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """One term of the variational bound per sample [B], in bits per dimension (IDDPM Eq. 4-5).

        t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t = 0: decoder NLL -log p(x_0 | x_1)
        with the discretized Gaussian. Both are averaged over C, H, W.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        out = self.mean_variance_from_output(output, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = mean_flat(nll) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self,
        model: ModelFn,
        x0: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[dict] = None,
        noise: Optional[torch.Tensor] = None,
        mse_weights: Optional[torch.Tensor] = None,
        vb_weights: Optional[torch.Tensor] = None,
    ) -> dict:
        """Per-sample [B] losses: "mse" (eps MSE), "vb" (learned sigma only) and "loss".

        loss = mse_weights * mse + vb_weights * vb (None means 1); "mse" and "vb" are reported
        unweighted. The VB term sees the predicted eps through a stop-gradient, so it only trains
        the variance channels (IDDPM Sec. 3.1, L_hybrid). As in DiT (loss type MSE) it is not
        rescaled, whatever the number of steps; with rescale_vb it is multiplied by
        num_timesteps / 1000, IDDPM's RESCALED_MSE convention ("divide by 1000 for equivalence
        with the initial implementation"). With 1000 training steps both are the same.
        Everything after the model call is float32, also under autocast.
        """
        x0 = x0.float()
        if noise is None:
            noise = torch.randn_like(x0)
        noise = noise.float()
        x_t = self.q_sample(x0, t, noise)
        output = model(x_t, self.model_timesteps(t), **(model_kwargs or {})).float()
        eps, var_values = self.split_output(output, x_t)

        terms = {"mse": mean_flat((noise - eps) ** 2)}
        loss = _weighted(terms["mse"], mse_weights, "mse_weights")
        if var_values is not None:
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
            if self.rescale_vb:
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
            loss = loss + _weighted(terms["vb"], vb_weights, "vb_weights")
        terms["loss"] = loss
        return terms

    # ---- sampling -------------------------------------------------------------------------
    def p_sample(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} = mean + sigma z (no noise where t = 0)."""
        out = self.p_mean_variance(model_fn, x, t)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
        return out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise

    def ddim_sample(
        self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor], eta: float = 0.0
    ) -> torch.Tensor:
        """One DDIM step (Song et al. Eq. 12); the variance output is ignored.

        sigma_t = eta sqrt((1 - abar_{t-1}) / (1 - abar_t)) sqrt(1 - abar_t / abar_{t-1});
        x_{t-1} = sqrt(abar_{t-1}) x0_hat + sqrt(1 - abar_{t-1} - sigma_t^2) eps_hat + sigma_t z.
        At t = 0, abar_{t-1} = 1 so sigma = 0 and the step returns x0_hat.
        """
        out = self.p_mean_variance(model_fn, x, t)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])  # re-derived from x0, as the reference
        alpha_bar = self._gather("alphas_cumprod", t, x)
        alpha_bar_prev = self._gather("alphas_cumprod_prev", t, x)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        sample = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        if noise is not None:
            nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))
            sample = sample + nonzero * sigma * noise
        return sample

    def p_sample_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        generators: Optional[Sequence[torch.Generator]] = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Ancestral (DDPM) sampling from x_T = noise down to x_0; step noise comes row by row from `generators`.

        Noise is drawn at every step, also at t = 0 where it is unused, as in the reference loop.
        """

        def step(x, t):
            return self.p_sample(model_fn, x, t, noise_like(x, generators))

        return self._loop(step, noise, generators, progress, "ddpm")

    def ddim_sample_loop(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        generators: Optional[Sequence[torch.Generator]] = None,
        progress: bool = False,
        eta: float = 0.0,
    ) -> torch.Tensor:
        """DDIM sampling from x_T = noise; with eta = 0 it is deterministic and draws no noise."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")

        def step(x, t):
            return self.ddim_sample(model_fn, x, t, noise_like(x, generators) if eta > 0 else None, eta)

        return self._loop(step, noise, generators, progress, "ddim")

    def _loop(self, step, noise: torch.Tensor, generators, progress: bool, desc: str) -> torch.Tensor:
        if generators is not None and len(generators) != noise.shape[0]:
            raise ValueError(f"got {len(generators)} generators for a batch of {noise.shape[0]}; pass one per image")
        x = noise.float()
        with torch.no_grad():
            for i in tqdm(range(self.num_timesteps - 1, -1, -1), desc=desc, disable=not progress):
                t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
                x = step(x, t)
        return x


def _weighted(term: torch.Tensor, weights: Optional[torch.Tensor], name: str) -> torch.Tensor:
    """weights * term for per-sample [B] weights (or a scalar); None means 1."""
    if weights is None:
        return term
    weights = torch.as_tensor(weights, dtype=torch.float32, device=term.device)
    if weights.ndim > 1 or (weights.ndim == 1 and weights.shape[0] != term.shape[0]):
        raise ValueError(f"{name} must be a scalar or have shape [{term.shape[0]}], got {tuple(weights.shape)}")
    return weights * term
