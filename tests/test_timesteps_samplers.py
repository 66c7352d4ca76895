"""P(t) tables, SpeeD's tau and dual sampling against spec §1-2 (computed values) and re-derivations."""
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from diffusion.timesteps import dual, samplers
from diffusion.timesteps.speed_threshold import meaningful_steps, resolve_tau

T = 1000


def linear_abar(num_timesteps=T):
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64))


def cosine_abar(num_timesteps=T):
    """IDDPM cosine schedule (betas clipped at 0.999), written out independently."""
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), 0.999) for i in range(num_timesteps)]
    return np.cumprod(1.0 - np.array(betas))


# --- tau ---------------------------------------------------------------------------------


def test_meaningful_steps_spec_values():
    assert meaningful_steps(linear_abar()) == 642
    assert meaningful_steps(cosine_abar()) == 959


def test_meaningful_steps_definition():
    abar = linear_abar()
    tau = meaningful_steps(abar)
    gradient = np.gradient(np.sqrt(1 - abar))
    assert gradient[tau - 1] < 1e-4 and np.all(gradient[: tau - 1] >= 1e-4)


def test_resolve_tau():
    abar = linear_abar()
    assert resolve_tau("auto", abar) == 642
    assert resolve_tau(700, abar) == 700
    assert resolve_tau(1000.0, abar) == 1000
    for bad in (0, -3, 1001, "700", "automatic", 12.5, True, None, float("inf")):
        with pytest.raises(ValueError, match="tau"):
            resolve_tau(bad, abar)


# --- fixed tables ------------------------------------------------------------------------


def test_uniform():
    p = samplers.uniform_probabilities(T)
    assert p.shape == (T,) and np.allclose(p, 1e-3) and math.isclose(p.sum(), 1.0)


def test_speed_formula_and_spec_mass():
    p = samplers.speed_probabilities(T, tau=700, k=5)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert np.allclose(p[:700], 5 / (1000 + 700 * 4)) and np.allclose(p[700:], 1 / (1000 + 700 * 4))
    assert round(p[:700].sum(), 3) == 0.921  # spec §1.3
    assert np.allclose(samplers.speed_probabilities(T, tau=642, k=1), 1 / T)  # k = 1 is uniform


@pytest.mark.parametrize("tau,k", [(0, 5), (1001, 5), (700, 0), (700, -1)])
def test_speed_rejects_bad_parameters(tau, k):
    with pytest.raises(ValueError):
        samplers.speed_probabilities(T, tau=tau, k=k)


def test_speed_legacy_is_a_soft_step_at_642():
    p = samplers.speed_legacy_probabilities(linear_abar())
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert round(p[:642].sum(), 2) == 0.90  # spec §1.3
    ratio = p / p.min()
    off_the_plateaus = (np.abs(ratio - 5.0) > 0.01) & (np.abs(ratio - 1.0) > 0.01)
    assert np.flatnonzero(off_the_plateaus).tolist() == [639, 640, 641, 642, 643]  # the soft edge
    assert np.allclose(ratio[:630], 5.0, rtol=1e-9) and np.allclose(ratio[655:], 1.0, rtol=1e-9)


def _grid_reference(abar, loc, scale):
    """Independent re-derivation with scipy: bin edges at log-SNR midpoints, tails to the end bins."""
    lsnr = np.log(abar / (1 - abar))
    probs = []
    for t in range(len(abar)):
        hi = np.inf if t == 0 else 0.5 * (lsnr[t - 1] + lsnr[t])
        lo = -np.inf if t == len(abar) - 1 else 0.5 * (lsnr[t] + lsnr[t + 1])
        probs.append(norm.cdf(hi, loc, scale) - norm.cdf(lo, loc, scale))
    return np.array(probs)


def test_log_snr_grid_range():
    lsnr = np.log(linear_abar() / (1 - linear_abar()))
    assert round(lsnr[0], 2) == 9.21 and round(lsnr[-1], 2) == -10.12  # spec §2


