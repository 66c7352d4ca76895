"""Improved precision and recall (Kynkaanniemi et al. 2019), as ADM's evaluator computes them.

Each feature set defines a manifold: the union of balls around its points whose radius is the
distance to the point's k-th nearest neighbour in the same set (k = 3; the point itself is
neighbour 0). Precision = fraction of sample points inside the reference manifold; recall =
fraction of reference points inside the sample manifold. A point is inside when its squared
distance to some centre is <= that centre's squared radius (ADM compares squared distances).

Distances are computed in blocks of rows against all columns, so 50K samples x 10K reference
images need only `max_block_elements` distances in memory at a time. By default in float64
(exact to the features' precision). `adm_distances=True` does what ADM's evaluator does: each
block in float16, and the block again in float32 when float16 overflowed (Inception pool
features have squared norms above float16's 65504); ADM's rounding raises precision and recall
by up to about 0.005 against exact distances, so use it to reproduce ADM's numbers exactly.
"""
from __future__ import annotations

import numpy as np
import torch

NEAREST_K = 3
MAX_BLOCK_ELEMENTS = 2**25  # 256 MiB of float64 distances per block


def pairwise_squared_distances(a: torch.Tensor, b: torch.Tensor, adm: bool = False) -> torch.Tensor:
    """[M, N] squared Euclidean distances |a_i|^2 - 2 a_i.b_j + |b_j|^2, clamped at 0 (ADM's form).

    adm: in float16, falling back to float32 for the block when float16 is not finite (ADM's
    DistanceBlock); returned as float32. Otherwise in the inputs' dtype.
    """
    if adm:
        half = _squared_distances(a.to(torch.float16), b.to(torch.float16))
        if torch.isfinite(half).all():
            return half.float()
        return _squared_distances(a.float(), b.float())
    return _squared_distances(a, b)


def _squared_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sq_a = (a * a).sum(dim=1, keepdim=True)
    sq_b = (b * b).sum(dim=1, keepdim=True)
    return (sq_a - 2.0 * (a @ b.T) + sq_b.T).clamp_min_(0.0)


def _rows_per_block(num_columns: int, max_block_elements: int) -> int:
    return max(1, max_block_elements // max(1, num_columns))


def manifold_radii(
    features: torch.Tensor, k: int = NEAREST_K, max_block_elements: int = MAX_BLOCK_ELEMENTS, adm: bool = False
) -> torch.Tensor:
    """[N] squared distance from each point to its k-th nearest neighbour (itself being the 0-th)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f"need more than k={k} feature vectors to estimate a manifold, got {n}")
    radii = torch.empty(n, dtype=features.dtype, device=features.device)
    rows = _rows_per_block(n, max_block_elements)
    for start in range(0, n, rows):
        distances = pairwise_squared_distances(features[start : start + rows], features, adm)
        radii[start : start + rows] = distances.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def precision_recall(
    reference: np.ndarray,
    samples: np.ndarray,
    k: int = NEAREST_K,
    device: torch.device | str = "cpu",
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
    adm_distances: bool = False,
) -> tuple[float, float]:
    """(precision, recall) of [Ns, D] sample features against [Nr, D] reference features.

    float64 distances by default; adm_distances: ADM's float16 with the float32 fallback.
    """
    if reference.ndim != 2 or samples.ndim != 2 or reference.shape[1] != samples.shape[1]:
        raise ValueError(
            f"reference and sample features must be [N, D] with the same D, got {reference.shape} and {samples.shape}"
        )
    dtype = torch.float32 if adm_distances else torch.float64
    ref = torch.as_tensor(np.asarray(reference), device=device).to(dtype)
    sam = torch.as_tensor(np.asarray(samples), device=device).to(dtype)
    ref_radii = manifold_radii(ref, k, max_block_elements, adm_distances)
    sam_radii = manifold_radii(sam, k, max_block_elements, adm_distances)

    sample_inside = torch.zeros(sam.shape[0], dtype=torch.bool, device=sam.device)
    reference_inside = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    rows = _rows_per_block(sam.shape[0], max_block_elements)
    for start in range(0, ref.shape[0], rows):
        distances = pairwise_squared_distances(ref[start : start + rows], sam, adm_distances)  # [R, Ns]
        sample_inside |= (distances <= ref_radii[start : start + rows, None]).any(dim=0)
        reference_inside[start : start + rows] = (distances <= sam_radii[None, :]).any(dim=1)
    precision = sample_inside.double().mean().item()
    recall = reference_inside.double().mean().item()
    return precision, recall
