"""Flow-matching paths against closed forms: alpha, sigma and their derivatives, the velocity target, the
conversions between velocity, noise and score, SiT's loss weights and diffusion forms, the training times."""
import math

import pytest
import torch

from diffusion.flow_paths import PATHS, Interpolant, sample_training_times, shift_time, training_interval

F64 = torch.float64
T = torch.linspace(0.02, 0.98, 49, dtype=F64)


def closed_form(path, t):
    """(alpha, sigma) written out independently of the module (SiT's formulas in SiT time tau = 1 - t)."""
    tau = 1.0 - t
    if path == "linear":
        return tau, 1.0 - tau
    if path == "gvp":
        return torch.sin(0.5 * math.pi * tau), torch.cos(0.5 * math.pi * tau)
    log_alpha = -0.25 * (1.0 - tau) ** 2 * (20.0 - 0.1) - 0.5 * (1.0 - tau) * 0.1
    alpha = torch.exp(log_alpha)
    return alpha, torch.sqrt(1.0 - alpha**2)


@pytest.mark.parametrize("path", PATHS)
def test_coefficients_and_their_derivatives(path):
    flow = Interpolant(path)
    alpha, sigma = flow.alpha_sigma(T)
    expected_alpha, expected_sigma = closed_form(path, T)
    torch.testing.assert_close(alpha, expected_alpha, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sigma, expected_sigma, rtol=1e-12, atol=1e-12)
    t = T.clone().requires_grad_(True)
    (d_alpha,) = torch.autograd.grad(flow.alpha_sigma(t)[0].sum(), t)
    (d_sigma,) = torch.autograd.grad(flow.alpha_sigma(t)[1].sum(), t)
    got_alpha, got_sigma = flow.derivatives(T)
    torch.testing.assert_close(got_alpha, d_alpha, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_sigma, d_sigma, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(flow.alpha_over_d_alpha(T), alpha / got_alpha, rtol=1e-10, atol=1e-12)
    drift_var = sigma * got_sigma - got_alpha / alpha * sigma**2
    torch.testing.assert_close(flow.drift_var(T), drift_var, rtol=1e-10, atol=1e-12)
    assert (flow.drift_var(T) > 0).all()


def test_endpoints_and_sits_time():
    linear, gvp, vp = (Interpolant(p) for p in PATHS)
    ends = torch.tensor([0.0, 1.0], dtype=F64)
    for flow in (linear, gvp):
        alpha, sigma = flow.alpha_sigma(ends)
        torch.testing.assert_close(alpha, torch.tensor([1.0, 0.0], dtype=F64), atol=1e-15, rtol=0)
        torch.testing.assert_close(sigma, torch.tensor([0.0, 1.0], dtype=F64), atol=1e-15, rtol=0)
        assert flow.alpha_over_d_alpha(ends[1:]).abs().item() < 1e-15  # finite where alpha = 0
    alpha, sigma = vp.alpha_sigma(ends)
    assert alpha[0] == 1.0 and sigma[0] == 0.0
    assert alpha[1].item() == pytest.approx(math.exp(-0.25 * 19.9 - 0.05))  # SiT's VP never reaches pure noise


@pytest.mark.parametrize("path", PATHS)
def test_velocity_target_is_the_time_derivative_of_the_interpolant(path):
    flow = Interpolant(path)
    x, eps = torch.randn(49, 3, dtype=F64), torch.randn(49, 3, dtype=F64)
    x_t, u_t = flow.interpolate(x, eps, T)
    h = 1e-6
    forward, _ = flow.interpolate(x, eps, T + h)
    backward, _ = flow.interpolate(x, eps, T - h)
    torch.testing.assert_close(u_t, (forward - backward) / (2 * h), rtol=1e-6, atol=1e-6)
    alpha, sigma = flow.alpha_sigma(T)
    torch.testing.assert_close(x_t, alpha[:, None] * x + sigma[:, None] * eps)


@pytest.mark.parametrize("path", PATHS)
def test_velocity_noise_and_score_convert_into_each_other(path):
    """For Gaussian data the posterior means are known: v* = alpha' E[x|x_t] + sigma' E[eps|x_t] and the score is
    -E[eps|x_t] / sigma; the conversions must map the exact noise and score to the exact velocity and back."""
    flow = Interpolant(path)
    mean, std = torch.tensor([0.7, -0.4], dtype=F64), torch.tensor([0.5, 1.3], dtype=F64)
    x_t = torch.randn(49, 2, dtype=F64)
    alpha, sigma = (c[:, None] for c in flow.alpha_sigma(T))
    d_alpha, d_sigma = (c[:, None] for c in flow.derivatives(T))
    var = alpha**2 * std**2 + sigma**2
    x_hat = mean + alpha * std**2 * (x_t - alpha * mean) / var
    eps_hat = sigma * (x_t - alpha * mean) / var
    velocity = d_alpha * x_hat + d_sigma * eps_hat
    score = -(x_t - alpha * mean) / var
    torch.testing.assert_close(score, -eps_hat / sigma)
    torch.testing.assert_close(flow.score_from_velocity(velocity, x_t, T), score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow.velocity_from_score(score, x_t, T), velocity, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow.velocity_from_noise(eps_hat, x_t, T), velocity, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow.velocity(eps_hat, x_t, T, "noise"), velocity, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(flow.velocity(score, x_t, T, "score"), velocity, rtol=1e-9, atol=1e-9)
    assert flow.velocity(velocity, x_t, T, "velocity") is velocity


def test_score_at_pure_noise_is_minus_x():
    for path in ("linear", "gvp"):
        x, v = torch.randn(4, 3, dtype=F64), torch.randn(4, 3, dtype=F64)
        torch.testing.assert_close(Interpolant(path).score_from_velocity(v, x, torch.ones(4, dtype=F64)), -x)


def test_sits_loss_weights_and_diffusion_forms():
    flow = Interpolant("linear")
    t = torch.tensor([0.25, 0.5], dtype=F64)
    drift_var = t / (1 - t)  # (1 - tau) / tau in SiT's time
    torch.testing.assert_close(flow.loss_weight(t, "none"), torch.ones(2, dtype=F64))
    torch.testing.assert_close(flow.loss_weight(t, "velocity"), (drift_var / t) ** 2)
    torch.testing.assert_close(flow.loss_weight(t, "likelihood"), drift_var / t**2)
    tau = 1 - t
    expected = {"constant": torch.full_like(t, 2.0), "sbdm": 2 * drift_var, "sigma": 2 * t, "linear": 2 * (1 - tau),
                "decreasing": 0.25 * (2 * torch.cos(math.pi * tau) + 1) ** 2,
                "increasing-decreasing": 2 * torch.sin(math.pi * tau) ** 2}
    for form, value in expected.items():
        torch.testing.assert_close(flow.diffusion(t, form, norm=2.0), value, msg=form)
    with pytest.raises(ValueError, match="unknown diffusion form"):
        flow.diffusion(t, "SDE")
    with pytest.raises(ValueError, match="unknown flow path"):
        Interpolant("cosine")


def test_training_times_follow_sits_intervals_and_the_requested_distribution():
    assert training_interval("linear", "velocity", 1e-5) == (0.0, 1.0)
    assert training_interval("gvp", "noise", 1e-3) == (1e-3, 1 - 1e-3)
    assert training_interval("vp", "velocity", 1e-5) == (1e-5, 1.0)
    g = torch.Generator().manual_seed(0)
    uniform = sample_training_times(200_000, g, (0.0, 1.0), "uniform")
    assert abs(uniform.mean().item() - 0.5) < 0.003 and uniform.min() >= 0 and uniform.max() <= 1
    logit = sample_training_times(200_000, g, (0.0, 1.0), "logit_normal", mean=0.5, std=0.8)
    logits = torch.log(logit / (1 - logit))
    assert abs(logits.mean().item() - 0.5) < 0.01 and abs(logits.std().item() - 0.8) < 0.01
    shifted = sample_training_times(200_000, g, (0.0, 1.0), "uniform", shift=3.0)
    # P(t' <= 1/2) = P(t <= 1/4) for s = 3: the shift moves the times toward the noise
    assert abs((shifted <= 0.5).double().mean().item() - 0.25) < 0.005
    inside = sample_training_times(1000, g, (0.1, 0.9), "logit_normal")
    assert inside.min() >= 0.1 and inside.max() <= 0.9


def test_the_shift_is_sd3s_and_lightningdits_is_its_inverse():
    t = torch.linspace(0, 1, 11, dtype=F64)
    torch.testing.assert_close(shift_time(t, 3.0), 3 * t / (1 + 2 * t))
    # LightningDiT shifts in SiT's time (tau = 1 - t) with s = 0.3: the same grid as ours with 1 / 0.3
    tau = 1 - t
    lightning = 0.3 * tau / (1 + (0.3 - 1) * tau)
    torch.testing.assert_close(1 - lightning, shift_time(t, 1 / 0.3))
    assert shift_time(t, 1.0) is t
