"""The `distill` phase: progressive distillation of a trained DiT into few-step samplers.

Stages start_steps -> start_steps/2 -> ... -> end_steps: the stage with N steps trains a student
(a copy of its teacher) to do in one DDIM step what its teacher does in two, then becomes the next
stage's teacher (Salimans & Ho 2022; methods/distill.py). Every stage runs the shared training
loop, so DDP, precision, checkpoints and exact resume are those of `train`; a finished stage is
not redone. Per stage: `<experiment_dir>/distill/NNNN_steps/` holds its checkpoints, grid.png
(student next to teacher) and stage.json (latent MSEs); at the end distill/steps_vs_quality.png.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from datasets.autoencoder import load_autoencoder
from datasets.latent_cache import LatentDataset, read_cache_info
from datasets.latent_norm import LatentNorm, autoencoder_entry, norm_from_cache
from diffusion.continuous_schedule import ContinuousSchedule
from diffusion.progressive_distillation import stage_step_counts
from diffusion.schedule import get_beta_schedule
from methods import registry
from methods import distill as distill_method
from methods.distill import DistillMethod, Guidance, make_student, stage_dir, student_denoiser
from methods.sampling import check_null_class
from models.flops import dit_forward_flops
from models.pretrained import extract_state_dict
from phases.distill_report import StageEvaluator, write_quality_figure
from phases.generation import load_generator, load_model
from phases.npz_generation import generate_npz, inference_identity, sample_labels
from phases.scoring import load_evaluator, score_and_record
from phases.validation import holdout_split
from runtime import distributed as dist
from runtime import training_loop
from runtime.checkpoint import latest_checkpoint, load_checkpoint
from runtime.config import record_config, to_container
from runtime.console import MetricsLog, info
from runtime.data_stream import mix_seed
from runtime.model_spec import check_cache_matches_config, check_same_model, model_args_from_cache
from runtime.run_identity import check_run_identity
from runtime.run_lock import RunLock

TIME_MAPPING = "t in [0, 1] <-> teacher step T t - 1; log alpha_bar linear between steps; t = 0 is clean data"


@dataclass
class Teacher:
    """What a stage distils from: its denoiser, and the architecture and weights its student copies."""

    denoise: object
    model_args: dict
    weights: dict
    source: str


class StageLog:
    """logs/distill.jsonl (and wandb) records, each tagged with the stage's step count."""

    def __init__(self, log: MetricsLog, steps: int):
        self.log_to, self.steps = log, steps

    def log(self, step: int, metrics: dict) -> None:
        self.log_to.log(step, {"stage_steps": self.steps, **metrics})

    def truncate_after(self, step: int) -> int:
        return self.log_to.truncate_after(step)


@dataclass
class Plan:
    """Everything the guard rails checked, before anything is written."""

    counts: list
    cache: dict
    teacher_path: Path
    loaded: object  # phases.generation.LoadedModel of the original teacher
    guidance: Guidance
    identity: dict
    extractor: object
    items: list
    schedule: ContinuousSchedule
    norm: LatentNorm  # the teacher's latent normalisation (its checkpoint's, else the config's for the cache)


def run(cfg: DictConfig) -> Path:
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    plan = prepare(cfg)
    with RunLock(cfg.experiment_dir):  # one run per folder, for the whole distillation
        check_run_identity(Path(cfg.experiment_dir) / "distill", plan.identity, "a distillation",
                           "restore them (e.g. distill.teacher=...) to continue it, or use another experiment_dir")
        return distil(cfg, plan)


