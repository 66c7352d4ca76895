"""The `evaluate` phase: FID, sFID, IS, precision and recall of a samples `.npz` against an ADM reference batch
(phases/scoring.py), on rank 0; or, with evaluate.checkpoints, FID over the run's checkpoints (phases/fid_sweep.py,
every rank). Prints a table, then, as the last line of stdout, the results as one JSON line, which is also written
to `evaluate.output`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from metrics.features import FeatureExtractor
from metrics.npz import inspect_npz
from phases import fid_sweep, scoring
from phases.generation import output_root
from runtime import distributed as dist
from runtime.config import record_config
from runtime.console import MetricsLog



def samples_path(cfg: DictConfig) -> Path:
    """evaluate.samples, else inference.output, else <run or student stage folder>/inference/samples.npz."""
    path = cfg.evaluate.samples or cfg.inference.output
    return Path(path) if path else output_root(cfg, "inference") / "inference" / "samples.npz"


def sweep(cfg: DictConfig, feature_extractor: Optional[FeatureExtractor] = None) -> dict:
    """FID over checkpoints; the new points also go to logs/evaluate.jsonl and wandb, at their steps."""
    points = fid_sweep.run(cfg, evaluator=feature_extractor)
    if dist.is_main() and points:
        log = MetricsLog(cfg, "evaluate")
        for point in points:
            log.log(point["step"], {k: v for k, v in point.items() if isinstance(v, float)})
        log.close()
    return {"points": points}


def run(cfg: DictConfig, feature_extractor: Optional[FeatureExtractor] = None) -> dict:
    """Evaluate on rank 0 (other ranks return {} at once); returns the results dict."""
    if cfg.evaluate.checkpoints is not None:
        return sweep(cfg, feature_extractor)
    if not dist.is_main():
        return {}
    ec = cfg.evaluate
    if not ec.reference:
        raise ValueError(f"evaluate.reference is not set: {scoring.reference_help(cfg)}")
    samples = samples_path(cfg)
    if not samples.is_file():
        raise FileNotFoundError(f"samples file not found: {samples} (run the inference phase or set evaluate.samples)")
    if not Path(ec.reference).is_file():
        raise FileNotFoundError(f"evaluate.reference={ec.reference}: no such file; {scoring.reference_help(cfg)}")
    inspect_npz(ec.reference)  # both files' formats, before the feature network is loaded
    inspect_npz(samples)
    extractor = feature_extractor if feature_extractor is not None else scoring.feature_network(cfg, dist.device())
    record_config(cfg, "evaluate")
    return scoring.score_and_record(cfg, extractor, samples, scoring.results_path(cfg, samples))
