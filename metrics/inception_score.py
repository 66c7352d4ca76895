"""Inception Score (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))), averaged over splits.

As in ADM's evaluator (spec section 5): p(y|x) is the softmax of the Inception pool_3 features
times the classifier weights WITHOUT the bias (1008 "unbiased" logits), the samples are cut in
consecutive chunks of `split_size` = 5000 in file order (10 splits for 50K), p(y) is the mean
of p(y|x) within a chunk, and the score is the mean over chunks. Like ADM, a last chunk shorter
than `split_size` is kept as its own split (12K samples -> 5000, 5000, 2000); fewer than
`split_size` samples give one split. The spread over splits is returned as well (np.std), as
the improved-GAN code and torch-fidelity report it.
"""
from __future__ import annotations

import numpy as np
from scipy.special import softmax, xlogy

ADM_SPLIT_SIZE = 5000


def class_probabilities(logits: np.ndarray) -> np.ndarray:
    """p(y|x): row-wise softmax of [N, K] logits, in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2:
        raise ValueError(f"logits must be a 2-D [N, K] array, got shape {logits.shape}")
    return softmax(logits, axis=1)


def inception_score(probs: np.ndarray, split_size: int = ADM_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std) over splits of exp(mean_x KL(p(y|x) || p(y))) for [N, K] class probabilities.

    0 * log 0 is taken as 0 (scipy xlogy), where ADM's plain np.log would give NaN.
    """
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probabilities must be a non-empty 2-D [N, K] array, got shape {probs.shape}")
    if split_size < 1:
        raise ValueError(f"split_size must be at least 1, got {split_size}")
    scores = []
    for start in range(0, probs.shape[0], split_size):
        part = probs[start : start + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (xlogy(part, part) - xlogy(part, marginal)).sum(axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))
