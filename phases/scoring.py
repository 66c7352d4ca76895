"""Scoring an ADM-format `.npz`: FID, sFID, IS, precision and recall against a reference batch, with a loaded
feature network. Plain functions that `evaluate`, `inference.evaluate`, the FID sweeps, `train.fid_every` and
`distill`'s student FIDs call with their arguments (none of them calls another phase).

Follows ADM's evaluator (docs/METHODS.md) with torch-fidelity's TF-compatible Inception in place of the TF
graph. Scoring runs on rank 0; `load_evaluator` checks the inputs on every rank before any sampling.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from metrics.features import FeatureExtractor, build_inception, extract_npz_features
from metrics.digits_features import TRAIN_HELP as DIGITS_TRAIN_HELP, DigitsFeatures, file_hash
from metrics.frechet import feature_statistics, frechet_distance
from metrics.inception_score import class_probabilities, inception_score
from metrics.npz import inspect_npz, read_labels
from metrics.precision_recall import precision_recall
from metrics.reference import reference_statistics
from phases.generation import output_root
from runtime import distributed as dist
from runtime.atomic_file import write_text_atomic
from runtime.console import MetricsLog, info

REFERENCE_HELP = (
    "set evaluate.reference to an ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz from "
    "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/, or make one from "
    "a latent cache with `python scripts/reference_batch.py -c CONFIG`"
)
DIGITS_REFERENCE_HELP = "make it from the demo's cache with `python scripts/reference_batch.py -c CONFIG` (seconds)"


def reference_help(cfg: DictConfig) -> str:
    """What to do about a missing reference batch, for the configured feature network."""
    return DIGITS_REFERENCE_HELP if cfg.evaluate.features == "digits" else REFERENCE_HELP


def feature_network(cfg: DictConfig, device) -> FeatureExtractor:
    """The network whose features the metrics compare: evaluate.features = inception (the TF Inception of ADM's
    evaluator) or digits (the demo's classifier, metrics/digits_features.py)."""
    if cfg.evaluate.features == "digits":
        if not cfg.evaluate.digits_classifier:
            raise ValueError(f"evaluate.features=digits needs evaluate.digits_classifier=PATH; {DIGITS_TRAIN_HELP}")
        return DigitsFeatures(cfg.evaluate.digits_classifier, device)
    return build_inception(cfg.evaluate.inception_weights, device)


def feature_network_name(cfg: DictConfig) -> str:
    """Which network and weights `feature_network` loads, the same on every rank (FID sweeps key their points by it)."""
    ec = cfg.evaluate
    if ec.features == "digits":
        found = ec.digits_classifier and Path(ec.digits_classifier).is_file()
        return f"digits:{file_hash(Path(ec.digits_classifier)) if found else None}"
    return f"inception:{Path(ec.inception_weights).resolve() if ec.inception_weights else 'default'}"


def distance_name(results: dict) -> str:
    """FID means Inception's features; with any other network the number is an FD."""
    return "FID" if "inception" in results["feature_extractor"] else "FD"


def load_evaluator(cfg: DictConfig) -> Optional[FeatureExtractor]:
    """Check the evaluation inputs (every rank) and load the feature network (rank 0; None elsewhere)."""
    if not cfg.evaluate.reference or not Path(cfg.evaluate.reference).is_file():
        raise FileNotFoundError(f"evaluate.reference={cfg.evaluate.reference!r} is not a file: {reference_help(cfg)}")
    inspect_npz(cfg.evaluate.reference)  # its format, before the feature network is loaded
    return feature_network(cfg, dist.device()) if dist.is_main() else None


def reference_cache_dir(cfg: DictConfig) -> Path:
    return Path(cfg.experiment_dir) / "eval" / "reference_cache"


def results_path(cfg: DictConfig, samples: Path) -> Path:
    """evaluate.output, else <run or student stage folder>/eval/<samples stem>.json."""
    if cfg.evaluate.output:
        return Path(cfg.evaluate.output)
    return output_root(cfg, "inference") / "eval" / f"{Path(samples).stem}.json"


def score_npz(
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
    accuracy = label_accuracy(features.logits, samples_path) if extractor.classifies_labels else None
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
        "accuracy": accuracy,
        "num_reference_images": reference.num_images,
        "feature_extractor": extractor.id,
    }


def label_accuracy(logits, samples_path: Path) -> Optional[float]:
    """The share of samples the classifier assigns to the label they were generated for (arr_1); None
    without labels."""
    labels = read_labels(samples_path)
    if labels is None:
        return None
    return float((logits.argmax(axis=1) == labels).mean())


def format_table(results: dict) -> str:
    """The human-readable summary printed before the JSON line."""

    def value(key: str, digits: int = 4) -> str:
        number = results[key]
        return "n/a" if number is None else f"{number:.{digits}f}"

    no_images = "n/a (reference has no arr_0 images)"
    distance = distance_name(results)
    rows = [
        f"samples    {results['samples']} ({results['num_samples']} images)",
        f"reference  {results['reference']} ({results['num_reference_images']} images)",
        f"  {distance:<11s}{value('fid')}",
        f"  sFID       {value('sfid')}",
        f"  IS         {value('is', 2)} +- {value('is_std', 2)}",
        f"  Precision  {value('precision') if results['precision'] is not None else no_images}",
        f"  Recall     {value('recall') if results['recall'] is not None else no_images}",
    ]
    if results.get("accuracy") is not None:
        rows.append(f"  Accuracy   {value('accuracy')} (samples classified as the label they were generated for)")
    return "\n".join(rows)


def write_results(results: dict, path: Path) -> None:
    write_text_atomic(Path(path), json.dumps(results, indent=2) + "\n")


def score(cfg: DictConfig, extractor: FeatureExtractor, samples: Path, show_progress: bool = True) -> dict:
    """score_npz with the evaluate.* settings of `cfg`."""
    ec = cfg.evaluate
    return score_npz(samples, ec.reference, extractor, ec.batch_size, reference_cache_dir(cfg), show_progress,
                     adm_distances=ec.adm_distances)


def score_and_record(cfg: DictConfig, extractor: FeatureExtractor, samples: Path, output: Path,
                     log: bool = True) -> dict:
    """Rank 0: score `samples`, print the table, write the JSON to `output`, log it to wandb (with `log` when
    wandb is on) and print it as the last line of stdout."""
    samples = Path(samples)
    if not samples.is_file():
        raise FileNotFoundError(f"samples file not found: {samples} (run the inference phase or set evaluate.samples)")
    info(f"evaluating {samples} against {cfg.evaluate.reference} with {extractor.id} (precision/recall distances: "
         f"{'float16 with float32 fallback, as ADM' if cfg.evaluate.adm_distances else 'float64'})")
    results = score(cfg, extractor, samples)
    info(format_table(results))
    write_results(results, output)
    if log and cfg.wandb.mode != "disabled":
        metrics = MetricsLog(cfg, "evaluate")  # imports wandb lazily
        metrics.log(0, {key: value for key, value in results.items() if isinstance(value, (int, float))})
        metrics.close()
    print(json.dumps(results), flush=True)  # last line of stdout: machine-readable results
    return results
