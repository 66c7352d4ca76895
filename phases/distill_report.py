"""What a user sees of a distillation run: per stage a grid and latent MSEs, at the end one figure.

Every stage is measured on the same labels and the same initial noise (image i from seed + i),
so the numbers and the pictures are comparable stage over stage:
  mse_vs_teacher         the student's N-step samples against its teacher's 2N-step samples
  mse_vs_reference       ... against the original teacher's start_steps-step DDIM samples
  ddim_mse_vs_reference  the original teacher's own N-step DDIM (not distilled) against the same
                         reference: what distillation is for
All MSEs are per latent element, on latents as the model sees them (scaled).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image, ImageDraw

from diffusion.continuous_ddim import ddim_sample
from diffusion.noise import per_row_noise
from phases.generation import to_uint8
from phases.sample import grid_image, save_figure, save_png
from runtime.atomic_file import atomic_write, write_text_atomic
from methods.distill import STAGE_FINISHED, stage_dir
from runtime.precision import autocast

STAGE_FILE = STAGE_FINISHED
REFERENCE_FILE = "reference.pt"


class StageEvaluator:
    """Samples fixed (label, noise) sets with a denoiser and turns them into MSEs and grids (rank 0)."""

    def __init__(self, cfg: DictConfig, schedule, scale: float, autoencoder, num_classes: int, latent_shape,
                 original, original_source: str, device: torch.device):
        classes = list(cfg.sample.classes)
        bad = [c for c in classes if not 0 <= c < num_classes]
        if not classes or bad:
            raise ValueError(f"sample.classes {classes} (the distillation grids) must be non-empty and in [0, {num_classes - 1}]")
        self.cfg, self.schedule, self.scale, self.autoencoder = cfg, schedule, scale, autoencoder
        self.original, self.original_source, self.device = original, original_source, device
        self.latent_shape = tuple(latent_shape)
        self.grid_labels = torch.tensor([c for c in classes for _ in range(cfg.sample.per_class)])
        self.eval_labels = torch.arange(cfg.distill.eval_samples) % num_classes
        self.columns = cfg.sample.per_class if cfg.sample.per_class > 1 else len(classes)

    def latents(self, denoise, steps: int, labels: torch.Tensor) -> torch.Tensor:
        """DDIM samples with `steps` steps for `labels`, image i from seed + i; batches of sample.batch_size."""
        out = []
        batch = self.cfg.sample.batch_size
        for start in range(0, len(labels), batch):
            y = labels[start:start + batch].to(self.device)
            gens = [torch.Generator(device=self.device).manual_seed(self.cfg.seed + i) for i in range(start, start + len(y))]
            noise = per_row_noise((len(y), *self.latent_shape), gens, self.device)
            with torch.no_grad(), autocast(self.device, self.cfg.distill.precision):
                z = ddim_sample(lambda z, t: denoise(z, t, y, self.scale), noise, self.schedule, steps)
            out.append(z.float().cpu())
        return torch.cat(out)

    def reference(self, out_dir: Path) -> torch.Tensor:
        """The original teacher's start_steps-step samples of the evaluation set (cached in distill/reference.pt)."""
        dc = self.cfg.distill
        identity = {"start_steps": dc.start_steps, "seed": self.cfg.seed, "eval_samples": dc.eval_samples,
                    "cfg_scale": self.scale, "teacher": self.original_source, "precision": dc.precision}
        path = out_dir / REFERENCE_FILE
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["identity"] == identity:
                return saved["latents"]
        latents = self.latents(self.original, dc.start_steps, self.eval_labels)
        with atomic_write(path) as handle:
            torch.save({"identity": identity, "latents": latents}, handle)
        return latents

    def stage(self, steps: int, student, teacher, folder: Path) -> dict:
        """MSEs and grids of the N-step stage; cached in stage.json so a finished stage is not measured twice."""
        record = folder / STAGE_FILE
        if record.is_file():
            return json.loads(record.read_text())
        reference = self.reference(folder.parent)
        ev = self.eval_labels
        student_eval = self.latents(student, steps, ev)
        metrics = {
            "steps": steps,
            "mse_vs_teacher": _mse(student_eval, self.latents(teacher, 2 * steps, ev)),
            "mse_vs_reference": _mse(student_eval, reference),
            "ddim_mse_vs_reference": _mse(self.latents(self.original, steps, ev), reference),
        }
        grid = self.grid_labels
        panels = [(f"student, {steps} steps", self.images(self.latents(student, steps, grid))),
                  (f"its teacher, {2 * steps} steps", self.images(self.latents(teacher, 2 * steps, grid)))]
        save_png(side_by_side(panels), folder / "grid.png")
        ddim = [(f"teacher DDIM, {steps} steps (not distilled)", self.images(self.latents(self.original, steps, grid)))]
        save_png(side_by_side(ddim), folder / "ddim_grid.png")
        write_text_atomic(record, json.dumps(metrics, indent=1) + "\n")
        return metrics

    def images(self, latents: torch.Tensor) -> Image.Image:
        pixels = self.autoencoder.decode_latents(latents.to(self.device))
        return grid_image(to_uint8(pixels), self.columns)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a.double() - b.double()) ** 2).mean())


