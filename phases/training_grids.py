"""Sample grids during training (train.sample_every): pictures comparable across steps.

Every grid draws the same classes (sample.classes x sample.per_class) from the same noise (image
i from seed + i, its own generator) with the EMA weights and a fast sampler (train.sample_sampler,
train.sample_steps, the config's cfg scale), on rank 0 only (a sharded model's forward needs every
rank: then every rank samples the same grid, rank 0 writes it). It touches no training randomness:
the noise comes from its own generators and every step reseeds the global RNG, so a resumed run
makes the same grids and the same weights. Written to samples/train/NNNNNNN.png and to wandb.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig

from datasets.autoencoder import load_autoencoder
from methods.sampling import generation_sampler
from phases.generation import Generator
from phases.sample import grid_image, save_png
from runtime import distributed as dist
from runtime import parallel
from runtime.config import sampler_settings
from runtime.console import MetricsLog


class TrainingGrids:
    """The periodic hook: __call__(step, model, ema) writes the step's grid (rank 0) and returns {}."""

    def __init__(self, cfg: DictConfig, model_args: dict, metadata: dict, norm, log: MetricsLog):
        tc = cfg.train
        self.settings = sampler_settings(cfg, "sample")  # the cfg scale, channels, interval and shift of `sample`
        self.settings.update({"sampler": tc.sample_sampler, "steps": tc.sample_steps, "eta": 0.0,
                              "precision": tc.precision, "compile": False})
        # A sampler setting that cannot work fails now, not at step 10,000 (building samples nothing).
        generation_sampler(cfg, None, model_args, metadata, self.settings)
        classes = list(cfg.sample.classes)
        bad = [c for c in classes if not 0 <= c < model_args["num_classes"]]
        if not classes or bad:
            raise ValueError(f"sample.classes {classes} (the training grids) must be non-empty and in "
                             f"[0, {model_args['num_classes'] - 1}]")
        self.cfg, self.model_args, self.metadata, self.log = cfg, model_args, metadata, log
        self.labels = torch.tensor([c for c in classes for _ in range(cfg.sample.per_class)])
        self.seeds = [cfg.seed + i for i in range(len(self.labels))]
        self.columns = cfg.sample.per_class if cfg.sample.per_class > 1 else math.ceil(math.sqrt(len(self.labels)))
        self.folder = Path(cfg.experiment_dir) / "samples" / "train"
        self.autoencoder = None
        self.every_rank = cfg.train.parallel in parallel.SHARDED  # a sharded model's forward needs every rank
        if dist.is_main() or self.every_rank:  # loaded now: one that cannot be loaded stops the run before training
            self.autoencoder = load_autoencoder(cfg.autoencoder.name, dist.device(), norm=norm)

    def __call__(self, step: int, model: torch.nn.Module, ema: torch.nn.Module | None) -> dict:
        if not (dist.is_main() or self.every_rank):
            return {}
        net = (ema if ema is not None else model).eval()
        sample = generation_sampler(self.cfg, net, self.model_args, self.metadata, self.settings)
        generator = Generator(net, self.autoencoder, sample, self.model_args, self.settings, dist.device())
        images = []
        for start in range(0, len(self.labels), self.cfg.sample.batch_size):
            stop = start + self.cfg.sample.batch_size
            images.append(generator.images(self.labels[start:stop], self.seeds[start:stop]))
        if dist.is_main():
            path = save_png(grid_image(torch.cat(images), self.columns), self.folder / f"{step:07d}.png")
            self.log.log_image(step, "samples/train", path)
        return {}
