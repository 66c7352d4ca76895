"""Frechet distance between two Gaussians fitted to feature sets (FID, sFID).

FID (Heusel et al. 2017, Eq. 6): d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).
Computed as ADM's evaluator does (spec section 5): float64 statistics with the unbiased
covariance (np.cov), scipy's `sqrtm` for the matrix square root, an `eps * I` offset on both
covariances when the square root is not finite, and the real part of a numerically complex
root (an imaginary diagonal above 1e-3 is an error, not silently dropped).
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

IMAGINARY_TOLERANCE = 1e-3  # ADM: largest |imag| allowed on the diagonal of the square root


def feature_statistics(features: np.ndarray, block_rows: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (np.cov, rowvar=False) of [N, D] features, in float64.

    Accumulated over row blocks so 50K x 2048 float32 features are never copied to float64 at once.
    """
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be a 2-D [N, D] array, got shape {features.shape}")
    n = features.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {n}")
    mu = np.zeros(features.shape[1], dtype=np.float64)
    for start in range(0, n, block_rows):
        mu += features[start : start + block_rows].sum(axis=0, dtype=np.float64)
    mu /= n
    scatter = np.zeros((features.shape[1], features.shape[1]), dtype=np.float64)
    for start in range(0, n, block_rows):
        centred = features[start : start + block_rows].astype(np.float64) - mu
        scatter += centred.T @ centred
    return mu, scatter / (n - 1)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID when fed Inception pool_3 statistics)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(
            f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape} (features from different networks?)"
        )
    dim = mu1.shape[0]
    for name, sigma in (("sigma1", sigma1), ("sigma2", sigma2)):
        if sigma.shape != (dim, dim):
            raise ValueError(f"{name} has shape {sigma.shape}, expected ({dim}, {dim}) to match the means")

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # Singular product (e.g. fewer samples than dimensions): ADM's fallback.
        warnings.warn(f"sqrtm(sigma1 @ sigma2) is not finite; adding {eps} to the covariance diagonals")
        offset = np.eye(dim) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_TOLERANCE):
            largest = np.max(np.abs(covmean.imag))
            raise ValueError(
                f"matrix square root has an imaginary component of {largest:.3g}; the covariances are broken"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
