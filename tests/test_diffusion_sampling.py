"""Samplers: exactness on analytic models, per-image reproducibility, diffusers adapters."""
import numpy as np
import pytest
import torch

from diffusion import create_diffusion
from diffusion.noise import per_row_noise
from diffusion.sampler import SAMPLERS, build_sampler

MU, STD = 0.3, 0.5  # data distribution of the analytic model: x0 ~ N(MU, STD^2) per element
BASE = create_diffusion()
_SIGMAS = np.sqrt((1 - BASE.alphas_cumprod) / BASE.alphas_cumprod)


def _alpha_bar(t):
    """abar at original (possibly fractional) timesteps, interpolating sigma linearly like diffusers' Euler."""
    sigma = np.interp(t.double().cpu().numpy(), np.arange(1000), _SIGMAS)
    return torch.from_numpy(1 / (1 + sigma**2)).float().view(-1, 1, 1, 1)


def gaussian_eps(x, t):
    """E[eps | x_t] for Gaussian data: sqrt(1 - abar) (x - sqrt(abar) MU) / (abar STD^2 + 1 - abar)."""
    ab = _alpha_bar(t)
    return (1 - ab).sqrt() * (x - ab.sqrt() * MU) / (ab * STD**2 + 1 - ab)


def gaussian_model(x, t):
    return torch.cat([gaussian_eps(x, t), torch.zeros_like(x)], dim=1)


def exact_ddpm_model(diffusion):
    """Gaussian model whose learned-range output v gives the TRUE reverse variance.

    For Gaussian data x_{t-1} | x_t is exactly Gaussian with variance beta~_t + coef1^2 Var[x0 | x_t],
    so ancestral sampling with this mean and variance is exact for any number of steps.
    """

    def column(array, i):
        return torch.from_numpy(array[i]).view(-1, 1, 1, 1)

    def model(x, t):
        i = np.searchsorted(diffusion.timestep_map, t.numpy())  # original step -> index
        ab = _alpha_bar(t).double()
        var_x0 = STD**2 * (1 - ab) / (ab * STD**2 + 1 - ab)
        coef1 = column(diffusion.posterior_mean_coef1, i)
        log_var = torch.log(column(diffusion.posterior_variance, i) + coef1**2 * var_x0)
        low, high = column(diffusion.posterior_log_variance_clipped, i), column(diffusion.log_betas, i)
        v = torch.where(torch.from_numpy(i).view(-1, 1, 1, 1) == 0, 0.0, 2 * (log_var - low) / (high - low) - 1)
        return torch.cat([gaussian_eps(x, t), v.float().expand_as(x)], dim=1)

    return model


def _stats_ok(x, mean_tol, std_rel_tol):
    assert torch.isfinite(x).all()
    assert abs(x.mean().item() - MU) < mean_tol, x.mean().item()
    assert abs(x.std().item() / STD - 1) < std_rel_tol, x.std().item()


def test_ddpm_with_exact_variance_reproduces_the_data_distribution():
    steps = 8
    sampler = build_sampler("ddpm", steps)
    model = exact_ddpm_model(create_diffusion(respacing=str(steps)))
    torch.manual_seed(0)
    _stats_ok(sampler(model, torch.randn(4000, 1, 4, 4)), mean_tol=0.01, std_rel_tol=0.015)


@pytest.mark.parametrize(
    "name, steps, std_rel_tol",
    [("dpm++", 25, 0.04), ("unipc", 25, 0.04), ("euler", 50, 0.08), ("diffusers-ddim", 50, 0.08), ("ddim", 50, 0.08)],
)
def test_samplers_get_the_gaussian_statistics_roughly_right(name, steps, std_rel_tol):
    # first-order samplers (Euler, DDIM) shrink the spread of a narrow Gaussian by ~6% at 50 steps
    torch.manual_seed(0)
    _stats_ok(build_sampler(name, steps)(gaussian_model, torch.randn(2000, 1, 4, 4)), 0.015, std_rel_tol)


