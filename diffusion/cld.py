"""Critically-damped Langevin diffusion (CLD): the forward process, its kernel and the HSM loss.

Dockhorn, Vahdat & Kreis, "Score-Based Generative Modeling with Critically-Damped Langevin
Diffusion", ICLR 2022 (arXiv 2112.07068), and its official code (CLD-SGM: `sde_lib.py`,
`losses.py`, `models/utils.py`, the CIFAR-10 configs). The data x is paired with a velocity v of
the same shape, u = (x, v), and both diffuse together (paper Sec. 3; official `CLD.sde`):

    dx = beta M^-1 v dt
    dv = (-beta x - beta Gamma M^-1 v) dt + sqrt(2 Gamma beta) dW,      Gamma^2 = 4 M (critical)

Noise enters only through v, so x is perturbed smoothly and the network only has to learn the
velocity score grad_v log p_t(u). Hybrid score matching (HSM, paper Sec. 3, "score matching
objective") conditions on x_0 alone, with v_0 ~ N(0, gamma M I) marginalised out, so p(u_t | x_0)
is Gaussian with mean linear in x_0 and one 2x2 covariance shared by every dimension (closed form:
paper App. B.1; official `CLD.mean` and `CLD.var`).

All coefficients are computed in float64 from float64 times t [B]; only the final products are
cast to the tensors' dtype. The formulas hold for critical damping only, which is why `damping`
is derived from the mass instead of being a field. The samplers live in `diffusion/cld_samplers.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Below this value of k = 4 B / Gamma, e^k - 1 - k - k^2/2 is summed as a series: the direct
# form loses all digits to cancellation when the result is O(k^3).
_SERIES_BELOW = 1e-2


def _rows(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient [B] viewed as [B, 1, ...] in `like`'s dtype, to scale [B, ...] tensors."""
    return c.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def _exp_remainder3(k: torch.Tensor) -> torch.Tensor:
    """e^k - 1 - k - k^2/2 for k >= 0 without cancellation (series below _SERIES_BELOW)."""
    direct = torch.expm1(k) - k - 0.5 * k * k
    series = k**3 / 6 * (1 + k / 4 * (1 + k / 5 * (1 + k / 6 * (1 + k / 7))))
    return torch.where(k < _SERIES_BELOW, series, direct)


def propagator(beta_integral: torch.Tensor, damping: float) -> tuple[torch.Tensor, ...]:
    """The noise-free flow exp(A) of the forward SDE over an interval with integral of beta = B.

    Returns (phi_xx, phi_xv, phi_vx, phi_vv), each shaped like B (float64): the mean of u at the
    end of the interval is [[phi_xx, phi_xv], [phi_vx, phi_vv]] u at its start. Under critical
    damping the drift matrix has the double eigenvalue -2/Gamma (per unit of B), hence
    exp(A) = e^(-2B/Gamma) (I + (A + 2/Gamma I) B) (paper App. B.1).
    """
    b = beta_integral.to(torch.float64)
    decay = torch.exp(-2.0 * b / damping)
    phi_xx = decay * (1.0 + 2.0 * b / damping)
    phi_xv = decay * (4.0 * b / damping**2)
    phi_vx = decay * (-b)
    phi_vv = decay * (1.0 - 2.0 * b / damping)
    return phi_xx, phi_xv, phi_vx, phi_vv


