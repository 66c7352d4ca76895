"""Sample-quality metrics in ADM's protocol (spec section 5): FID, sFID, IS, precision/recall.

Pure numpy/torch functions on features (`frechet`, `inception_score`, `precision_recall`),
reading ADM-format `.npz` files (`npz`), the Inception feature network (`features`) and cached
reference statistics (`reference`). The `evaluate` phase (phases/evaluate.py) ties them together.
"""
from metrics.frechet import feature_statistics, frechet_distance
from metrics.inception_score import class_probabilities, inception_score
from metrics.precision_recall import manifold_radii, precision_recall

__all__ = [
    "class_probabilities",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "manifold_radii",
    "precision_recall",
]
