"""GaussianDiffusion: forward process, posterior, learned-range variance and the hybrid loss."""
import math

import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from diffusion.schedule import linear_betas


def _closed_form(betas):
    """abar, abar_prev, posterior mean coefficients and variance, derived by Gaussian conditioning."""
    abar = np.cumprod(1 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    # x_{t-1} | x0 ~ N(sqrt(abar_prev) x0, 1 - abar_prev); x_t | x_{t-1} ~ N(sqrt(1 - beta) x_{t-1}, beta)
    with np.errstate(divide="ignore", invalid="ignore"):  # t = 0 is set by hand below
        precision = 1 / (1 - abar_prev) + (1 - betas) / betas
        variance = 1 / precision
        coef_x0 = variance * np.sqrt(abar_prev) / (1 - abar_prev)
        coef_xt = variance * np.sqrt(1 - betas) / betas
    variance[0], coef_x0[0], coef_xt[0] = 0.0, 1.0, 0.0  # t = 0: x_{-1} is x0 itself
    return abar, abar_prev, coef_x0, coef_xt, variance


def test_arrays_match_closed_form():
    diffusion = create_diffusion()
    abar, abar_prev, coef_x0, coef_xt, variance = _closed_form(linear_betas(1000))
    assert np.allclose(diffusion.alphas_cumprod, abar, rtol=1e-12)
    assert np.allclose(diffusion.posterior_variance, variance, rtol=1e-9, atol=1e-15)
    assert np.allclose(diffusion.posterior_mean_coef1, coef_x0, rtol=1e-9)
    assert np.allclose(diffusion.posterior_mean_coef2, coef_xt, rtol=1e-9, atol=1e-15)
    assert diffusion.posterior_log_variance_clipped[0] == pytest.approx(np.log(variance[1]), rel=1e-12)
    assert np.allclose(diffusion.posterior_log_variance_clipped[1:], np.log(variance[1:]))


def test_q_sample_formula_and_statistics():
    diffusion = create_diffusion()
    abar = diffusion.alphas_cumprod
    x0 = torch.full((20000, 2), 0.7)
    t = torch.full((20000,), 500)
    torch.manual_seed(0)
    xt = diffusion.q_sample(x0, t)
    assert xt.dtype == torch.float32
    assert xt.mean().item() == pytest.approx(math.sqrt(abar[500]) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - abar[500], rel=0.03)
    noise = torch.randn(3, 4)
    t = torch.tensor([0, 10, 999])
    got = diffusion.q_sample(torch.ones(3, 4), t, noise)
    expected = torch.from_numpy(np.sqrt(abar[[0, 10, 999]])).float()[:, None] + torch.from_numpy(
        np.sqrt(1 - abar[[0, 10, 999]])
    ).float()[:, None] * noise
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="noise shape"):
        diffusion.q_sample(torch.ones(3, 4), t, torch.ones(3, 5))


