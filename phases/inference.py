"""The `inference` phase: `inference.num_samples` images of the checkpoint -> one ADM-format `.npz`
(phases/npz_generation.py: identical for any number of processes and batch size, resumable), then, with
inference.evaluate, its metrics (phases/scoring.py), the feature network loaded before any sampling.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from methods.sampling import sampled_checkpoint
from phases import scoring
from phases.generation import load_generator, output_root
from phases.npz_generation import generate_npz, inference_identity, sample_labels
from runtime import distributed as dist
from runtime.config import record_config, sampler_settings
from runtime.console import info


def output_path(cfg: DictConfig) -> Path:
    return Path(cfg.inference.output or output_root(cfg, "inference") / "inference" / "samples.npz")


def run(cfg: DictConfig, feature_extractor=None) -> Path:
    """Generate the .npz (and score it when inference.evaluate, with `feature_extractor` if given)."""
    ic = cfg.inference
    out = output_path(cfg)
    evaluator = feature_extractor
    if ic.evaluate and evaluator is None:
        evaluator = scoring.load_evaluator(cfg)  # fail before hours of sampling
    if out.exists():
        info(f"{out} already exists (delete it to regenerate)")
    else:
        settings = sampler_settings(cfg, "inference")
        ckpt = sampled_checkpoint(cfg, settings)
        generator = load_generator(cfg, ckpt, settings, cfg.sample.use_ema, dist.device())
        if dist.is_main():
            record_config(cfg, "inference")
        labels = sample_labels(ic.num_samples, generator.model_args["num_classes"], cfg.seed, ic.class_balanced)
        png_dir = out.with_name(out.stem + "_png") if ic.save_png else None
        generate_npz(generator, labels, cfg.seed, out, inference_identity(cfg, ckpt, settings, ic.num_samples),
                     ic.batch_size, png_dir)
    dist.barrier()
    if ic.evaluate:
        if dist.is_main():
            samples = Path(cfg.evaluate.samples or out)
            scoring.score_and_record(cfg, evaluator, samples, scoring.results_path(cfg, samples))
        dist.barrier()
    elif dist.is_main():
        print(out, flush=True)
    return out