def prepare(cfg: DictConfig) -> Plan:
    """Guard rails: every input is checked before the first stage starts, and nothing is written."""
    dc = cfg.distill
    distill_method.check_config(cfg)
    counts = stage_step_counts(dc.start_steps, dc.end_steps)
    cache = read_cache_info(cfg.data.cache_path)
    check_cache_matches_config(cfg, cache)
    teacher_path = resolve_teacher(cfg)
    loaded = load_teacher(cfg, teacher_path, cache)
    guidance = Guidance(float(dc.cfg_scale), tuple(dc.cfg_range) if dc.cfg_range else None, bool(dc.cfg_all_channels))
    check_guidance(guidance, loaded.model_args)
    identity = {"teacher": str(teacher_path.resolve()), "start_steps": dc.start_steps, "parameterization":
                dc.parameterization, "loss_weight": dc.loss_weight, **guidance.as_dict(),
                "schedule": cfg.diffusion.schedule, "num_steps": cfg.diffusion.num_steps}
    extractor = load_evaluator(cfg) if dc.fid_samples else None  # the reference and the feature network, now
    items, _ = holdout_split(cache["num_items"], cfg.data.holdout)
    stage_settings(cfg, 0, counts[0]).check(dist.world_size())
    schedule = ContinuousSchedule(get_beta_schedule(cfg.diffusion.schedule, cfg.diffusion.num_steps))
    norm = loaded.norm or norm_from_cache(cfg.autoencoder.normalization, cache, cfg.data.cache_path)
    return Plan(counts, cache, teacher_path, loaded, guidance, identity, extractor, items, schedule, norm)


def distil(cfg: DictConfig, plan: Plan) -> Path:
    """Every stage in turn (finished ones are only loaded), then the figure; returns the last student."""
    dc, device, loaded, guidance = cfg.distill, dist.device(), plan.loaded, plan.guidance
    original = loaded.model.to(device).eval().requires_grad_(False)
    channels, classes = loaded.model_args["in_channels"], loaded.model_args["num_classes"]
    teacher_net = torch.compile(original) if dc.compile else original
    teacher_spec = registry.checkpoint_spec(loaded.meta)
    original_denoise = teacher_spec.teacher(teacher_net, loaded.model_args, cfg, guidance.all_channels)
    evaluator = None
    if dist.is_main():  # grids and MSEs are made on rank 0: load the autoencoder now, not after hours
        autoencoder = load_autoencoder(cfg.autoencoder.name, device, norm=plan.norm)
        size = loaded.model_args["input_size"]
        evaluator = StageEvaluator(cfg, plan.schedule, guidance.scale, autoencoder, classes, (channels, size, size),
                                   original_denoise, str(plan.teacher_path), device)
        record_config(cfg, "distill")
    dataset = LatentDataset.from_config(cfg.data, plan.norm)
    info(
        f"distilling {loaded.model_args['name']} from {plan.teacher_path}: {dc.start_steps} teacher steps -> "
        f"{' -> '.join(map(str, plan.counts))} student steps, {dc.iters_per_stage} updates per stage"
        f"{f' ({dc.first_stage_iters} in the first)' if dc.first_stage_iters else ''}, global batch "
        f"{dc.batch_size}, {guidance_text(guidance)}, {dc.parameterization}-prediction, {dc.loss_weight} weighting, "
        f"{dist.world_size()} process(es), {device.type}, {dc.precision}"
    )
    teacher = Teacher(original_denoise, loaded.model_args, loaded.model.state_dict(), str(plan.teacher_path))
    base_metadata = {
        "method": "distill",
        "autoencoder": autoencoder_entry(plan.cache, plan.norm),
        "image_size": int(plan.cache["image_size"]),
        "config": to_container(cfg),
    }
    log = MetricsLog(cfg, "distill")
    try:
        for index, steps in enumerate(plan.counts):
            teacher = run_stage(cfg, index, steps, teacher, guidance, plan.schedule, dataset, plan.items,
                                base_metadata, str(plan.teacher_path), evaluator, log)
            if dc.fid_samples:
                student_fid(cfg, steps, guidance, plan.extractor)
    finally:
        log.close()
    if dist.is_main():
        figure = write_quality_figure(Path(cfg.experiment_dir) / "distill", plan.counts, dc.start_steps)
        info(f"distillation finished: {dc.end_steps}-step student {teacher.source}; {figure}")
    dist.barrier()
    return Path(teacher.source)