def test_posterior_against_gaussian_conditioning():
    diffusion = create_diffusion()
    _, _, coef_x0, coef_xt, variance = _closed_form(linear_betas(1000))
    x0, xt = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    t = torch.tensor([1, 50, 500, 999])
    mean, var, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    c0 = torch.tensor(coef_x0[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    ct = torch.tensor(coef_xt[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    assert torch.allclose(mean, c0 * x0 + ct * xt, atol=1e-5)
    assert torch.allclose(var.flatten(), torch.tensor(variance[t.numpy()], dtype=torch.float32), rtol=1e-5)


def test_learned_range_variance_and_fixed_variance():
    diffusion = create_diffusion()
    x = torch.randn(3, 2, 4, 4)
    t = torch.tensor([0, 10, 700])
    log_beta = torch.tensor(np.log(diffusion.betas[t.numpy()]), dtype=torch.float32).view(-1, 1, 1, 1)
    log_post = torch.tensor(diffusion.posterior_log_variance_clipped[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    cases = ((1.0, log_beta), (-1.0, log_post), (0.0, (log_beta + log_post) / 2), (3.0, 2 * log_beta - log_post))
    for v, expected in cases:
        out = diffusion.mean_variance_from_output(torch.cat([torch.zeros_like(x), torch.full_like(x, v)], 1), x, t)
        assert torch.allclose(out["log_variance"], expected.expand_as(x), atol=1e-5)  # v = 3: not clamped
    eps = torch.randn_like(x)
    out = diffusion.p_mean_variance(lambda x_, t_: torch.cat([eps, torch.zeros_like(x_)], 1), x, t)
    abar = torch.tensor(diffusion.alphas_cumprod[t.numpy()], dtype=torch.float32).view(-1, 1, 1, 1)
    x0_hat = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
    assert torch.allclose(out["pred_xstart"], x0_hat, atol=1e-3)
    assert torch.allclose(out["mean"], diffusion.q_posterior_mean_variance(x0_hat, x, t)[0], atol=1e-3)

    fixed = create_diffusion(learn_sigma=False)
    out = fixed.p_mean_variance(lambda x_, t_: torch.zeros_like(x_), x, t)
    expected = np.log([fixed.posterior_variance[1], fixed.betas[10], fixed.betas[700]])
    assert torch.allclose(out["log_variance"][:, 0, 0, 0], torch.tensor(expected, dtype=torch.float32))
    with pytest.raises(ValueError, match="model output has shape"):
        diffusion.p_mean_variance(lambda x_, t_: x_, x, t)


def test_oracle_model_has_zero_mse_and_weights_multiply():
    diffusion = create_diffusion()
    x0, noise = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 1, 300, 999])
    var_out = torch.randn(4, 3, 4, 4)

    def oracle(x_t, t_, y):
        return torch.cat([noise, var_out], dim=1)

    terms = diffusion.training_losses(oracle, x0, t, model_kwargs={"y": None}, noise=noise)
    assert torch.equal(terms["mse"], torch.zeros(4))
    assert terms["vb"].shape == (4,) and torch.isfinite(terms["vb"]).all()
    # v = -1 selects the true posterior variance, so with the true eps the KL (t > 0) vanishes.
    var_out = -torch.ones(4, 3, 4, 4)
    terms = diffusion.training_losses(oracle, x0, t, model_kwargs={"y": None}, noise=noise)
    assert torch.allclose(terms["vb"][1:], torch.zeros(3), atol=1e-5) and terms["vb"][0] > 0.1

    def model(x_t, t_):
        return torch.cat([0.5 * x_t, var_out], dim=1)

    plain = diffusion.training_losses(model, x0, t, noise=noise)
    assert torch.allclose(plain["loss"], plain["mse"] + plain["vb"])
    w_mse, w_vb = torch.tensor([0.0, 0.5, 1.0, 2.0]), torch.tensor([1.0, 0.0, 3.0, 0.25])
    weighted = diffusion.training_losses(model, x0, t, noise=noise, mse_weights=w_mse, vb_weights=w_vb)
    assert torch.allclose(weighted["mse"], plain["mse"]) and torch.allclose(weighted["vb"], plain["vb"])
    assert torch.allclose(weighted["loss"], w_mse * plain["mse"] + w_vb * plain["vb"])
    with pytest.raises(ValueError, match="mse_weights"):
        diffusion.training_losses(model, x0, t, noise=noise, mse_weights=torch.ones(3))

    fixed = create_diffusion(learn_sigma=False)
    terms = fixed.training_losses(lambda x_t, t_: 0.5 * x_t, x0, t, noise=noise, mse_weights=w_mse)
    assert "vb" not in terms and torch.allclose(terms["loss"], w_mse * terms["mse"])


def _approx_cdf(x):
    """The reference's tanh approximation of the normal CDF (checked against scipy in test_diffusion_likelihood)."""
    return 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _expected_vb_bits(betas, x0, noise, eps, v, t):
    """IDDPM's one-step bound term, recomputed in float64 numpy."""
    abar, _, coef_x0, coef_xt, variance = _closed_form(betas)
    out = []
    for i, step in enumerate(t):
        a = abar[step]
        xt = np.sqrt(a) * x0[i] + np.sqrt(1 - a) * noise[i]
        x0_hat = (xt - np.sqrt(1 - a) * eps[i]) / np.sqrt(a)
        mean = coef_x0[step] * x0_hat + coef_xt[step] * xt
        log_min = np.log(variance[1] if step == 0 else variance[step])
        frac = (v[i] + 1) / 2
        log_var = frac * np.log(betas[step]) + (1 - frac) * log_min
        if step == 0:
            std = np.exp(0.5 * log_var)
            upper = _approx_cdf((x0[i] + 1 / 255 - mean) / std)
            lower = _approx_cdf((x0[i] - 1 / 255 - mean) / std)
            prob = np.where(x0[i] < -0.999, upper, np.where(x0[i] > 0.999, 1 - lower, upper - lower))
            out.append(-np.log(prob).mean() / np.log(2))
        else:
            true_mean = coef_x0[step] * x0[i] + coef_xt[step] * xt
            true_var = variance[step]
            kl = 0.5 * (log_var - np.log(true_var) + (true_var + (true_mean - mean) ** 2) / np.exp(log_var) - 1)
            out.append(kl.mean() / np.log(2))
    return np.array(out)


@pytest.mark.parametrize("num_steps,rescale_vb", [(1000, False), (100, False), (100, True)])
def test_vb_term_against_independent_computation(num_steps, rescale_vb):
    """DiT does not rescale the VB term for other step counts; IDDPM's RESCALED_MSE multiplies it by T/1000."""
    diffusion = create_diffusion(num_steps=num_steps, rescale_vb=rescale_vb)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 2, 3, 3, generator=gen) * 2 - 1
    x0[0, 0, 0, 0], x0[0, 0, 0, 1] = 1.0, -1.0  # the open-ended edge bins
    noise, eps = torch.randn(4, 2, 3, 3, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    v = torch.rand(4, 2, 3, 3, generator=gen) * 2 - 1
    t = torch.tensor([0, 1, num_steps // 3, num_steps - 1])
    terms = diffusion.training_losses(lambda x_t, t_: torch.cat([eps, v], 1), x0, t, noise=noise)
    expected = _expected_vb_bits(
        diffusion.betas, *(a.double().numpy() for a in (x0, noise, eps, v)), t.numpy()
    ) * (num_steps / 1000 if rescale_vb else 1.0)
    assert np.allclose(terms["vb"].numpy(), expected, rtol=2e-3, atol=1e-4)


def test_vb_does_not_train_the_mean():
    diffusion = create_diffusion()
    x0 = torch.randn(3, 2, 4, 4)
    output = torch.zeros(3, 4, 4, 4, requires_grad=True)
    def model(x_t, t_):
        return output + 0.1 * x_t.repeat(1, 2, 1, 1)

    terms = diffusion.training_losses(model, x0, torch.tensor([0, 5, 600]))
    terms["vb"].sum().backward()
    assert torch.count_nonzero(output.grad[:, :2]) == 0
    assert torch.count_nonzero(output.grad[:, 2:]) > 0


def test_training_losses_under_bf16_autocast():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 8, 3, padding=1)

    def model(x, t, y):
        return net(x) * 0.1

    diffusion = create_diffusion()
    x0, noise, t = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.tensor([0, 10, 500, 999])
    reference = diffusion.training_losses(model, x0, t, model_kwargs={"y": None}, noise=noise)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = diffusion.training_losses(model, x0, t, model_kwargs={"y": None}, noise=noise)
    for key in ("loss", "mse", "vb"):
        assert terms[key].dtype == torch.float32 and torch.isfinite(terms[key]).all()
    assert torch.allclose(terms["loss"], reference["loss"], rtol=0.05)
    terms["loss"].mean().backward()
    assert net.weight.grad is not None and torch.isfinite(net.weight.grad).all()