def test_lognormal_edm_mode_and_mean():
    abar = linear_abar()
    p = samplers.lognormal_probabilities(abar, mean=-1.2, std=1.2)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert np.allclose(p, _grid_reference(abar, 2.4, 2.4), atol=1e-12)
    assert int(np.argmax(p)) == 16 and round(float(p @ np.arange(T))) == 133  # spec §2


def test_logitnormal_sd3_mode_and_mean():
    abar = linear_abar()
    p = samplers.logitnormal_probabilities(abar, mean=0.0, std=1.0)
    assert np.allclose(p, _grid_reference(abar, 0.0, 2.0), atol=1e-12)
    assert int(np.argmax(p)) == 142 and round(float(p @ np.arange(T))) == 279  # spec §2
    shifted = samplers.logitnormal_probabilities(abar, mean=0.5, std=0.7)
    assert np.allclose(shifted, _grid_reference(abar, -1.0, 1.4), atol=1e-12)


def test_lognormal_and_logitnormal_share_a_family():
    # ln sigma = logit(s) = u, so equal (mean, std) give the same table.
    abar = cosine_abar()
    assert np.array_equal(
        samplers.lognormal_probabilities(abar, 0.3, 0.8), samplers.logitnormal_probabilities(abar, 0.3, 0.8)
    )


def test_logitnormal_index_is_the_naive_mapping():
    p = samplers.logitnormal_index_probabilities(T, mean=0.0, std=1.0)
    assert math.isclose(p.sum(), 1.0, rel_tol=1e-12)
    assert int(np.argmax(p)) in (499, 500) and math.isclose(p[499], p[500], rel_tol=1e-9)  # spec: mode 500
    # Monte Carlo of t = floor(T sigmoid(u)).
    u = np.random.default_rng(0).normal(0.4, 1.3, 400_000)
    counts = np.bincount(np.floor(T / (1 + np.exp(-u))).astype(int), minlength=T)
    expected = samplers.logitnormal_index_probabilities(T, mean=0.4, std=1.3)
    assert np.abs(np.cumsum(counts) / counts.sum() - np.cumsum(expected)).max() < 5e-3


# --- dual sampling -----------------------------------------------------------------------


def test_dual_mapping_matches_spec():
    t = torch.tensor([0, 1, 641, 642, 643, 999])
    assert dual.dual_timesteps(t, 642).tolist() == [642, 641, 1, 0, 1, 357]


@pytest.mark.parametrize("n,primaries", [(1, 1), (2, 2), (3, 2), (8, 5), (9, 5), (256, 129)])
def test_dual_batch_layout(n, primaries):
    assert dual.num_primaries(n) == primaries
    prim = torch.arange(primaries) * 97 % 1000
    batch = dual.dual_batch(prim, 642, n)
    assert batch.shape == (n,)
    assert torch.equal(batch[:primaries], prim)
    assert torch.equal(batch[primaries:], dual.dual_timesteps(prim[: n - primaries], 642))


def test_dual_marginal_by_enumeration():
    rng = np.random.default_rng(1)
    p = rng.random(T)
    p /= p.sum()
    dual_p = np.zeros(T)
    for t in range(T):
        dual_p[642 - t if t < 642 else t - 642] += p[t]
    assert np.allclose(dual.dual_probabilities(p, 642), dual_p)
    assert np.allclose(dual.dual_marginal(p, 642), 0.5 * (p + dual_p))
    assert np.allclose(dual.dual_marginal(p, 642, batch_size=8), (5 * p + 3 * dual_p) / 8)
    assert np.allclose(dual.dual_marginal(p, 642, batch_size=1), p)
    assert dual_p[643:].sum() == 0  # duals land in [0, 642]


def test_dual_speed_mass_below_700():
    p = samplers.speed_probabilities(T, tau=700, k=5)
    assert round(dual.dual_marginal(p, 642)[:700].sum(), 2) == 0.96  # spec §1.4
