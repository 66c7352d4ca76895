"""The `sample` phase: a PNG grid (plus one PNG per image) of the listed classes."""
from __future__ import annotations

import io
import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.utils import make_grid

from phases.generation import load_generator, output_root, to_pil
from runtime import distributed as dist
from runtime.atomic_file import atomic_write
from methods.sampling import sampled_checkpoint
from runtime.config import record_config, sampler_settings
from runtime.console import info


def save_png(image: Image.Image, path: Path) -> Path:
    """Write a PNG atomically (a reader never sees half a picture)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def save_figure(fig, path: Path) -> Path:
    """Write a matplotlib figure as a PNG atomically, then close it."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    with atomic_write(path) as handle:
        handle.write(buffer.getvalue())
    return Path(path)


def grid_image(images: torch.Tensor, columns: int) -> Image.Image:
    """uint8 NHWC images -> one PIL image, `columns` per row, 2 px padding."""
    nchw = images.permute(0, 3, 1, 2)
    grid = make_grid(nchw, nrow=columns, padding=2, pad_value=0)
    return to_pil(grid.permute(1, 2, 0))


def run(cfg: DictConfig) -> Path | None:
    if not dist.is_main():  # a grid is small: rank 0 does it alone
        dist.barrier()
        return None
    settings = sampler_settings(cfg, "sample")
    ckpt = sampled_checkpoint(cfg, settings)
    generator = load_generator(cfg, ckpt, settings, cfg.sample.use_ema, dist.device())
    record_config(cfg, "sample")
    classes = list(cfg.sample.classes)
    if not classes:
        raise ValueError("sample.classes is empty")
    bad = [c for c in classes if not 0 <= c < generator.model_args["num_classes"]]
    if bad:
        raise ValueError(f"sample.classes {bad} outside [0, {generator.model_args['num_classes'] - 1}]")
    labels = torch.tensor([c for c in classes for _ in range(cfg.sample.per_class)])
    seeds = [cfg.seed + i for i in range(len(labels))]
    out = Path(cfg.sample.output or output_root(cfg, "sample") / "samples")
    out.mkdir(parents=True, exist_ok=True)

    chunks = []
    for start in range(0, len(labels), cfg.sample.batch_size):
        stop = start + cfg.sample.batch_size
        chunks.append(generator.images(labels[start:stop], seeds[start:stop], progress=True))
    images = torch.cat(chunks)
    for i, (image, label) in enumerate(zip(images, labels.tolist())):
        to_pil(image).save(out / f"{i:04d}_class{label}.png")
    columns = cfg.sample.per_class if cfg.sample.per_class > 1 else math.ceil(math.sqrt(len(images)))
    grid_path = save_png(grid_image(images, columns), out / "grid.png")
    info(f"wrote {len(images)} images and {grid_path}")
    dist.barrier()
    return grid_path
