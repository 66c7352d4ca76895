"""FID over checkpoints: `-p evaluate evaluate.checkpoints=all` (or a list of steps), and train.fid_every.

For every checkpoint of the run not yet evaluated with the same settings, evaluate.num_samples images
are generated (phases/npz_generation.py: multi-process, resumable; evaluate.sampler/steps over the
inference sampler: a fast sampler for curves) and scored against evaluate.reference (phases/scoring.py).
Each result is added to eval/fid_vs_step.json (points keyed by step and a hash of the settings, so a
re-run skips what is done and other settings never mix) and drawn in eval/fid_vs_step.png. The
images are deleted once scored (evaluate.keep_samples keeps them).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from phases import scoring
from phases.generation import load_generator
from phases.npz_generation import generate_npz, sample_labels
from phases.sample import save_figure
from runtime import distributed as dist
from runtime.atomic_file import write_text_atomic
from runtime.checkpoint import checkpoint_dir, list_checkpoints
from runtime.config import ConfigError, sampler_settings
from runtime.console import info

RECORD = "fid_vs_step.json"


def sweep_settings(cfg: DictConfig) -> dict:
    """What the numbers depend on: samples, sampler, seed, weights, reference, feature network."""
    sampler = OmegaConf.to_container(sampler_settings(cfg, "inference"))
    if cfg.evaluate.sampler is not None:
        sampler["sampler"] = cfg.evaluate.sampler
    if cfg.evaluate.steps is not None:
        sampler["steps"] = cfg.evaluate.steps
    return {"num_samples": cfg.evaluate.num_samples, "sampler": sampler, "seed": cfg.seed,
            "use_ema": cfg.sample.use_ema, "class_balanced": cfg.inference.class_balanced,
            "reference": str(Path(cfg.evaluate.reference).resolve()) if cfg.evaluate.reference else None,
            "features": scoring.feature_network_name(cfg)}


def settings_id(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def selected_checkpoints(cfg: DictConfig) -> list[tuple[int, Path]]:
    """evaluate.checkpoints: "all", or a list of steps that must all exist."""
    found = dict(list_checkpoints(checkpoint_dir(cfg.experiment_dir)))
    wanted = cfg.evaluate.checkpoints
    if wanted == "all":
        return sorted(found.items())
    if isinstance(wanted, str) or not all(isinstance(s, int) for s in wanted):
        raise ConfigError(f"evaluate.checkpoints={wanted!r} must be 'all' or a list of steps like [50000,100000]")
    missing = [s for s in wanted if s not in found]
    if missing:
        raise FileNotFoundError(f"no checkpoint for step(s) {missing} in {checkpoint_dir(cfg.experiment_dir)}; "
                                f"found {sorted(found) or 'none'}")
    return [(s, found[s]) for s in sorted(set(wanted))]


def read_record(folder: Path) -> dict:
    path = folder / RECORD
    return json.loads(path.read_text()) if path.is_file() else {"points": []}


def run(cfg: DictConfig, checkpoints: list[tuple[int, Path]] | None = None, evaluator=None,
        settings: dict | None = None) -> list[dict]:
    """Evaluate the checkpoints not yet done (every rank takes part); returns the new points.

    `evaluator` is the loaded feature network (loaded here, before any sampling, when None); `settings`
    the sweep's (sweep_settings(cfg) when None)."""
    folder = Path(cfg.experiment_dir) / "eval"
    settings = sweep_settings(cfg) if settings is None else settings
    key = settings_id(settings)
    checkpoints = selected_checkpoints(cfg) if checkpoints is None else checkpoints
    done = {p["step"] for p in read_record(folder)["points"] if p["settings_id"] == key} if dist.is_main() else set()
    todo = dist.broadcast_object([(s, str(p)) for s, p in checkpoints if s not in done])
    if evaluator is None and todo:
        evaluator = scoring.load_evaluator(cfg)  # the reference and the feature network, before any sampling
    info(f"FID over checkpoints: {len(todo)} to evaluate ({len(checkpoints) - len(todo)} already done) with "
         f"{settings['num_samples']} samples, {settings['sampler']['sampler']} x {settings['sampler']['steps']} steps")
    points = []
    for step, path in todo:
        point = evaluate_checkpoint(cfg, step, Path(path), settings, key, folder, evaluator)
        if point is not None:
            points.append(point)
    if dist.is_main() and (points or done):
        plot(folder, key)
    dist.barrier()
    return points


def evaluate_checkpoint(cfg, step: int, path: Path, settings: dict, key: str, folder: Path, evaluator) -> dict | None:
    """Generate and score one checkpoint's images; rank 0 records the point (other ranks return None)."""
    sampler = OmegaConf.create(settings["sampler"])
    generator = load_generator(cfg, path, sampler, settings["use_ema"], dist.device())
    labels = sample_labels(settings["num_samples"], generator.model_args["num_classes"], settings["seed"],
                           settings["class_balanced"])
    out = folder / "sweep" / f"{step:07d}.npz"
    generate_npz(generator, labels, settings["seed"], out, {**settings, "checkpoint": str(path.resolve())},
                 cfg.inference.batch_size)
    if not dist.is_main():
        return None
    results = scoring.score(cfg, evaluator, out)
    scoring.write_results(results, out.with_suffix(".json"))
    point = {"step": step, "settings_id": key, "checkpoint": str(path),
             **{k: results.get(k) for k in ("fid", "sfid", "is", "precision", "recall")}}
    record = read_record(folder)
    record["points"] = [p for p in record["points"] if (p["step"], p["settings_id"]) != (step, key)] + [point]
    record.setdefault("settings", {})[key] = settings
    write_text_atomic(folder / RECORD, json.dumps(record, indent=1) + "\n")
    if not cfg.evaluate.keep_samples:
        out.unlink(missing_ok=True)
    info(f"step {step}: {scoring.distance_name(results)} {point['fid']:.3f} ({settings['num_samples']} samples)")
    return point


def plot(folder: Path, key: str) -> Path:
    """eval/fid_vs_step.png: FID against the training step for these settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((p["step"], p["fid"]) for p in read_record(folder)["points"] if p["settings_id"] == key)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    ax.plot([s for s, _ in points], [f for _, f in points], "o-")
    ax.set_xlabel("training step")
    ax.set_ylabel("FID")
    ax.set_title(f"FID over checkpoints (settings {key})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, folder / "fid_vs_step.png")