def side_by_side(panels: list[tuple[str, Image.Image]], gap: int = 8, header: int = 14) -> Image.Image:
    """Panels next to each other on white, each with its title above it."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [max(image.width, int(measure.textlength(title)) + 4) for title, image in panels]
    height = header + max(image.height for _, image in panels)
    canvas = Image.new("RGB", (sum(widths) + gap * (len(panels) - 1), height), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (title, image), width in zip(panels, widths):
        canvas.paste(image.convert("RGB"), (x, header))
        draw.text((x + 2, 1), title, fill="black")
        x += width + gap
    return canvas


def read_stages(out_dir: Path, counts: list[int]) -> list[dict]:
    """The stage.json records present, in stage order, with "fid" when the student was evaluated."""
    records = []
    for steps in counts:
        folder = stage_dir(out_dir.parent, steps)
        if (folder / STAGE_FILE).is_file():
            record = json.loads((folder / STAGE_FILE).read_text())
            evaluation = folder / "eval" / "samples.json"
            if evaluation.is_file():
                record["fid"] = json.loads(evaluation.read_text()).get("fid")
            records.append(record)
    return records


def write_quality_figure(out_dir: Path, counts: list[int], start_steps: int) -> Path:
    """distill/steps_vs_quality.png: latent MSE against the number of sampling steps, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_stages(out_dir, counts)
    steps = [r["steps"] for r in records]
    fids = [(r["steps"], r["fid"]) for r in records if r.get("fid") is not None]
    fig, axes = plt.subplots(1, 2 if fids else 1, figsize=(11 if fids else 6, 4), dpi=120, squeeze=False)
    ax = axes[0, 0]
    ax.plot(steps, [r["mse_vs_reference"] for r in records], "o-", label=f"student vs the {start_steps}-step teacher")
    ax.plot(steps, [r["ddim_mse_vs_reference"] for r in records], "s--",
            label=f"teacher DDIM (not distilled) vs the {start_steps}-step teacher")
    ax.plot(steps, [r["mse_vs_teacher"] for r in records], "^:", label="student vs its own teacher at 2N steps")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(steps, [str(s) for s in steps])
    ax.invert_xaxis()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("latent MSE per element (same noise)")
    ax.set_title("progressive distillation: quality against steps")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    if fids:
        fid_ax = axes[0, 1]
        fid_ax.plot([s for s, _ in fids], [f for _, f in fids], "o-")
        fid_ax.set_xscale("log", base=2)
        fid_ax.set_xticks([s for s, _ in fids], [str(s) for s, _ in fids])
        fid_ax.invert_xaxis()
        fid_ax.set_xlabel("sampling steps")
        fid_ax.set_ylabel("FID (distill.fid_samples images)")
        fid_ax.set_title("students' FID")
        fid_ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, out_dir / "steps_vs_quality.png")