def transition_covariance(
    beta_integral: torch.Tensor, damping: float, var_v0: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Sxx, Sxv, Svv) of u after an interval with integral of beta = B, from x fixed, v ~ N(., var_v0).

    Sigma = Sigma_rest(B) + phi diag(0, var_v0) phi^T, where Sigma_rest is the covariance the
    noise injects from a fixed start; with k = 4B/Gamma,

        Sigma_rest = e^-k [[e^k - 1 - k - k^2/2,  Gamma k^2 / 4],
                           [Gamma k^2 / 4,         Gamma^2/4 (e^k - 1 + k - k^2/2)]].

    This is the closed form of paper App. B.1 with Sigma_0 = diag(0, var_v0), regrouped so that
    small B does not cancel catastrophically. As B -> inf it tends to diag(1, Gamma^2/4 = M).
    """
    b = beta_integral.to(torch.float64)
    k = 4.0 * b / damping
    decay = torch.exp(-k)
    s_xx = decay * _exp_remainder3(k)
    s_xv = decay * (damping * k * k / 4.0)
    s_vv = decay * (damping**2 / 4.0) * (torch.expm1(k) + k - 0.5 * k * k)
    if var_v0:
        _, phi_xv, _, phi_vv = propagator(b, damping)
        s_xx = s_xx + var_v0 * phi_xv * phi_xv
        s_xv = s_xv + var_v0 * phi_xv * phi_vv
        s_vv = s_vv + var_v0 * phi_vv * phi_vv
    return s_xx, s_xv, s_vv


@dataclass(frozen=True)
class CLD:
    """CLD with the paper's CIFAR-10 settings (paper App. E; CLD-SGM `configs/*cifar10.txt`).

    mass: M (config m_inv = 4). gamma: initial velocity variance is gamma M (HSM's v_0).
    beta: constant beta(t) = 4 on t in [0, 1]. eps: training times are t ~ U[eps, 1]
    (config loss_eps). sampling_eps: samplers stop at t = sampling_eps and then take one
    denoising step to t = 0. numerical_eps: added to Sxx and Svv of the kernel, which keeps the
    Cholesky factor finite at tiny t (config numerical_eps: 1e-9 for CIFAR-10, 1e-6 for
    CelebA-HQ and the toy data). mixed_score: the network predicts a residual on top of the
    analytic score -v/Svv (config mixed_score = true for both image models).
    """

    mass: float = 0.25
    gamma: float = 0.04
    beta: float = 4.0
    eps: float = 1e-5
    sampling_eps: float = 1e-3
    numerical_eps: float = 1e-9
    mixed_score: bool = True

    @property
    def damping(self) -> float:
        """Gamma = 2 sqrt(M): critical damping, the fastest mixing without oscillation (paper Sec. 3)."""
        return 2.0 * math.sqrt(self.mass)

    def beta_integral(self, t: torch.Tensor) -> torch.Tensor:
        """B(t) = integral_0^t beta = beta t (float64): the kernel depends on t only through B."""
        return self.beta * t.to(torch.float64)

    def mean_coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_x, a_v) float64 [B] with E[x_t | x_0] = a_x x_0 and E[v_t | x_0] = a_v x_0.

        HSM's v_0 has mean zero, so only the first column of the propagator enters:
        a_x = (1 + 2B/Gamma) e^(-2B/Gamma), a_v = -B e^(-2B/Gamma) (paper App. B.1).
        """
        phi_xx, _, phi_vx, _ = propagator(self.beta_integral(t), self.damping)
        return phi_xx, phi_vx

    def mean(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu_x, mu_v) of p(u_t | x_0), each shaped like x0 (computed in float64, returned in x0's dtype)."""
        a_x, a_v = self.mean_coefficients(t)
        x0_64 = x0.to(torch.float64)
        return (_rows(a_x, x0_64) * x0_64).to(x0.dtype), (_rows(a_v, x0_64) * x0_64).to(x0.dtype)

    def covariance(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Sxx, Sxv, Svv) float64 [B] of p(u_t | x_0), the same for every dimension.

        Sigma_0 = diag(0, gamma M) (HSM), plus numerical_eps on the diagonal as the official
        `CLD.var` does; at t = 0 this is diag(numerical_eps, gamma M + numerical_eps).
        """
        s_xx, s_xv, s_vv = transition_covariance(self.beta_integral(t), self.damping, self.gamma * self.mass)
        return s_xx + self.numerical_eps, s_xv, s_vv + self.numerical_eps

    def cholesky(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(L11, L21, L22) float64 [B]: Sigma_t = L L^T with L = [[L11, 0], [L21, L22]]."""
        s_xx, s_xv, s_vv = self.covariance(t)
        l11 = torch.sqrt(s_xx)
        l21 = s_xv / l11
        l22 = torch.sqrt(s_vv - l21 * l21)
        return l11, l21, l22

    def perturb(
        self, x0: torch.Tensor, t: torch.Tensor, noise_x: torch.Tensor, noise_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """u_t = mu_t(x_0) + L_t (noise_x, noise_v), a draw from p(u_t | x_0) given standard normal noise.

        Coefficients in float64, the combination in x0's dtype. HSM's velocity target is built from
        noise_v alone (see `ell`), so the caller must keep it.
        """
        a_x, a_v = self.mean_coefficients(t)
        l11, l21, l22 = self.cholesky(t)
        # The coefficients in float64 (they cancel at small t); the per-element work in x0's dtype (a hot path).
        nx, nv = noise_x.to(x0.dtype), noise_v.to(x0.dtype)
        x_t = _rows(a_x, x0) * x0 + _rows(l11, x0) * nx
        v_t = _rows(a_v, x0) * x0 + _rows(l21, x0) * nx + _rows(l22, x0) * nv
        return x_t, v_t

    def ell(self, t: torch.Tensor) -> torch.Tensor:
        """ell_t = 1 / L22 = sqrt(Sxx / (Sxx Svv - Sxv^2)) (float64 [B]).

        The kernel's velocity score is grad_v log p(u_t | x_0) = -(Sigma^-1 (u - mu))_v
        = -(L^-T eps)_v = -ell_t eps_v: HSM regresses onto it (paper Sec. 3; official
        `CLD.noise_multiplier` returns -ell_t).
        """
        return 1.0 / self.cholesky(t)[2]

    def analytic_score_variance(self, t: torch.Tensor) -> torch.Tensor:
        """Svv of the kernel (float64 [B]): the mixed score's analytic part is -v / Svv.

        -v/Svv is the score of N(0, Svv), the velocity marginal of the kernel for x_0 = 0, taken
        alone: a Gaussian baseline the network only has to correct (official
        `models/utils.get_score_fn` with mixed_score uses `var(t, 0, gamma / m_inv)[2]`).
        """
        return self.covariance(t)[2]

    def velocity_score(
        self, output: torch.Tensor, x_t: torch.Tensor, v_t: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The velocity score s = grad_v log p_t(u) a network output alpha stands for.

        s = -ell_t alpha, plus -v_t / Svv when mixed_score (paper Sec. 3 and App. E, "mixed
        score"; official `models/utils.get_score_fn`). x_t is not used by the parameterisation; it is
        an argument so that callers pass the whole state. Returned in output/v_t's dtype.
        """
        del x_t
        dtype = torch.promote_types(output.dtype, v_t.dtype)
        score = -_rows(self.ell(t), output).to(dtype) * output.to(dtype)
        if self.mixed_score:
            score = score - v_t.to(dtype) / _rows(self.analytic_score_variance(t), v_t).to(dtype)
        return score

    def hsm_loss(
        self, output: torch.Tensor, x_t: torch.Tensor, v_t: torch.Tensor, noise_v: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample HSM loss [B]: mean over non-batch dims of (s / (-ell_t) - eps_v)^2, in float32.

        HSM (paper Sec. 3) is lambda(t) ||s_theta - (-ell_t eps_v)||^2; the paper's image models
        use lambda(t) = ell_t^-2 (official weighting `reweightedv2`), which turns it into the
        eps_v regression ||s_theta / (-ell_t) - eps_v||^2. With the mixed score,
        s_theta / (-ell_t) = alpha + v_t / (ell_t Svv). The official code sums over dimensions;
        the mean here differs by the constant factor D only.
        """
        del x_t
        eps_hat = output.float()
        if self.mixed_score:
            coef = 1.0 / (self.ell(t) * self.analytic_score_variance(t))
            eps_hat = eps_hat + _rows(coef, eps_hat) * v_t.float()
        err = (eps_hat - noise_v.float()) ** 2
        return err.reshape(err.shape[0], -1).mean(dim=1)
