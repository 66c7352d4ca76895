"""What every step of the GPU check (scripts/gpu_check.py) shares: the sizes of its two modes, the context, running
one command with its log, and the inputs (a JPEG folder, the stand-in networks, the configs' overrides)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.stand_ins import (  # noqa: E402
    TINY_VAE_ARCHITECTURE, save_random_encoder, save_random_inception, save_random_vae,
)

DIT = "configs/imagenet_256/dit_xl2.yaml"
REPA = "configs/imagenet_256/sit_xl2_repa.yaml"
MEANFLOW = "configs/imagenet_256/meanflow_dit_xl2.yaml"

# Reference numbers on one H100 (docs/PERFORMANCE.md gives their sources) and our goals on an H200.
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


def run_step(ctx: Context, name: str, command: list[str], timeout: float = 900) -> str:
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


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
            str(ROOT / "main.py"), *args]


def main_py(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "main.py"), *args]


def launch(ctx: "Context", *args: str) -> list[str]:
    """torchrun on a GPU (NCCL, as users launch); one plain process on the CPU (torchrun's launcher would add
    seconds to every step of the suite's run), except where a process group is needed (FSDP)."""
    return torchrun(*args) if ctx.profile.gpu else main_py(*args)


def number(pattern: str, text: str, what: str) -> float:
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


def train_figures(ctx: Context, run: str) -> dict:
    """The run's last log record: loss, img/s, MFU and peak memory where logged; the loss must be finite."""
    log = ctx.out / "runs" / run / "logs" / "train.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    last = records[-1]
    if not np.isfinite(last.get("loss", float("nan"))):
        raise CheckFailed(f"loss {last.get('loss')} at step {last.get('step')}")
    return {key: last[key] for key in ("step", "loss", "img/s", "mfu", "max_mem_gib") if key in last}


# ------------------------------------------------------------------------------------------------------------
