"""Improved precision/recall on constructed point sets and against a brute-force scipy computation."""
import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from metrics.precision_recall import manifold_radii, pairwise_squared_distances, precision_recall


def _brute_force(reference, samples, k=3):
    """Direct definition: squared k-th-neighbour radii (self = 0th), membership by <= on squared distances."""
    ref_radii = np.sort(cdist(reference, reference, "sqeuclidean"), axis=1)[:, k]
    sam_radii = np.sort(cdist(samples, samples, "sqeuclidean"), axis=1)[:, k]
    cross = cdist(reference, samples, "sqeuclidean")  # [Nr, Ns]
    precision = np.mean((cross <= ref_radii[:, None]).any(axis=0))
    recall = np.mean((cross <= sam_radii[None, :]).any(axis=1))
    return precision, recall


def test_radii_are_kth_neighbour_squared_distances_on_a_line():
    points = torch.arange(10, dtype=torch.float64)[:, None]
    radii = manifold_radii(points, k=3)
    # Point 0: neighbours 1, 2, 3 -> 3^2; point 5: distances 0,1,1,2,2,... -> 2^2.
    assert radii[0].item() == 9.0 and radii[5].item() == 4.0 and radii[9].item() == 9.0


def test_identical_sets_have_full_precision_and_recall():
    features = np.random.default_rng(0).normal(size=(50, 16)).astype(np.float32)
    assert precision_recall(features, features.copy()) == (1.0, 1.0)


def test_far_apart_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(40, 8))
    samples = rng.normal(size=(60, 8)) + 1000.0
    assert precision_recall(reference, samples) == (0.0, 0.0)


def test_half_the_samples_off_the_reference_manifold():
    grid = np.stack(np.meshgrid(np.arange(5.0), np.arange(5.0)), axis=-1).reshape(-1, 2)
    samples = np.concatenate([grid, grid + 1000.0])
    precision, recall = precision_recall(grid, samples)
    assert precision == 0.5 and recall == 1.0


def test_matches_brute_force_on_random_sets_for_any_block_size():
    rng = np.random.default_rng(2)
    reference = rng.normal(size=(70, 5))
    samples = rng.normal(loc=0.3, scale=1.3, size=(90, 5))
    expected = _brute_force(reference, samples)
    assert 0.0 < expected[0] < 1.0 and 0.0 < expected[1] < 1.0
    assert precision_recall(reference, samples) == pytest.approx(expected, abs=1e-12)
    assert precision_recall(reference, samples, max_block_elements=7) == pytest.approx(expected, abs=1e-12)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="same D"):
        precision_recall(np.zeros((10, 3)), np.zeros((10, 4)))
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_adm_distances_are_float16_with_a_float32_fallback():
    rng = np.random.default_rng(0)
    small = torch.as_tensor(rng.normal(size=(6, 8)), dtype=torch.float32)
    exact = pairwise_squared_distances(small.double(), small.double())
    half = pairwise_squared_distances(small, small, adm=True)
    assert half.dtype == torch.float32 and torch.allclose(half.double(), exact, rtol=1e-2, atol=1e-2)
    assert not torch.equal(half.double(), exact)  # float16 rounding is really there
    big = small * 300  # squared norms ~ 7e5 > float16's 65504: float16 overflows, the block is redone in float32
    fallback = pairwise_squared_distances(big, big, adm=True)
    assert torch.isfinite(fallback).all() and torch.equal(fallback, pairwise_squared_distances(big.float(), big.float()))


def test_adm_rounding_moves_precision_and_recall_only_slightly():
    rng = np.random.default_rng(1)
    reference = rng.normal(size=(300, 16)).astype(np.float32) * 5
    samples = (rng.normal(size=(300, 16)) * 1.1 + 0.2).astype(np.float32) * 5
    exact = precision_recall(reference, samples)
    adm = precision_recall(reference, samples, adm_distances=True)
    assert all(abs(a - b) <= 0.02 for a, b in zip(exact, adm))
