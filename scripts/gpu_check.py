"""The GPU check: every phase and method once on one GPU, then the speed benchmarks beside the reference numbers.

    python scripts/gpu_check.py                      # on a machine with one CUDA GPU: checks, then benchmarks
    python scripts/gpu_check.py --part checks        # only the checks (estimated 5 minutes on an H100-class GPU)
    python scripts/gpu_check.py --part benchmarks    # only the benchmarks (estimated 6 minutes)
    python scripts/gpu_check.py --cpu                # the same script with tiny models on the CPU (the suite runs it)

Nothing is downloaded: the SD-VAE, DINOv2-B and ADM's Inception are built with random weights of their published
architectures (scripts/stand_ins.py), which run at the speed of the real ones through the same code. The checks:
a synthetic JPEG folder is extracted through the VAE (with the crops REPA needs); DiT-XL/2 diffusion trains for a
few steps under `torchrun --nproc_per_node=1` (NCCL) in bf16, eager and compiled; flow matching + REPA
on LightningDiT-XL/2; FSDP; MeanFlow; one run is SIGKILLed after its first checkpoint and run again, and its
weights are compared with an uninterrupted run's; `sample` writes a grid, `inference` an .npz that `evaluate`
scores against itself (FID 0); `pytest -m gpu` runs the CUDA-only tests. The benchmarks time the real train and
generation paths (scripts/benchmark_train.py, scripts/benchmark_sampling.py) and the extraction from JPEG files.

Each check prints one line (PASS / FAIL / SKIP, seconds, its figures); every figure goes to <out>/gpu_check.json
with the device, torch version and date; each step's full output is in <out>/logs/. Exit code 1 if any check
failed. --cpu shrinks everything (a 32 px VAE, DiT-T/2, a 1-block ViT, a few steps), runs one plain process per
step (torchrun only for FSDP) and skips what only a GPU does (compile, the benchmark goals).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.process_tree import kill_tree  # noqa: E402
from scripts.stand_ins import (  # noqa: E402
    TINY_VAE_ARCHITECTURE, save_random_encoder, save_random_inception, save_random_vae,
)

DIT = "configs/imagenet_256/dit_xl2.yaml"
REPA = "configs/imagenet_256/sit_xl2_repa.yaml"
MEANFLOW = "configs/imagenet_256/meanflow_dit_xl2.yaml"

# Reference numbers on one H100 (docs/PERFORMANCE.md gives their sources) and our goals on an H200.
REFERENCES = {
    "train_dit_b32_eager": "DiT fp32 147, fast-DiT fp16 162 img/s (H100)",
    "train_dit_b32_compiled": "bf16 + compile 308 img/s (H100); goal >= 450 img/s",
    "train_dit_b128_eager": "fast-DiT 230 img/s (H100)",
    "train_dit_b128_compiled": "bf16 + compile 516 img/s, 37% MFU (H100); goal >= 50% MFU",
    "sample_ddpm250_fp32": "fp32 1.3 img/s (H100)",
    "sample_ddpm250_bf16_compiled": "bf16 + compile 3.9 img/s (H100); goal >= 8 img/s",
    "extract_sd_vae": "SD-VAE encode about 450 img/s (H100); goal >= 900 img/s end to end",
}
GOALS = {"train_dit_b32_compiled": ("img_s", 450), "train_dit_b128_compiled": ("mfu_percent", 50),
         "sample_ddpm250_bf16_compiled": ("img_s", 8), "extract_sd_vae": ("img_s", 900)}


@dataclass(frozen=True)
class Profile:
    """Sizes of one mode: the real models on a GPU, tiny ones on the CPU (the same code paths)."""

    gpu: bool
    image_size: int
    classes: int
    images_per_class: int
    bench_images: int  # JPEGs extracted by the extraction benchmark
    vae: Optional[dict]  # None: the SD-VAE's architecture
    dit: str
    small_dit: str  # the kill-and-resume run (a DiT-XL/2 checkpoint with AdamW state is 11 GB)
    lightning: str
    encoder: str
    encoder_kwargs: dict
    repa: tuple  # overrides of the REPA run
    batch: int
    steps: int
    sample_steps: int
    inference_images: int
    bench_train: dict  # batch -> (warm-up, timed steps)
    bench_dit: str  # the benchmarks' model, on random 4x32x32 latents
    bench_sampling_steps: int
    workers: int
    model_overrides: tuple = field(default_factory=tuple)


GPU = Profile(gpu=True, image_size=256, classes=4, images_per_class=64, bench_images=2048, vae=None,
              dit="DiT-XL/2", small_dit="DiT-S/2", lightning="LightningDiT-XL/2", encoder="vit_base_patch14_dinov2",
              encoder_kwargs={}, repa=(), batch=32, steps=10, sample_steps=25, inference_images=128,
              bench_train={32: (10, 20), 128: (5, 20)}, bench_dit="DiT-XL/2", bench_sampling_steps=250, workers=8)
CPU = Profile(gpu=False, image_size=32, classes=2, images_per_class=8, bench_images=32, vae=TINY_VAE_ARCHITECTURE,
              dit="DiT-T/2", small_dit="DiT-T/2", lightning="LightningDiT-T/2", encoder="vit_tiny_patch16_224",
              encoder_kwargs={"img_size": 32, "patch_size": 8, "depth": 1},
              repa=("repa.encoder=vit_tiny_patch16_224", "repa.encoder_kwargs={patch_size: 8, depth: 1}",
                    "repa.resolution=256", "repa.depth=2", "repa.projector_dim=64"),
              batch=4, steps=4, sample_steps=5, inference_images=8, bench_train={4: (2, 3)}, bench_dit="DiT-T/8",
              bench_sampling_steps=5, workers=0)


class CheckFailed(RuntimeError):
    """A check's command failed or its result is wrong; the message says which."""


