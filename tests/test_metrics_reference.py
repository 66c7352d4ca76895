"""Reference statistics: ADM's stored-vs-computed rule, and the cache keyed by file and network."""
import os

import numpy as np
import pytest
import torch

from metrics.features import FeatureExtractor, Features
from metrics.frechet import feature_statistics
from metrics.reference import reference_statistics


class MeanColour(FeatureExtractor):
    """Stand-in network: per-channel mean and std (pool), means (logits), column means (spatial); counts calls."""

    def __init__(self, id="mean-colour"):
        self.id = id
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        x = images.double() / 255
        pool = torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)
        return Features(pool=pool, logits=pool[:, :3], spatial=x.mean(dim=2)[:, :, :2].flatten(1))


def _reference(path, n=20, **extra):
    images = np.random.default_rng(0).integers(0, 256, size=(n, 6, 6, 3), dtype=np.uint8)
    np.savez(path, arr_0=images, **extra)
    return images


def test_statistics_of_images_without_stored_statistics(tmp_path):
    images = _reference(tmp_path / "ref.npz")
    stats = reference_statistics(tmp_path / "ref.npz", MeanColour(), batch_size=6, cache_dir=None, show_progress=False)
    x = images.astype(np.float64) / 255
    expected_pool = np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2), ddof=1)], axis=1)
    np.testing.assert_allclose(stats.features, expected_pool, rtol=1e-6)
    mu, sigma = feature_statistics(expected_pool)
    np.testing.assert_allclose(stats.mu, mu, rtol=1e-5)
    np.testing.assert_allclose(stats.sigma, sigma, rtol=1e-4, atol=1e-9)
    assert stats.mu_s.shape == (6,) and stats.num_images == 20


def test_second_call_reads_the_cache(tmp_path):
    _reference(tmp_path / "ref.npz")
    net = MeanColour()
    first = reference_statistics(tmp_path / "ref.npz", net, 8, tmp_path / "cache", show_progress=False)
    calls = net.calls
    assert calls == 3 and len(list((tmp_path / "cache").glob("ref-*.npz"))) == 1
    second = reference_statistics(tmp_path / "ref.npz", net, 8, tmp_path / "cache", show_progress=False)
    assert net.calls == calls
    for name in ("mu", "sigma", "mu_s", "sigma_s", "features"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name))


def test_changed_file_or_other_network_recomputes(tmp_path):
    path = tmp_path / "ref.npz"
    _reference(path)
    net = MeanColour()
    reference_statistics(path, net, 100, tmp_path / "cache", show_progress=False)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    reference_statistics(path, net, 100, tmp_path / "cache", show_progress=False)
    assert net.calls == 2
    other = MeanColour(id="another-network")
    reference_statistics(path, other, 100, tmp_path / "cache", show_progress=False)
    assert other.calls == 1 and len(list((tmp_path / "cache").glob("*.npz"))) == 3


def test_stored_statistics_win_but_images_still_give_features(tmp_path):
    path = tmp_path / "ref.npz"
    mu, sigma = np.full(6, 0.5), 2 * np.eye(6)
    _reference(path, mu=mu, sigma=sigma)
    stats = reference_statistics(path, MeanColour(), 100, None, show_progress=False)
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats.sigma, sigma)
    assert stats.features.shape == (20, 6) and stats.mu_s is not None  # spatial computed from the images


def test_statistics_only_reference_needs_no_network(tmp_path):
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.zeros(6), sigma=np.eye(6), mu_s=np.zeros(2), sigma_s=np.eye(2))
    net = MeanColour()
    stats = reference_statistics(path, net, 100, None, show_progress=False)
    assert net.calls == 0 and stats.features is None and stats.num_images == 0
    np.testing.assert_array_equal(stats.sigma_s, np.eye(2))


def test_stored_statistics_from_another_network_or_missing_file_raise(tmp_path):
    path = tmp_path / "ref.npz"
    _reference(path, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    with pytest.raises(ValueError, match="another network"):
        reference_statistics(path, MeanColour(), 100, None, show_progress=False)
    with pytest.raises(FileNotFoundError, match="evaluate.reference"):
        reference_statistics(tmp_path / "nope.npz", MeanColour(), 100, None, show_progress=False)