def run_stage(cfg, index: int, steps: int, teacher: Teacher, guidance: Guidance, schedule, dataset, items,
              base_metadata: dict, original_path: str, evaluator, log: MetricsLog) -> Teacher:
    """Train (or resume, or skip when finished) the N-step stage; evaluate it; return it as the next teacher."""
    dc = cfg.distill
    device = dist.device()
    folder = stage_dir(cfg.experiment_dir, steps)
    student, margs = make_student(teacher.model_args, teacher.weights, guidance.conditioned)
    method = DistillMethod(student.to(device), teacher.denoise, schedule, steps, dc.parameterization,
                           dc.loss_weight, guidance)
    metadata = {
        **base_metadata,
        "model_args": margs,
        "distill": {  # what sampling with this student needs, and where it came from
            "steps": steps, "teacher_steps": 2 * steps, "stage": index, "parameterization": dc.parameterization,
            "loss_weight": dc.loss_weight, **guidance.as_dict(), "schedule": cfg.diffusion.schedule,
            "num_steps": cfg.diffusion.num_steps, "time_mapping": TIME_MAPPING, "teacher": original_path,
            "stage_teacher": teacher.source,
        },
    }
    info(f"stage {index + 1}: {2 * steps} -> {steps} steps ({folder})")
    started = time.perf_counter()
    offset = sum(stage_iters(dc, i) for i in range(index))  # wandb steps keep rising over the stages
    doubled = index == 0 and (guidance.scale != 1.0 or guidance.conditioned)  # the first teacher's CFG pair
    flops = (3 + 2 * (2 if doubled else 1)) * dit_forward_flops(margs)  # student update + two teacher steps
    last = training_loop.run(stage_settings(cfg, index, steps, flops), method, dataset, items, folder, metadata,
                             StageLog(log, steps), log_offset=offset)
    weights = extract_state_dict(load_checkpoint(last), prefer_ema=True)  # EMA when the student keeps one
    student, _ = make_student(teacher.model_args, weights, guidance.conditioned)  # whole (training may shard it)
    student.to(device).eval().requires_grad_(False)
    student_denoise = student_denoiser(student, schedule, dc.parameterization, margs["in_channels"], guidance.conditioned)
    if evaluator is not None:
        metrics = evaluator.stage(steps, student_denoise, teacher.denoise, folder)
        log.log(offset + stage_iters(dc, index), {"stage_steps": steps, **metrics})
        info(
            f"stage {steps} steps done in {time.perf_counter() - started:.0f} s: latent MSE to its teacher "
            f"{metrics['mse_vs_teacher']:.4g}, to the {dc.start_steps}-step reference {metrics['mse_vs_reference']:.4g} "
            f"(undistilled {steps}-step DDIM: {metrics['ddim_mse_vs_reference']:.4g}); {folder / 'grid.png'}"
        )
    dist.barrier()
    return Teacher(student_denoise, margs, weights, str(last))


def student_fid(cfg: DictConfig, steps: int, guidance: Guidance, evaluator) -> None:
    """FID of the N-step student on distill.fid_samples images (all ranks; resumable), with the seeds and labels of
    the teacher's FID: distill/NNNN_steps/inference/samples.npz and eval/samples.json (read by the figure)."""
    settings = OmegaConf.create({"sampler": distill_method.SAMPLER, "steps": steps, "cfg_scale": guidance.scale,
                                 "eta": 0.0, "cfg_all_channels": None, "cfg_interval": None, "time_shift": 1.0,
                                 "precision": cfg.sample.precision, "compile": False})
    folder = stage_dir(cfg.experiment_dir, steps)
    ckpt = distill_method.locate(cfg.experiment_dir, steps)
    out = folder / "inference" / "samples.npz"
    if not out.exists():
        generator = load_generator(cfg, ckpt, settings, cfg.sample.use_ema, dist.device())
        labels = sample_labels(cfg.distill.fid_samples, generator.model_args["num_classes"], cfg.seed,
                               cfg.inference.class_balanced)
        identity = inference_identity(cfg, ckpt, settings, cfg.distill.fid_samples)
        generate_npz(generator, labels, cfg.seed, out, identity, cfg.inference.batch_size)
    if dist.is_main():
        score_and_record(cfg, evaluator, out, folder / "eval" / "samples.json")
    dist.barrier()


