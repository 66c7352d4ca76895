"""Grids of the same labels and noise from several samplers (and runs) side by side, with their times.

    python scripts/sampler_grids.py -c configs/demo/digits_cld.yaml --panel sscs:25 --panel sscs:50 \
        --panel sscs:100 --panel euler-maruyama:25 --panel euler-maruyama:50 --panel euler-maruyama:100 \
        --per-row 3 -o docs/demo/cld_samplers.png
    python scripts/sampler_grids.py -c configs/demo/digits.yaml --panel ddim:50 \
        --panel configs/demo/digits_ddgan.yaml@ddgan:0 -o docs/demo/diffusion_vs_ddgan.png

A panel is "[CONFIG@]SAMPLER:STEPS [a.b=value ...]": the latest checkpoint of that config's run (or
ckpt=...) sampled through the generation path of `sample` (sample.classes x sample.per_class, image i
from seed + i, the config's cfg scale and precision), so panels of one run differ only in the sampler;
the panel's own overrides (e.g. flow.ode_solver=heun) apply to it alone. Each panel's title has the
sampler, the steps, the values of its own overrides (not paths) and the seconds it took (decoding included); the
same numbers are printed as "<title>: <seconds> s, <img/s> img/s". Overrides after the options apply
to every panel.

    python scripts/sampler_grids.py -c configs/demo/digits.yaml --panel ddim:20 \
        --panel "configs/demo/digits_flow.yaml@ode:20 flow.ode_solver=euler" \
        --panel "configs/demo/digits_flow.yaml@ode:10 flow.ode_solver=heun" -o docs/demo/flow.png
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from phases.distill_report import side_by_side  # noqa: E402
from phases.generation import load_generator  # noqa: E402
from phases.sample import grid_image, save_png  # noqa: E402
from runtime import distributed as dist  # noqa: E402
from methods.sampling import sampled_checkpoint  # noqa: E402
from runtime.config import load_config, sampler_settings  # noqa: E402


UNTITLED = ("experiment_dir", "ckpt")  # panel overrides whose values (paths) stay out of the titles


def parse_panel(spec: str, default_config: str) -> tuple[str, str, int, list[str]]:
    """"[CONFIG@]SAMPLER:STEPS [a.b=value ...]" -> (config, sampler, steps, the panel's overrides)."""
    head, *overrides = spec.split()
    config, _, rest = head.rpartition("@")
    sampler, _, steps = rest.partition(":")
    if not sampler or not steps.isdigit() or not all("=" in o for o in overrides):
        raise SystemExit(f"--panel {spec!r}: expected [CONFIG@]SAMPLER:STEPS [a.b=value ...], e.g. sscs:50")
    return config or default_config, sampler, int(steps), overrides


def panel(config: str, sampler: str, steps: int, own: list[str], overrides: list[str]):
    """(title, grid, seconds, images) of one sampler on one run."""
    cfg = load_config(config, [*overrides, *own, f"sample.sampler={sampler}", f"sample.steps={steps}"])
    settings = sampler_settings(cfg, "sample")
    ckpt = sampled_checkpoint(cfg, settings)
    generator = load_generator(cfg, ckpt, settings, cfg.sample.use_ema, dist.device())
    labels = torch.tensor([c for c in cfg.sample.classes for _ in range(cfg.sample.per_class)])
    seeds = [cfg.seed + i for i in range(len(labels))]
    start = time.perf_counter()
    images = torch.cat([generator.images(labels[i : i + cfg.sample.batch_size], seeds[i : i + cfg.sample.batch_size])
                        for i in range(0, len(labels), cfg.sample.batch_size)])
    seconds = time.perf_counter() - start
    columns = cfg.sample.per_class if cfg.sample.per_class > 1 else math.ceil(math.sqrt(len(labels)))
    shown = [o.split("=", 1)[1] for o in own if o.split("=", 1)[0] not in UNTITLED]
    title = " ".join([f"{sampler} {steps}" if steps else sampler, *shown])
    return f"{title} ({seconds:.1f} s)", grid_image(images, columns), seconds, len(labels)


def stack(rows: list[Image.Image], gap: int = 8) -> Image.Image:
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows) + gap * (len(rows) - 1)), "white")
    y = 0
    for row in rows:
        canvas.paste(row, (0, y))
        y += row.height + gap
    return canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="the default config of the panels")
    parser.add_argument("--panel", action="append", required=True,
                        help="\"[CONFIG@]SAMPLER:STEPS [a.b=value ...]\" (repeatable)")
    parser.add_argument("--per-row", type=int, default=0, help="panels per row (0: all in one row)")
    parser.add_argument("-o", "--output", required=True, help="the PNG to write")
    parser.add_argument("overrides", nargs="*", help="a.b=value, for every panel")
    args = parser.parse_args()
    panels = []
    for spec in args.panel:
        title, grid, seconds, count = panel(*parse_panel(spec, args.config), args.overrides)
        print(f"{title.split(' (')[0]}: {seconds:.2f} s, {count / seconds:.1f} img/s", flush=True)
        panels.append((title, grid))
    per_row = args.per_row or len(panels)
    rows = [side_by_side(panels[i : i + per_row]) for i in range(0, len(panels), per_row)]
    print(save_png(stack(rows), Path(args.output)))


if __name__ == "__main__":
    main()
