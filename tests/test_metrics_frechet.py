"""Frechet distance: closed forms for Gaussians, an independent eigen-based computation, ADM's fallbacks."""
import numpy as np
import pytest
from scipy import linalg

from metrics import frechet
from metrics.frechet import feature_statistics, frechet_distance


def _diagonal_closed_form(mu1, s1, mu2, s2):
    # Diagonal covariances commute: Tr (S1 S2)^(1/2) = sum sqrt(s1 s2).
    return np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))


def _random_spd(rng, dim):
    a = rng.normal(size=(dim, dim))
    return a @ a.T + 0.1 * np.eye(dim)


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    value = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert value == pytest.approx(_diagonal_closed_form(mu1, s1, mu2, s2), rel=1e-10)


def test_full_covariances_match_symmetric_eigen_computation():
    # Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2): a symmetric problem solved with eigh, not sqrtm.
    rng = np.random.default_rng(1)
    dim = 8
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    s1, s2 = _random_spd(rng, dim), _random_spd(rng, dim)
    values, vectors = np.linalg.eigh(s1)
    root1 = vectors @ np.diag(np.sqrt(values)) @ vectors.T
    trace_root = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_root
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-9)


def test_identical_gaussians_are_at_distance_zero():
    rng = np.random.default_rng(2)
    mu, sigma = rng.normal(size=5), _random_spd(rng, 5)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_feature_statistics_equal_numpy_mean_and_unbiased_cov():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(53, 4)).astype(np.float32) * 3 + 1
    mu, sigma = feature_statistics(features, block_rows=7)
    assert mu.dtype == np.float64 and sigma.shape == (4, 4)
    np.testing.assert_allclose(mu, features.astype(np.float64).mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-10)


def test_statistics_of_gaussian_samples_give_near_closed_form_fid():
    rng = np.random.default_rng(4)
    mu1, mu2 = np.zeros(3), np.array([1.0, 0.0, -1.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([0.5, 1.0, 2.0])
    x = rng.normal(size=(200_000, 3)) * np.sqrt(s1) + mu1
    y = rng.normal(size=(200_000, 3)) * np.sqrt(s2) + mu2
    value = frechet_distance(*feature_statistics(x), *feature_statistics(y))
    assert value == pytest.approx(_diagonal_closed_form(mu1, s1, mu2, s2), abs=0.02)


def test_non_finite_square_root_falls_back_to_eps_offset(monkeypatch):
    real_sqrtm = linalg.sqrtm
    calls = []

    def first_call_fails(matrix):
        calls.append(matrix)
        return np.full_like(matrix, np.nan) if len(calls) == 1 else real_sqrtm(matrix)

    monkeypatch.setattr(frechet.linalg, "sqrtm", first_call_fails)
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, 1.0])
    s1, s2 = np.array([1.0, 0.0]), np.array([2.0, 3.0])  # singular sigma1
    eps = 1e-2
    with pytest.warns(UserWarning, match="not finite"):
        value = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), eps=eps)
    # Traces use the original covariances; only the square root sees the offset (ADM).
    expected = 1.0 + np.sum(s1 + s2) - 2 * np.sum(np.sqrt((s1 + eps) * (s2 + eps)))
    assert len(calls) == 2 and value == pytest.approx(expected, rel=1e-10)


def test_complex_square_root_keeps_real_part_or_fails_clearly(monkeypatch):
    mu, sigma = np.zeros(2), np.eye(2)
    monkeypatch.setattr(frechet.linalg, "sqrtm", lambda m: np.eye(2) + 1e-6j * np.eye(2))
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-12)
    monkeypatch.setattr(frechet.linalg, "sqrtm", lambda m: np.eye(2) + 0.5j * np.eye(2))
    with pytest.raises(ValueError, match="imaginary"):
        frechet_distance(mu, sigma, mu, sigma)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="at least 2"):
        feature_statistics(np.zeros((1, 3)))
