"""The `evaluate` phase: FID, sFID, IS, precision and recall of a samples `.npz` against an ADM reference batch.

Follows ADM's evaluator (spec section 5) with torch-fidelity's TF-compatible Inception in place
of the TF graph. Runs on rank 0 only. Prints a table, then, as the last line of stdout, the
results as one JSON line, which is also written to `evaluate.output`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from metrics.features import FeatureExtractor, build_inception, extract_npz_features
from metrics.frechet import feature_statistics, frechet_distance
from metrics.inception_score import class_probabilities, inception_score
from metrics.npz import inspect_npz
from metrics.precision_recall import precision_recall
from metrics.reference import reference_statistics
from phases.generation import output_root
from runtime import distributed as dist
from runtime.atomic_file import write_text_atomic
from runtime.config import record_config
from runtime.console import MetricsLog, info

REFERENCE_HELP = (
    "set evaluate.reference to an ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz from "
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
)


def samples_path(cfg: DictConfig) -> Path:
    """evaluate.samples, else inference.output, else <run or student stage folder>/inference/samples.npz."""
    path = cfg.evaluate.samples or cfg.inference.output
    return Path(path) if path else output_root(cfg, "inference") / "inference" / "samples.npz"


def output_path(cfg: DictConfig, samples: Path) -> Path:
    """evaluate.output, else <run or student stage folder>/eval/<samples stem>.json."""
    if cfg.evaluate.output:
        return Path(cfg.evaluate.output)
    return output_root(cfg, "inference") / "eval" / f"{samples.stem}.json"


def reference_cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.experiment_dir) / "eval" / "reference_cache"


def evaluate_npz(
    samples_path: str | Path,
    reference_path: str | Path,
    extractor: FeatureExtractor,
    batch_size: int,
    cache_dir: Optional[str | Path],
    show_progress: bool = True,
    adm_distances: bool = False,
) -> dict:
    """All metrics of the samples' arr_0 images against the reference batch (statistics cached in `cache_dir`)."""
    samples_path, reference_path = Path(samples_path), Path(reference_path)
    contents = inspect_npz(samples_path)
    if contents.images is None:
        raise ValueError(f"{samples_path} has no arr_0 images; the samples must be images, not statistics")
    reference = reference_statistics(reference_path, extractor, batch_size, cache_dir, show_progress)
    features = extract_npz_features(samples_path, extractor, batch_size, show_progress)

    mu, sigma = feature_statistics(features.pool)
    fid = frechet_distance(reference.mu, reference.sigma, mu, sigma)
    sfid = None
    if features.spatial is not None and reference.mu_s is not None:
        mu_s, sigma_s = feature_statistics(features.spatial)
        sfid = frechet_distance(reference.mu_s, reference.sigma_s, mu_s, sigma_s)
    is_mean, is_std = inception_score(class_probabilities(features.logits))
    precision = recall = None
    if reference.features is not None:
        precision, recall = precision_recall(reference.features, features.pool, device=extractor.device,
                                             adm_distances=adm_distances)
    return {
        "fid": fid,
        "is": is_mean,
        "is_std": is_std,
        "precision": precision,
        "recall": recall,
        "pr_distances": "float16 with float32 fallback (ADM)" if adm_distances else "float64",
        "num_samples": contents.num_images,
        "reference": str(reference_path),
        "samples": str(samples_path),
        "sfid": sfid,
        "num_reference_images": reference.num_images,
        "feature_extractor": extractor.id,
    }


def format_table(results: dict) -> str:
    """The human-readable summary printed before the JSON line."""

    def value(key: str, digits: int = 4) -> str:
        number = results[key]
        return "n/a" if number is None else f"{number:.{digits}f}"

    no_images = "n/a (reference has no arr_0 images)"
    rows = [
        f"samples    {results['samples']} ({results['num_samples']} images)",
        f"reference  {results['reference']} ({results['num_reference_images']} images)",
        f"  FID        {value('fid')}",
        f"  sFID       {value('sfid')}",
        f"  IS         {value('is', 2)} +- {value('is_std', 2)}",
        f"  Precision  {value('precision') if results['precision'] is not None else no_images}",
        f"  Recall     {value('recall') if results['recall'] is not None else no_images}",
    ]
    return "\n".join(rows)


def sweep(cfg: DictConfig, feature_extractor: Optional[FeatureExtractor] = None) -> dict:
    """FID over checkpoints; the new points also go to logs/evaluate.jsonl and wandb, at their steps."""
    from phases import fid_sweep

    points = fid_sweep.run(cfg, extractor=feature_extractor)
    if dist.is_main() and points:
        log = MetricsLog(cfg, "evaluate")
        for point in points:
            log.log(point["step"], {k: v for k, v in point.items() if isinstance(v, float)})
        log.close()
    return {"points": points}


def _write_json(results: dict, path: Path) -> None:
    write_text_atomic(path, json.dumps(results, indent=2) + "\n")


def run(cfg: DictConfig, feature_extractor: Optional[FeatureExtractor] = None) -> dict:
    """Evaluate on rank 0 (other ranks return {} at once); returns the results dict.

    With evaluate.checkpoints: FID over the run's checkpoints instead (phases/fid_sweep.py, every rank).
    """
    if cfg.evaluate.checkpoints is not None:
        return sweep(cfg, feature_extractor)
    if not dist.is_main():
        return {}
    ec = cfg.evaluate
    if not ec.reference:
        raise ValueError(f"evaluate.reference is not set: {REFERENCE_HELP}")
    if ec.batch_size < 1:
        raise ValueError(f"evaluate.batch_size must be at least 1, got {ec.batch_size}")
    samples = samples_path(cfg)
    if not samples.is_file():
        raise FileNotFoundError(f"samples file not found: {samples} (run the inference phase or set evaluate.samples)")
    reference = Path(ec.reference)
    if not reference.is_file():
        raise FileNotFoundError(f"evaluate.reference={ec.reference}: no such file; {REFERENCE_HELP}")
    extractor = feature_extractor
    if extractor is None:
        extractor = build_inception(ec.inception_weights, dist.device())
    record_config(cfg, "evaluate")
    info(f"evaluating {samples} against {reference} with {extractor.id} (precision/recall distances: "
         f"{'float16 with float32 fallback, as ADM' if ec.adm_distances else 'float64'})")

    results = evaluate_npz(samples, reference, extractor, ec.batch_size, reference_cache_dir(cfg),
                           adm_distances=ec.adm_distances)
    info(format_table(results))
    _write_json(results, output_path(cfg, samples))
    if cfg.wandb.mode != "disabled":
        log = MetricsLog(cfg, "evaluate")  # imports wandb lazily
        log.log(0, {key: value for key, value in results.items() if isinstance(value, (int, float))})
        log.close()
    print(json.dumps(results), flush=True)  # last line of stdout: machine-readable results
    return results
