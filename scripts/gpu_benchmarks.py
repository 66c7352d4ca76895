"""The GPU check's benchmarks (scripts/gpu_check.py --part benchmarks): the real train and generation paths timed
through scripts/benchmark_train.py and scripts/benchmark_sampling.py, and the extraction from JPEG files, beside the
reference numbers of the repos we compare with and our goals."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Callable

from scripts.gpu_steps import (
    DIT, MEANFLOW, REPA, ROOT, Context, Profile, Skipped, data_overrides, launch, make_image_folder, number, run_step,
)

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


# the benchmarks


def _bench_train(ctx: Context, config: str, batch: int, compiled: bool, *overrides: str) -> dict:
    """benchmark_train.py (the train phase on random latents; REPA's encoder with random weights)."""
    warmup, steps = ctx.profile.bench_train[batch]
    output = run_step(ctx, f"bench_train_{Path(config).stem}_{batch}_{compiled}", [
        sys.executable, str(ROOT / "scripts" / "benchmark_train.py"), "-c", config, "--random-encoder",
        "--warmup", str(warmup),
        "--steps", str(steps), "--items", str(max(4 * batch, 64)), f"train.batch_size={batch}", "train.precision=bf16",
        f"train.compile={str(compiled).lower()}", f"data.num_workers={ctx.profile.workers}", *overrides])
    figures = {"img_s": number(r"([\d.e+]+) img/s\s*$", output, "img/s"), "batch": batch, "compiled": compiled}
    mfu = re.findall(r"MFU ([\d.]+)%", output)
    memory = re.findall(r"peak memory ([\d.]+) GiB", output)
    if mfu:
        figures["mfu_percent"] = float(mfu[-1])
    if memory:
        figures["peak_memory_gib"] = float(memory[-1])
    return figures


def _bench_sampling(ctx: Context, name: str, config: str, *overrides: str) -> dict:
    decode = "--random-vae" if ctx.profile.gpu else "--no-decode"  # a 256 px VAE decode takes seconds on a CPU
    output = run_step(ctx, name, [sys.executable, str(ROOT / "scripts" / "benchmark_sampling.py"), "-c", config, decode,
                              "--images", "64" if ctx.profile.gpu else "4", *overrides])
    return {"img_s": number(r"([\d.e+]+) img/s\s*$", output, "img/s"), "decode": decode == "--random-vae"}


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
    output = run_step(ctx, "bench_extract", launch(ctx, 
        "-c", DIT, "-p", "extract", *data_overrides(ctx), f"data.image_root={folder}", f"data.cache_path={cache}",
        "extract.precision=bf16", "extract.batch_size=64", f"experiment_dir={ctx.out / 'runs' / 'bench_extract'}"))
    return {"img_s": number(r"\(([\d.]+) img/s", output, "extraction speed"), "images": p.bench_images}


# ------------------------------------------------------------------------------------------------------------
