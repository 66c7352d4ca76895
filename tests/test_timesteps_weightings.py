"""Loss weightings w_t against spec §1.5 / §2 computed values and their closed forms."""
import math

import numpy as np
import pytest

from diffusion.timesteps import weightings
from diffusion.timesteps.snr import log_snr, snr

T = 1000


def linear_abar(num_timesteps=T):
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, num_timesteps, dtype=np.float64))


def test_snr_closed_form():
    abar = linear_abar()
    assert np.allclose(snr(abar), abar / (1 - abar))
    assert np.allclose(log_snr(abar), np.log(abar / (1 - abar)))
    with pytest.raises(ValueError, match="alphas_cumprod"):
        snr(np.array([0.5, 0.0]))


def test_none():
    assert np.array_equal(weightings.no_weighting(7), np.ones(7))


def test_speed_weights_lam_06():
    w = weightings.speed_weights(linear_abar(), tau=642, lam=0.6)
    assert math.isclose(w[:642].max(), 0.6, rel_tol=1e-12) and int(np.argmax(w[:642])) == 219  # spec §1.5
    assert round(w[0], 3) == 0.409
    assert np.all(w[642:] == 1.0)
    assert w[:642].min() >= 0.4 - 1e-12


def test_speed_weights_formula():
    abar = linear_abar()
    g = np.gradient(1 - abar)
    g_hat = (g - g.min()) / np.ptp(g)
    for lam, tau in [(0.6, 700), (0.9, 300), (0.0, 1000), (1.0, 50)]:
        w = weightings.speed_weights(abar, tau=tau, lam=lam)
        expected = np.concatenate([(1 - lam) + (2 * lam - 1) * g_hat[:tau], np.ones(T - tau)])
        assert np.allclose(w, expected)
        assert w.min() >= 0


@pytest.mark.parametrize("lam", [-0.1, 1.2, 5.0])
def test_speed_weights_reject_negative_weights(lam):
    with pytest.raises(ValueError, match="lam"):
        weightings.speed_weights(linear_abar(), tau=642, lam=lam)


def test_p2_spec_values():
    abar = linear_abar()
    w = weightings.p2_weights(abar, k=1.0, gamma=1.0)
    assert math.isclose(w[0], 1e-4, rel_tol=1e-6)  # spec §1.5
    assert round(w[300], 2) == 0.61 and round(w[642], 3) == 0.985
    assert np.allclose(w, 1 - abar)  # 1/(1 + SNR) = 1 - abar
    w_half = weightings.p2_weights(abar, k=2.0, gamma=0.5)
    assert np.allclose(w_half, 1 / np.sqrt(2 + abar / (1 - abar)))


def test_min_snr_full_weight_exactly_where_snr_below_gamma():
    abar = linear_abar()
    w = weightings.min_snr_weights(abar, gamma=5.0)
    ratio = abar / (1 - abar)
    assert np.array_equal(w == 1.0, ratio <= 5.0)
    assert np.all(w[130:] == 1.0) and np.all(w[:130] < 1.0)  # spec §2: t >= 130 for linear-1000
    assert np.allclose(w[:130], 5.0 / ratio[:130])


def test_edm_weights():
    abar = linear_abar()
    w = weightings.edm_weights(abar)
    sigma = np.sqrt((1 - abar) / abar)
    # lambda(sigma) = (sigma^2 + 0.25) / (0.5 sigma)^2 on the x0 error; the x0 error is sigma * eps error.
    assert np.allclose(w, (sigma**2 + 0.25) / (0.5 * sigma) ** 2 * sigma**2)
    assert np.allclose(w, 1 + 4 * (1 - abar) / abar)


def test_normalize_weights():
    rng = np.random.default_rng(0)
    p = rng.random(T)
    p /= p.sum()
    w = weightings.p2_weights(linear_abar(), 1.0, 1.0)
    normalized = weightings.normalize_weights(w, p)
    assert math.isclose(float(p @ normalized), 1.0, rel_tol=1e-12)
    assert np.allclose(normalized / w, normalized[0] / w[0])  # only rescaled
    with pytest.raises(ValueError):
        weightings.normalize_weights(np.zeros(T), p)