class Skipped(RuntimeError):
    """A check that does not apply here (e.g. compile on the CPU)."""


@dataclass
class Context:
    profile: Profile
    out: Path
    env: dict
    stand_ins: dict = field(default_factory=dict)
    results: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return torch.cuda.get_device_name(0) if self.profile.gpu else "cpu"


# ------------------------------------------------------------------------------------------------------------
# running commands


def _run(ctx: Context, name: str, command: list[str], timeout: float = 900) -> str:
    """Run `command` from the repository root, its output to logs/<name>.log; the output, or CheckFailed."""
    log = ctx.out / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(command, cwd=ROOT, env=ctx.env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"timed out after {timeout:.0f} s: {' '.join(command)}") from None
    output = done.stdout + done.stderr
    log.write_text(" ".join(command) + "\n\n" + output)
    if done.returncode != 0:
        raise CheckFailed(f"exit code {done.returncode} ({log}): {_reason(output)}")
    return output


def _reason(output: str) -> str:
    """The line that says what went wrong: our one-line errors, else the last exception, else the last line."""
    lines = output.strip().splitlines() or [""]
    for pattern in (r"^(config )?error", r"^\w+(Error|Exception)\b"):
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1][:400]
    return lines[-1][:400]


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(ROOT / "main.py"), *args]


