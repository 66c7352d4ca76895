"""Reference-batch statistics, computed once per (reference file, feature network) and cached.

ADM's protocol (spec section 5): FID/sFID use the `mu`/`sigma` (`mu_s`/`sigma_s`) stored in the
reference `.npz` when present (the whole ImageNet training set), otherwise statistics of its
arr_0 images; precision/recall always use the features of the arr_0 images (10K for ImageNet).

Extracting 10K reference images takes minutes on a GPU, so the result is saved to
`cache_dir/<reference stem>-<key>.npz`. The key hashes the extractor id, the file's size and
mtime and its first and last MiB: a changed file or another network gives a new key.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from metrics.features import FeatureExtractor, extract_npz_features
from metrics.frechet import feature_statistics
from metrics.npz import inspect_npz, read_statistics
from runtime.atomic_file import atomic_write

CACHE_FORMAT = 1
_EDGE_BYTES = 1 << 20


@dataclass
class ReferenceStats:
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: Optional[np.ndarray]  # spatial (sFID) statistics, None when unavailable
    sigma_s: Optional[np.ndarray]
    features: Optional[np.ndarray]  # [N, D] pool features of arr_0 (precision/recall), None without images

    @property
    def num_images(self) -> int:
        return 0 if self.features is None else self.features.shape[0]


def cache_key(path: str | Path, extractor_id: str) -> str:
    """Identity of (reference file, feature network): extractor id, size, mtime, first and last MiB."""
    path = Path(path)
    stat = path.stat()
    digest = hashlib.sha256(f"{CACHE_FORMAT}|{extractor_id}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(_EDGE_BYTES))
        handle.seek(max(0, stat.st_size - _EDGE_BYTES))
        digest.update(handle.read())
    return digest.hexdigest()[:20]


def _cache_path(path: Path, extractor_id: str, cache_dir: Path) -> Path:
    return Path(cache_dir) / f"{path.stem}-{cache_key(path, extractor_id)}.npz"


def _load(cache_file: Path) -> ReferenceStats:
    with np.load(cache_file, allow_pickle=False) as data:
        optional = {name: data[name] if name in data.files else None for name in ("mu_s", "sigma_s", "features")}
        return ReferenceStats(mu=data["mu"], sigma=data["sigma"], **optional)


def _save(stats: ReferenceStats, cache_file: Path) -> None:
    """Write to a temporary name and rename, so an interrupted run never leaves a broken cache."""
    arrays = {name: getattr(stats, name) for name in ("mu", "sigma", "mu_s", "sigma_s", "features")}
    with atomic_write(cache_file) as handle:
        np.savez(handle, **{name: value for name, value in arrays.items() if value is not None})


def _check_dims(path: Path, stats: ReferenceStats, pool_dim: int, spatial_dim: Optional[int]) -> None:
    if stats.mu.shape[0] != pool_dim:
        raise ValueError(
            f"{path}: stored mu has {stats.mu.shape[0]} dims but the feature extractor gives {pool_dim}; "
            "the reference statistics come from another network"
        )
    if stats.mu_s is not None and spatial_dim is not None and stats.mu_s.shape[0] != spatial_dim:
        raise ValueError(
            f"{path}: stored mu_s has {stats.mu_s.shape[0]} dims but the feature extractor gives {spatial_dim}"
        )


def compute_reference_statistics(
    path: str | Path, extractor: FeatureExtractor, batch_size: int, show_progress: bool = True
) -> ReferenceStats:
    """Stored mu/sigma (mu_s/sigma_s) where the file has them, else statistics of its images; plus image features."""
    contents = inspect_npz(path)
    stored = read_statistics(path)
    features = None
    if contents.images is not None:
        features = extract_npz_features(path, extractor, batch_size, show_progress)
    if "mu" in stored:
        mu, sigma = stored["mu"], stored["sigma"]
    else:
        mu, sigma = feature_statistics(features.pool)
    if "mu_s" in stored:
        mu_s, sigma_s = stored["mu_s"], stored["sigma_s"]
    elif features is not None and features.spatial is not None:
        mu_s, sigma_s = feature_statistics(features.spatial)
    else:
        mu_s = sigma_s = None
    stats = ReferenceStats(mu, sigma, mu_s, sigma_s, None if features is None else features.pool)
    if features is not None:
        spatial_dim = None if features.spatial is None else features.spatial.shape[1]
        _check_dims(contents.path, stats, features.pool.shape[1], spatial_dim)
    return stats


def reference_statistics(
    path: str | Path,
    extractor: FeatureExtractor,
    batch_size: int,
    cache_dir: Optional[str | Path],
    show_progress: bool = True,
) -> ReferenceStats:
    """`compute_reference_statistics`, read from / written to `cache_dir` when one is given."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference batch not found: {path} (evaluate.reference)")
    if cache_dir is None:
        return compute_reference_statistics(path, extractor, batch_size, show_progress)
    cache_file = _cache_path(path, extractor.id, Path(cache_dir))
    if cache_file.is_file():
        return _load(cache_file)
    stats = compute_reference_statistics(path, extractor, batch_size, show_progress)
    _save(stats, cache_file)
    return stats