def test_ddim_eta0_recovers_x0_from_an_oracle():
    x0 = torch.randn(3, 4, 4, 4)

    def oracle(x, t):  # the eps that makes x0_hat == x0 at every step
        ab = torch.from_numpy(BASE.alphas_cumprod[t.numpy()]).float().view(-1, 1, 1, 1)
        return torch.cat([(x - ab.sqrt() * x0) / (1 - ab).sqrt(), torch.zeros_like(x)], 1)

    out = build_sampler("ddim", 10)(oracle, torch.randn(3, 4, 4, 4), progress=True)
    assert torch.allclose(out, x0, atol=1e-4)


def test_diffusers_ddim_matches_our_ddim():
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(4)]  # noqa: E731
    noise = per_row_noise((4, 1, 4, 4), gens(), "cpu")
    for eta in (0.0, 1.0):
        ours = build_sampler("ddim", 20, eta=eta)(gaussian_model, noise, gens())
        theirs = build_sampler("diffusers-ddim", 20, eta=eta)(gaussian_model, noise, gens())
        assert torch.allclose(ours, theirs, atol=1e-4), eta
    assert not torch.allclose(ours, build_sampler("ddim", 20)(gaussian_model, noise))  # eta=1 drew noise


@pytest.mark.parametrize("name, eta", [("ddpm", 0.0), ("ddim", 1.0), ("diffusers-ddim", 1.0), ("dpm++", 0.0)])
def test_each_image_depends_only_on_its_generator(name, eta):
    """4 images in one batch == 2 + 2 images in two batches, given the same per-image generators."""
    sampler = build_sampler(name, 6, eta=eta)

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sampler(gaussian_model, per_row_noise((len(seeds), 2, 3, 3), gens, "cpu"), generators=gens)

    together = run([0, 1, 2, 3])
    apart = torch.cat([run([0, 1]), run([2, 3])])
    assert torch.allclose(together, apart, rtol=0, atol=1e-6)
    assert not torch.allclose(together[0], together[1])
    assert torch.allclose(run([5, 2])[1], together[2], rtol=0, atol=1e-6)  # neighbours do not matter


def test_model_sees_original_timesteps_with_the_right_dtype():
    # dpm++/unipc evaluate the model last at t=20 and then step to sigma = 0
    for name, dtype, first, last in (("ddpm", torch.long, 999, 0), ("ddim", torch.long, 980, 0),
                                     ("dpm++", torch.long, 999, 20), ("unipc", torch.long, 999, 20),
                                     ("euler", torch.float32, 999, 0), ("diffusers-ddim", torch.long, 980, 0)):
        seen = []

        def model(x, t):
            seen.append(t)
            return gaussian_model(x, t)

        build_sampler(name, 50)(model, torch.randn(2, 1, 2, 2))
        assert len(seen) == 50 and all(t.shape == (2,) and t.dtype == dtype for t in seen), name
        assert seen[0][0].item() == first and seen[-1][0].item() == last, name
        if name == "euler":  # its linspace timesteps are fractional
            assert any(t[0].item() != round(t[0].item()) for t in seen)


def test_learn_sigma_false_uses_c_channels():
    for name in ("ddpm", "ddim", "euler"):
        out = build_sampler(name, 5, learn_sigma=False)(gaussian_eps, torch.randn(2, 1, 2, 2))
        assert out.shape == (2, 1, 2, 2) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="expected 2"):
        build_sampler("unipc", 5)(gaussian_eps, torch.randn(2, 1, 2, 2))
    with pytest.raises(ValueError, match="model output has shape"):
        build_sampler("ddpm", 5)(gaussian_eps, torch.randn(2, 1, 2, 2))


def test_bad_arguments():
    assert set(SAMPLERS) == {"ddpm", "ddim", "dpm++", "unipc", "euler", "diffusers-ddim"}
    with pytest.raises(ValueError, match="unknown sampler 'heun'"):
        build_sampler("heun", 10)
    with pytest.raises(ValueError, match="steps"):
        build_sampler("ddpm", 0)
    with pytest.raises(ValueError, match="steps"):
        build_sampler("euler", 1001)
    with pytest.raises(ValueError, match="eta"):
        build_sampler("dpm++", 10, eta=0.5)
    with pytest.raises(ValueError, match="cannot make 300 DDIM steps"):
        build_sampler("ddim", 300)
    with pytest.raises(ValueError, match="generators"):
        build_sampler("ddpm", 4)(gaussian_model, torch.randn(3, 1, 2, 2), generators=[torch.Generator()])