def _main(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def _launch(ctx: "Context", *args: str) -> list[str]:
    """torchrun on a GPU (NCCL, as users launch); one plain process on the CPU (torchrun's launcher would add
    seconds to every step of the suite's run), except where a process group is needed (FSDP)."""
    return _torchrun(*args) if ctx.profile.gpu else _main(*args)


def _number(pattern: str, text: str, what: str) -> float:
    found = re.findall(pattern, text)
    if not found:
        raise CheckFailed(f"no {what} in the output")
    return float(found[-1])


# ------------------------------------------------------------------------------------------------------------
# the inputs: a JPEG folder and the stand-in networks


def make_image_folder(folder: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """<folder>/<class>/<i>.jpg: random crops of scikit-learn's two bundled photos (real-image statistics)."""
    from scripts.benchmark_data import photo_crops

    crops = photo_crops(classes * per_class, "jpeg", seed=seed, size=size)
    for k, data in enumerate(crops):
        path = folder / f"class{k % classes:02d}" / f"{k:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes(data))
    return folder


def prepare(ctx: Context) -> None:
    p, s = ctx.profile, ctx.out / "stand_ins"
    ctx.stand_ins["images"] = make_image_folder(ctx.out / "images", p.classes, p.images_per_class, p.image_size)
    ctx.stand_ins["vae"] = save_random_vae(s / "vae", p.vae)
    ctx.stand_ins["encoder"] = save_random_encoder(p.encoder, s / "encoder.pth", **p.encoder_kwargs)
    ctx.stand_ins["inception"] = save_random_inception(s / "inception.pth")


def data_overrides(ctx: Context) -> list[str]:
    """The extracted cache and what the configs need to use it (the VAE stand-in, the image size, workers)."""
    p = ctx.profile
    return [f"data.image_root={ctx.stand_ins['images']}", f"data.cache_path={ctx.out / 'cache.h5'}",
            f"data.image_size={p.image_size}", f"autoencoder.name={ctx.stand_ins['vae']}",
            f"data.num_workers={p.workers}", f"extract.num_workers={p.workers}", "wandb.mode=disabled"]


def train_overrides(ctx: Context, run: str, model: str, steps: int | None = None) -> list[str]:
    p = ctx.profile
    steps = steps or p.steps
    return [*data_overrides(ctx), f"experiment_dir={ctx.out / 'runs' / run}", f"model.name={model}",
            f"train.batch_size={p.batch}", f"train.max_steps={steps}", f"train.ckpt_every={steps}",
            "train.log_every=1", "train.sample_every=0", "train.eval_every=0", "train.progress=false",
            "train.precision=bf16"]


def _train_figures(ctx: Context, run: str) -> dict:
    """The run's last log record: loss, img/s, MFU and peak memory where logged; the loss must be finite."""
    log = ctx.out / "runs" / run / "logs" / "train.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    last = records[-1]
    if not np.isfinite(last.get("loss", float("nan"))):
        raise CheckFailed(f"loss {last.get('loss')} at step {last.get('step')}")
    return {key: last[key] for key in ("step", "loss", "img/s", "mfu", "max_mem_gib") if key in last}


# ------------------------------------------------------------------------------------------------------------
# the checks


def check_extract(ctx: Context) -> dict:
    p = ctx.profile
    output = _run(ctx, "extract", _launch(ctx, "-c", DIT, "-p", "extract", *data_overrides(ctx),
                                            "extract.store_images=jpeg", "extract.precision=bf16"))
    from datasets.latent_cache import read_cache_info

    info = read_cache_info(ctx.out / "cache.h5")
    if info["num_items"] != p.classes * p.images_per_class or info["image_format"] != "jpeg":
        raise CheckFailed(f"cache has {info['num_items']} items, images {info['image_format']}")
    return {"items": info["num_items"], "latent_shape": list(info["latent_shape"]),
            "img_s": _number(r"\(([\d.]+) img/s", output, "extraction speed")}


def check_train_diffusion(ctx: Context) -> dict:
    overrides = train_overrides(ctx, "diffusion", ctx.profile.dit)
    _run(ctx, "train_diffusion", _launch(ctx, "-c", DIT, "-p", "train", *overrides))
    return _train_figures(ctx, "diffusion")


def check_train_compiled(ctx: Context) -> dict:
    if not ctx.profile.gpu:
        raise Skipped("torch.compile is checked on the GPU only (CPU inductor builds take minutes)")
    _run(ctx, "train_compiled", _launch(ctx, "-c", DIT, "-p", "train", "train.compile=true",
                                          *train_overrides(ctx, "compiled", ctx.profile.dit)))
    return _train_figures(ctx, "compiled")


def check_flow_repa(ctx: Context) -> dict:
    overrides = [*train_overrides(ctx, "flow_repa", ctx.profile.lightning),
                 f"repa.encoder_weights={ctx.stand_ins['encoder']}", *ctx.profile.repa]
    _run(ctx, "flow_repa", _launch(ctx, "-c", REPA, "-p", "train", *overrides))
    figures = _train_figures(ctx, "flow_repa")
    log = (ctx.out / "runs" / "flow_repa" / "logs" / "train.jsonl").read_text().splitlines()
    if "proj_loss" not in json.loads(log[-1]):
        raise CheckFailed("no proj_loss logged: the alignment term did not run")
    return figures


def check_fsdp(ctx: Context) -> dict:
    _run(ctx, "fsdp", _torchrun("-c", DIT, "-p", "train", "train.parallel=fsdp",
                                *train_overrides(ctx, "fsdp", ctx.profile.dit)))
    folders = [f for f in (ctx.out / "runs" / "fsdp" / "checkpoints").iterdir() if f.is_dir()]
    if not folders:
        raise CheckFailed("no sharded checkpoint folder written")
    return _train_figures(ctx, "fsdp")


def check_meanflow(ctx: Context) -> dict:
    overrides = train_overrides(ctx, "meanflow", ctx.profile.dit)
    _run(ctx, "meanflow_train", _launch(ctx, "-c", MEANFLOW, "-p", "train", *overrides))
    figures = _train_figures(ctx, "meanflow")
    if ctx.profile.gpu:  # the suite samples MeanFlow on the CPU already (tests/test_meanflow_end_to_end.py)
        _run(ctx, "meanflow_sample", _main("-c", MEANFLOW, "-p", "sample", *overrides, "sample.per_class=1",
                                           "sample.classes=[0,1]"))
        if not (ctx.out / "runs" / "meanflow" / "samples" / "grid.png").is_file():
            raise CheckFailed("no MeanFlow grid written")
    return figures


def _final_state(run_dir: Path) -> dict:
    from runtime.checkpoint import load_checkpoint

    latest = sorted((run_dir / "checkpoints").glob("*.pt"))[-1]
    return load_checkpoint(latest)


def check_kill_and_resume(ctx: Context) -> dict:
    """SIGKILL the run as soon as its first checkpoint exists, run it again: it resumes and ends where an
    uninterrupted run ends (bit-identical on the CPU; within CUDA's non-deterministic reductions on a GPU)."""
    steps, every = (24, 4) if ctx.profile.gpu else (8, 2)

    def overrides(run):
        return [*train_overrides(ctx, run, ctx.profile.small_dit, steps), f"train.ckpt_every={every}",
                "train.keep_last=0"]

    _run(ctx, "resume_reference", _launch(ctx, "-c", DIT, "-p", "train", *overrides("uninterrupted")))
    command = _launch(ctx, "-c", DIT, "-p", "train", *overrides("killed"))
    first = ctx.out / "runs" / "killed" / "checkpoints" / f"{every:07d}.pt"  # written atomically: complete
    child = subprocess.Popen(command, cwd=ROOT, env=ctx.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not first.is_file() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if child.poll() is not None:
        raise CheckFailed(f"the run ended (exit code {child.returncode}) before it could be killed")
    kill_tree(child)  # the launcher and its worker, all gone before the re-run
    output = _run(ctx, "resume", command)
    resumed = int(_number(r"resumed from step (\d+)", output, "'resumed from step'"))
    a, b = _final_state(ctx.out / "runs" / "uninterrupted"), _final_state(ctx.out / "runs" / "killed")
    if a["step"] != steps or b["step"] != steps:
        raise CheckFailed(f"final steps {a['step']} and {b['step']}, not {steps}")
    diff = max((a["ema"][k].float() - b["ema"][k].float()).abs().max().item() for k in a["ema"])
    if diff > (1e-3 if ctx.profile.gpu else 0.0):
        raise CheckFailed(f"the resumed run's EMA differs from the uninterrupted one's by {diff:.3g}")
    return {"resumed_from_step": resumed, "steps": steps, "ema_max_abs_diff": diff}


def check_sample(ctx: Context) -> dict:
    p = ctx.profile
    output = _run(ctx, "sample", _main("-c", DIT, "-p", "sample", *train_overrides(ctx, "diffusion", p.dit),
                                       "sample.sampler=ddim", f"sample.steps={p.sample_steps}", "sample.per_class=2",
                                       "sample.classes=[0,1]", "sample.cfg_scale=1.5"))
    grid = ctx.out / "runs" / "diffusion" / "samples" / "grid.png"
    if not grid.is_file():
        raise CheckFailed(f"no grid at {grid}")
    return {"grid": str(grid), "lines": len(output.splitlines())}


def _samples_npz(ctx: Context) -> Path:
    return ctx.out / "runs" / "diffusion" / "inference" / "samples.npz"


def check_inference(ctx: Context) -> dict:
    p = ctx.profile
    start = time.perf_counter()
    _run(ctx, "inference", _launch(ctx, "-c", DIT, "-p", "inference", *train_overrides(ctx, "diffusion", p.dit),
                                     "inference.sampler=ddim", f"inference.steps={p.sample_steps}",
                                     f"inference.num_samples={p.inference_images}", "inference.batch_size=64"))
    with np.load(_samples_npz(ctx)) as data:
        shape = data["arr_0"].shape
    if shape != (p.inference_images, p.image_size, p.image_size, 3):
        raise CheckFailed(f"arr_0 has shape {shape}")
    return {"images": shape[0], "seconds_with_startup": time.perf_counter() - start}


def check_evaluate(ctx: Context) -> dict:
    npz = _samples_npz(ctx)
    if not npz.is_file():
        raise Skipped("no samples (the inference check failed)")
    run = train_overrides(ctx, "diffusion", ctx.profile.dit)
    output = _run(ctx, "evaluate", _main("-c", DIT, "-p", "evaluate", *run,
                                         f"evaluate.samples={npz}", f"evaluate.reference={npz}",
                                         f"evaluate.inception_weights={ctx.stand_ins['inception']}"))
    results = json.loads([line for line in output.splitlines() if line.startswith("{")][-1])  # the JSON line
    if abs(results["fid"]) > 0.05:  # 0 up to sqrtm's round-off on rank-deficient covariances (few samples)
        raise CheckFailed(f"FID of the samples against themselves is {results['fid']}, not 0")
    return {key: results[key] for key in ("fid", "sfid", "is", "precision", "recall")}


def check_pytest_gpu(ctx: Context) -> dict:
    """`pytest -m gpu`: the CUDA-only tests; on the CPU all of them must be collected and skipped."""
    try:
        where = "tests" if ctx.profile.gpu else "tests/test_gpu.py"  # the CPU only shows they are collected and skip
        output = _run(ctx, "pytest_gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", where])
    except CheckFailed as err:
        raise CheckFailed(f"pytest -m gpu failed: {err}") from None
    passed = int(_number(r"(\d+) passed", output, "passed count") if " passed" in output else 0)
    skipped = int(_number(r"(\d+) skipped", output, "skipped count") if " skipped" in output else 0)
    if ctx.profile.gpu and (skipped or not passed):
        raise CheckFailed(f"{passed} passed, {skipped} skipped: every gpu test must run on a GPU")
    if not ctx.profile.gpu and (passed or not skipped):
        raise CheckFailed(f"{passed} passed, {skipped} skipped on the CPU: the gpu tests must skip")
    return {"passed": passed, "skipped": skipped}


CHECKS: list[tuple[str, Callable]] = [
    ("extract", check_extract), ("train_diffusion", check_train_diffusion), ("train_compiled", check_train_compiled),
    ("flow_repa", check_flow_repa), ("fsdp", check_fsdp), ("meanflow", check_meanflow),
    ("kill_and_resume", check_kill_and_resume), ("sample", check_sample), ("inference", check_inference),
    ("evaluate", check_evaluate), ("pytest_gpu", check_pytest_gpu),
]
NEEDS_CACHE = {"train_diffusion", "train_compiled", "flow_repa", "fsdp", "meanflow", "kill_and_resume", "sample",
               "inference", "evaluate"}


# ------------------------------------------------------------------------------------------------------------
# the benchmarks


def _bench_train(ctx: Context, config: str, batch: int, compiled: bool, *overrides: str) -> dict:
    """benchmark_train.py (the train phase on random latents; REPA's encoder with random weights)."""
    warmup, steps = ctx.profile.bench_train[batch]
    output = _run(ctx, f"bench_train_{Path(config).stem}_{batch}_{compiled}", [
        sys.executable, str(ROOT / "scripts" / "benchmark_train.py"), "-c", config, "--random-encoder",
        "--warmup", str(warmup),
        "--steps", str(steps), "--items", str(max(4 * batch, 64)), f"train.batch_size={batch}", "train.precision=bf16",
        f"train.compile={str(compiled).lower()}", f"data.num_workers={ctx.profile.workers}", *overrides])
    figures = {"img_s": _number(r"([\d.e+]+) img/s\s*$", output, "img/s"), "batch": batch, "compiled": compiled}
    mfu = re.findall(r"MFU ([\d.]+)%", output)
    memory = re.findall(r"peak memory ([\d.]+) GiB", output)
    if mfu:
        figures["mfu_percent"] = float(mfu[-1])
    if memory:
        figures["peak_memory_gib"] = float(memory[-1])
    return figures


def _bench_sampling(ctx: Context, name: str, config: str, *overrides: str) -> dict:
    decode = "--random-vae" if ctx.profile.gpu else "--no-decode"  # a 256 px VAE decode takes seconds on a CPU
    output = _run(ctx, name, [sys.executable, str(ROOT / "scripts" / "benchmark_sampling.py"), "-c", config, decode,
                              "--images", "64" if ctx.profile.gpu else "4", *overrides])
    return {"img_s": _number(r"([\d.e+]+) img/s\s*$", output, "img/s"), "decode": decode == "--random-vae"}


def benchmarks(ctx: Context) -> list[tuple[str, Callable]]:
    p = ctx.profile
    dit, light = [f"model.name={p.bench_dit}"], [f"model.name={p.lightning}"]
    encoder = [] if p.gpu else list(p.repa)  # (the REPA benchmark runs on a GPU only)
    batches = sorted(p.bench_train)
    rows = []
    for batch in batches:
        tag = f"b{batch}" if p.gpu else f"b{batch}_cpu"
        rows.append((f"train_dit_{tag}_eager", lambda b=batch: _bench_train(ctx, DIT, b, False, *dit)))
        if p.gpu:
            rows.append((f"train_dit_{tag}_compiled", lambda b=batch: _bench_train(ctx, DIT, b, True, *dit)))
    big = batches[-1]
    rows.append(("train_lightningdit_flow_repa", lambda: _gpu_only(lambda: _bench_train(
        ctx, REPA, big, False, *light, *encoder), p)))  # the CPU run trains it in the flow_repa check
    steps = p.bench_sampling_steps
    batch = "sample.batch_size=64" if p.gpu else "sample.batch_size=4"
    ddpm = ["sample.sampler=ddpm", f"sample.steps={steps}", "sample.cfg_scale=1.5", batch]
    ode = ["sample.sampler=ode", f"sample.steps={min(50, steps)}", "sample.cfg_scale=1.8",
           "sample.cfg_interval=[0,0.7]", batch, "sample.precision=bf16"]
    rows += [
        ("sample_ddpm250_fp32", lambda: _bench_sampling(ctx, "sample_ddpm_fp32", DIT, *dit, *ddpm,
                                                        "sample.precision=fp32")),
        ("sample_ddpm250_bf16_compiled", lambda: _gpu_only(lambda: _bench_sampling(
            ctx, "sample_ddpm_bf16", DIT, *dit, *ddpm, "sample.precision=bf16", "sample.compile=true"), p)),
        ("sample_flow_ode50_interval", lambda: _gpu_only(lambda: _bench_sampling(
            ctx, "sample_ode", REPA, *dit, *ode), p)),
        ("sample_meanflow_1step", lambda: _gpu_only(lambda: _bench_sampling(
            ctx, "sample_meanflow", MEANFLOW, *dit, batch, "sample.precision=bf16"), p)),
        ("extract_sd_vae", lambda: bench_extract(ctx)),
    ]
    return rows


def _gpu_only(function: Callable, profile: Profile) -> dict:
    """Benchmarks whose code path the CPU run already covers once (benchmark_sampling.py with the DDPM row; the
    samplers themselves are in the suite): on the CPU they would only add minutes."""
    if not profile.gpu:
        raise Skipped("timed on the GPU only (the CPU run covers this benchmark's code path once)")
    return function()


def bench_extract(ctx: Context) -> dict:
    """JPEG files -> decode workers -> crop -> the VAE (both flips, bf16) -> cache: the extract phase's own timing."""
    p = ctx.profile
    folder = make_image_folder(ctx.out / "bench_images", 8, p.bench_images // 8, p.image_size, seed=1)
    cache = ctx.out / "bench_cache.h5"
    cache.unlink(missing_ok=True)
    output = _run(ctx, "bench_extract", _launch(ctx, 
        "-c", DIT, "-p", "extract", *data_overrides(ctx), f"data.image_root={folder}", f"data.cache_path={cache}",
        "extract.precision=bf16", "extract.batch_size=64", f"experiment_dir={ctx.out / 'runs' / 'bench_extract'}"))
    return {"img_s": _number(r"\(([\d.]+) img/s", output, "extraction speed"), "images": p.bench_images}


# ------------------------------------------------------------------------------------------------------------
# the report


def _line(kind: str, name: str, status: str, seconds: float, figures: dict, message: str, gpu: bool) -> str:
    """One line per check: status, seconds, figures, the reference numbers (GPU figures only), why."""
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in figures.items()
                      if k != "grid")
    reference = f" [{REFERENCES[name]}]" if name in REFERENCES and gpu else ""
    why = f" -- {message}" if message else ""
    return f"{status:4s} {kind} {name} ({seconds:.1f} s){': ' + shown if shown else ''}{reference}{why}"


def _attempt(ctx: Context, kind: str, name: str, function: Callable, skip: str = "") -> None:
    start = time.perf_counter()
    figures, status, message = {}, "PASS", skip
    if skip:
        status = "SKIP"
    else:
        try:
            figures = function()
        except Skipped as why:
            status, message = "SKIP", str(why)
        except CheckFailed as err:
            status, message = "FAIL", str(err)
        except Exception as err:  # a bug in a check: report it like a failure, go on with the others
            status, message = "FAIL", f"{type(err).__name__}: {err}"
    seconds = time.perf_counter() - start
    goal = GOALS.get(name)
    if status == "PASS" and goal and ctx.profile.gpu and goal[0] in figures:
        figures["goal_met"] = figures[goal[0]] >= goal[1]
    ctx.results.setdefault(kind, {})[name] = {"status": status, "seconds": seconds, "figures": figures,
                                             "message": message, "reference": REFERENCES.get(name)}
    print(_line(kind, name, status, seconds, figures, message, ctx.profile.gpu), flush=True)
    write_report(ctx)


def write_report(ctx: Context) -> None:
    report = {"device": ctx.device, "torch": torch.__version__, "cuda": torch.version.cuda,
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "mode": "gpu" if ctx.profile.gpu else "cpu",
              **ctx.results}
    (ctx.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny models on the CPU (the suite runs this mode)")
    parser.add_argument("--part", choices=("all", "checks", "benchmarks"), default="all")
    parser.add_argument("--only", default="", help="a regular expression: only the checks/benchmarks it matches")
    parser.add_argument("--out", default="runs/gpu_check")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU visible: run on a GPU machine, or pass --cpu for the tiny CPU version")
    profile = CPU if args.cpu else GPU
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if args.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU mode on a GPU machine stays on the CPU
    ctx = Context(profile, out, env)
    print(f"gpu_check on {ctx.device} (torch {torch.__version__}), output in {out}", flush=True)
    start = time.perf_counter()
    prepare(ctx)
    print(f"prepared the JPEG folder and the stand-in networks in {time.perf_counter() - start:.1f} s", flush=True)
    selected = lambda name: re.search(args.only, name) is not None
    if args.part in ("all", "checks"):
        for name, check in CHECKS:
            if not selected(name):
                continue
            no_cache = name in NEEDS_CACHE and not (out / "cache.h5").is_file()
            skip = "no latent cache (the extract check failed)" if no_cache else ""
            _attempt(ctx, "check", name, lambda c=check: c(ctx), skip)
    if args.part in ("all", "benchmarks"):
        for name, bench in benchmarks(ctx):
            if selected(name):
                _attempt(ctx, "benchmark", name, bench)
    failed = [name for kind in ctx.results.values() for name, r in kind.items() if r["status"] == "FAIL"]
    print(f"{'FAILED: ' + ', '.join(failed) if failed else 'all passed'} in {time.perf_counter() - start:.0f} s; "
          f"figures in {out / 'gpu_check.json'}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
