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
from pathlib import Path
from typing import Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.gpu_benchmarks import GOALS, REFERENCES, benchmarks  # noqa: E402
from scripts.gpu_steps import (  # noqa: E402
    CPU, DIT, GPU, MEANFLOW, REPA, CheckFailed, Context, Skipped, data_overrides, launch, main_py, number, prepare,
    run_step, torchrun, train_figures, train_overrides,
)
from scripts.process_tree import kill_tree  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# the checks


def check_extract(ctx: Context) -> dict:
    p = ctx.profile
    output = run_step(ctx, "extract", launch(ctx, "-c", DIT, "-p", "extract", *data_overrides(ctx),
                                            "extract.store_images=jpeg", "extract.precision=bf16"))
    from datasets.latent_cache import read_cache_info

    info = read_cache_info(ctx.out / "cache.h5")
    if info["num_items"] != p.classes * p.images_per_class or info["image_format"] != "jpeg":
        raise CheckFailed(f"cache has {info['num_items']} items, images {info['image_format']}")
    return {"items": info["num_items"], "latent_shape": list(info["latent_shape"]),
            "img_s": number(r"\(([\d.]+) img/s", output, "extraction speed")}


def check_train_diffusion(ctx: Context) -> dict:
    overrides = train_overrides(ctx, "diffusion", ctx.profile.dit)
    run_step(ctx, "train_diffusion", launch(ctx, "-c", DIT, "-p", "train", *overrides))
    return train_figures(ctx, "diffusion")


def check_train_compiled(ctx: Context) -> dict:
    if not ctx.profile.gpu:
        raise Skipped("torch.compile is checked on the GPU only (CPU inductor builds take minutes)")
    run_step(ctx, "train_compiled", launch(ctx, "-c", DIT, "-p", "train", "train.compile=true",
                                          *train_overrides(ctx, "compiled", ctx.profile.dit)))
    return train_figures(ctx, "compiled")


def check_flow_repa(ctx: Context) -> dict:
    overrides = [*train_overrides(ctx, "flow_repa", ctx.profile.lightning),
                 f"repa.encoder_weights={ctx.stand_ins['encoder']}", *ctx.profile.repa]
    run_step(ctx, "flow_repa", launch(ctx, "-c", REPA, "-p", "train", *overrides))
    figures = train_figures(ctx, "flow_repa")
    log = (ctx.out / "runs" / "flow_repa" / "logs" / "train.jsonl").read_text().splitlines()
    if "proj_loss" not in json.loads(log[-1]):
        raise CheckFailed("no proj_loss logged: the alignment term did not run")
    return figures


def check_fsdp(ctx: Context) -> dict:
    run_step(ctx, "fsdp", torchrun("-c", DIT, "-p", "train", "train.parallel=fsdp",
                                *train_overrides(ctx, "fsdp", ctx.profile.dit)))
    folders = [f for f in (ctx.out / "runs" / "fsdp" / "checkpoints").iterdir() if f.is_dir()]
    if not folders:
        raise CheckFailed("no sharded checkpoint folder written")
    return train_figures(ctx, "fsdp")


def check_meanflow(ctx: Context) -> dict:
    overrides = train_overrides(ctx, "meanflow", ctx.profile.dit)
    run_step(ctx, "meanflow_train", launch(ctx, "-c", MEANFLOW, "-p", "train", *overrides))
    figures = train_figures(ctx, "meanflow")
    if ctx.profile.gpu:  # the suite samples MeanFlow on the CPU already (tests/test_meanflow_end_to_end.py)
        run_step(ctx, "meanflow_sample", main_py("-c", MEANFLOW, "-p", "sample", *overrides, "sample.per_class=1",
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

    run_step(ctx, "resume_reference", launch(ctx, "-c", DIT, "-p", "train", *overrides("uninterrupted")))
    command = launch(ctx, "-c", DIT, "-p", "train", *overrides("killed"))
    first = ctx.out / "runs" / "killed" / "checkpoints" / f"{every:07d}.pt"  # written atomically: complete
    child = subprocess.Popen(command, cwd=ROOT, env=ctx.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not first.is_file() and child.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    if child.poll() is not None:
        raise CheckFailed(f"the run ended (exit code {child.returncode}) before it could be killed")
    kill_tree(child)  # the launcher and its worker, all gone before the re-run
    output = run_step(ctx, "resume", command)
    resumed = int(number(r"resumed from step (\d+)", output, "'resumed from step'"))
    a, b = _final_state(ctx.out / "runs" / "uninterrupted"), _final_state(ctx.out / "runs" / "killed")
    if a["step"] != steps or b["step"] != steps:
        raise CheckFailed(f"final steps {a['step']} and {b['step']}, not {steps}")
    diff = max((a["ema"][k].float() - b["ema"][k].float()).abs().max().item() for k in a["ema"])
    if diff > (1e-3 if ctx.profile.gpu else 0.0):
        raise CheckFailed(f"the resumed run's EMA differs from the uninterrupted one's by {diff:.3g}")
    return {"resumed_from_step": resumed, "steps": steps, "ema_max_abs_diff": diff}


def check_sample(ctx: Context) -> dict:
    p = ctx.profile
    output = run_step(ctx, "sample", main_py("-c", DIT, "-p", "sample", *train_overrides(ctx, "diffusion", p.dit),
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
    run_step(ctx, "inference", launch(ctx, "-c", DIT, "-p", "inference", *train_overrides(ctx, "diffusion", p.dit),
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
    output = run_step(ctx, "evaluate", main_py("-c", DIT, "-p", "evaluate", *run,
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
        output = run_step(ctx, "pytest_gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", where])
    except CheckFailed as err:
        raise CheckFailed(f"pytest -m gpu failed: {err}") from None
    passed = int(number(r"(\d+) passed", output, "passed count") if " passed" in output else 0)
    skipped = int(number(r"(\d+) skipped", output, "skipped count") if " skipped" in output else 0)
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