def stage_iters(dc: DictConfig, index: int) -> int:
    return dc.first_stage_iters if index == 0 and dc.first_stage_iters else dc.iters_per_stage


def stage_settings(cfg: DictConfig, index: int, steps: int, flops_per_image: float = 0.0) -> training_loop.LoopSettings:
    """The loop settings of one stage: distill.*, the LR annealed linearly to 0, a seed of its own."""
    dc = cfg.distill
    return training_loop.LoopSettings.from_config(
        dc, seed=mix_seed(cfg.seed, steps), num_workers=cfg.data.num_workers, max_steps=stage_iters(dc, index),
        lr_schedule="linear", desc=f"distill {steps} steps", flops_per_image=flops_per_image,
        parallel=cfg.train.parallel, shard_size=cfg.train.shard_size,  # how the student is spread: train's choice
    )


def resolve_teacher(cfg: DictConfig) -> Path:
    """distill.teacher, else the latest checkpoint of the run's training."""
    if cfg.distill.teacher:
        path = Path(cfg.distill.teacher)
        if not path.exists():  # a file, or a sharded checkpoint folder (consolidated on load)
            raise FileNotFoundError(f"distill.teacher={cfg.distill.teacher}: no such checkpoint file")
        return path
    latest = latest_checkpoint(cfg.experiment_dir)
    if latest is None:
        raise FileNotFoundError(
            f"no teacher: {Path(cfg.experiment_dir) / 'checkpoints'} has no checkpoint; train first (-p train) "
            "or set distill.teacher=PATH (one of our checkpoints or a published DiT checkpoint)"
        )
    return latest


def load_teacher(cfg: DictConfig, path: Path, cache: dict):
    """The teacher model, checked against the config's model, the cache and the diffusion schedule."""
    loaded = load_model(cfg, path, use_ema=cfg.distill.use_teacher_ema)
    spec = registry.checkpoint_spec(loaded.meta)
    if spec.teacher is None:
        teachers = " or ".join(s.title for s in registry.specs() if s.teacher is not None)
        raise ValueError(f"{path} is {spec.title}: progressive distillation starts from {teachers} (to continue a "
                         "distillation, re-run it: it resumes its stages by itself)")
    spec.check_config(cfg)
    check_same_model(loaded.model_args, model_args_from_cache(cfg, cache), f"the teacher {path}")
    stored = (loaded.meta.get("config") or {}).get("diffusion") or {}
    for key in ("num_steps", "schedule"):
        if key in stored and stored[key] != cfg.diffusion[key]:
            raise ValueError(
                f"the teacher {path} was trained with diffusion.{key}={stored[key]} but the config has "
                f"diffusion.{key}={cfg.diffusion[key]}: distil with the teacher's schedule"
            )
    return loaded


def check_guidance(guidance: Guidance, model_args: dict) -> None:
    if guidance.conditioned:
        check_null_class(model_args, f"distill.cfg_range={list(guidance.range)}")
    elif guidance.scale != 1.0:
        check_null_class(model_args, f"distill.cfg_scale={guidance.scale}")


def guidance_text(guidance: Guidance) -> str:
    if guidance.conditioned:
        return f"cfg scale drawn from {list(guidance.range)} (scale-conditioned student)"
    return "no guidance" if guidance.scale == 1.0 else f"cfg scale {guidance.scale} folded into the student"
