"""Sampling speed of the real generation path (phases.generation: load_generator + Generator.images).

    python scripts/benchmark_sampling.py -c configs/imagenet_256/dit_xl2.yaml --random-vae sample.precision=bf16
    python scripts/benchmark_sampling.py -c configs/imagenet_256/dit_xl2.yaml --random-vae sample.compile=true
    python scripts/benchmark_sampling.py -c configs/imagenet_256/dit_xl2.yaml --no-decode sample.precision=fp32
    python scripts/benchmark_sampling.py -c configs/imagenet_256/dit_xl2.yaml autoencoder.name=vae-ema ckpt=DiT-XL-2-256x256.pt
    python scripts/benchmark_sampling.py -c configs/demo/digits.yaml --images 160
    python scripts/benchmark_sampling.py -c configs/imagenet_256/dit_xl2.yaml --random-vae --distilled 4 sample.cfg_scale=1.5
    python scripts/benchmark_sampling.py -c configs/imagenet_256/sit_xl2.yaml --no-decode sample.sampler=sde sample.steps=250

The model is model.name with random weights, saved to a temporary file: for the diffusion samplers in
the published DiT format (a bare state dict), so load_generator builds it the way it builds
DiT-XL-2-256x256.pt, for the other methods' samplers (ode/sde of flow, ...) as that method's checkpoint with
its settings from the config (flow.*); the geometry from data.cache_path if that file exists, else
from data.image_size and the autoencoder (runtime/model_spec.py). ckpt=PATH uses that checkpoint instead; random weights run at the same
speed. The sampler settings are the sample phase's (sample.sampler, steps, cfg_scale, precision,
compile, batch_size; the ImageNet configs default to 250 DDPM steps, cfg 4.0, bf16, batch 64).
One batch of sample.batch_size images is generated first and not timed (compilation, cuDNN
autotuning), then --images images (rounded up to whole batches, so a compiled model never sees a
new shape), timed from the labels to uint8 images on the host, decoding included.

Decoding needs the autoencoder: an SD-VAE id must be in the local Hugging Face cache or
downloadable; otherwise pass autoencoder.name=<folder saved with save_pretrained>, or
--random-vae (a randomly initialised VAE of the SD-VAE architecture: same speed), or --no-decode
(the generator gets the identity autoencoder, so only the sampler is timed). The last line
printed is "<img/s> img/s".

--distilled N times the sampler of a distilled N-step student made from the same model (the
checkpoint layout `-p distill` writes, with sample.cfg_scale folded in): one forward per step and
image, no CFG doubling. Compare it with the teacher's sampler (e.g. sample.sampler=ddpm
sample.steps=250 sample.cfg_scale=1.5) on the same config.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from methods import registry  # noqa: E402
from models import create_model  # noqa: E402
from phases.generation import load_generator, load_model  # noqa: E402
from runtime import distributed as dist  # noqa: E402
from runtime.config import load_config, sampler_settings  # noqa: E402
from scripts.stand_ins import save_random_vae  # noqa: E402
from runtime.model_spec import model_args_from_config  # noqa: E402

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML under configs/")
    parser.add_argument("overrides", nargs="*", metavar="a.b=value", help="config overrides, as for main.py")
    parser.add_argument("--images", type=int, default=128, help="images timed after the warm-up batch (default 128)")
    parser.add_argument("--distilled", type=int, default=0, metavar="N",
                        help="time a distilled N-step student of the same model (sampler 'distilled')")
    decode = parser.add_mutually_exclusive_group()
    decode.add_argument("--no-decode", action="store_true", help="time the sampler only (identity autoencoder)")
    decode.add_argument("--random-vae", action="store_true",
                        help="decode with a randomly initialised SD-VAE (no weights needed, same speed)")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error("--images must be at least 1")
    if args.distilled < 0:
        parser.error("--distilled must be a positive step count")
    return args


def save_random_model(cfg, path: Path, sampler: str, identity: bool) -> dict:
    """model.name with random weights (seeded by cfg.seed) for `sampler`. For the default method's samplers
    (diffusion) and a real decoder: a bare state dict, as DiT's release; otherwise the train phase's layout
    with the sampler's method and its metadata from the config (the identity autoencoder with `identity`,
    which --no-decode needs). Returns the model args."""
    owner = registry.sampler_owner(sampler) or registry.spec(registry.DEFAULT)
    margs = model_args_from_config(cfg)
    if owner.model_args is not None:
        margs = owner.model_args(cfg, margs)
    torch.manual_seed(cfg.seed)
    weights = create_model(**margs).state_dict()
    if owner.name == registry.DEFAULT and not identity:
        torch.save(weights, path)
        return margs
    autoencoder = ({"name": "identity", "scale_factor": 1.0} if identity else
                   {"name": str(cfg.autoencoder.name), "scale_factor": cfg.autoencoder.scale_factor})
    metadata = {"method": owner.name, **owner.metadata(cfg)} if owner.metadata is not None else {}
    torch.save({"model": weights, "model_args": margs, "autoencoder": autoencoder, **metadata}, path)
    return margs


def prepare(cfg, args: argparse.Namespace, folder: Path) -> tuple[Path, str]:
    """The checkpoint to load and a description of the decoder; edits cfg.autoencoder.name for the options."""
    if args.random_vae:
        if cfg.autoencoder.name == "identity":
            raise ValueError("--random-vae: this config has no autoencoder (autoencoder.name=identity)")
        save_random_vae(folder / "sd-vae-random")
        cfg.autoencoder.name = str(folder / "sd-vae-random")
        decoder = "random SD-VAE"
    elif args.no_decode:
        decoder = "none (--no-decode: identity autoencoder)"
    else:
        decoder = str(cfg.autoencoder.name)
    if cfg.ckpt:
        if args.no_decode:
            raise ValueError("--no-decode times a randomly initialised model: drop ckpt=, or keep ckpt= and pass "
                             "autoencoder.name=<a local VAE folder> (or --random-vae) instead")
        if not Path(cfg.ckpt).exists():
            raise FileNotFoundError(f"ckpt={cfg.ckpt} does not exist")
        return Path(cfg.ckpt), decoder
    path = folder / "random_init.pt"
    save_random_model(cfg, path, sampler_settings(cfg, "sample").sampler, identity=args.no_decode)
    if args.no_decode:
        cfg.autoencoder.name = "identity"  # the saved checkpoint says identity; load_generator checks they agree
    return path, decoder


def save_as_student(cfg, ckpt: Path, steps: int, path: Path) -> Path:
    """The model of `ckpt` in the layout of a distilled `steps`-step student with sample.cfg_scale folded in."""
    loaded = load_model(cfg, ckpt, use_ema=True)
    torch.save({
        "model": loaded.model.state_dict(),
        "model_args": {**loaded.model_args, "guidance_embedding": False},
        "autoencoder": {"name": loaded.autoencoder, "scale_factor": loaded.scale_factor},
        "method": "distill",
        "distill": {"steps": steps, "parameterization": "v", "cfg_scale": float(cfg.sample.cfg_scale),
                    "cfg_range": None, "cfg_all_channels": False, "schedule": cfg.diffusion.schedule,
                    "num_steps": cfg.diffusion.num_steps},
    }, path)
    return path


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    settings = sampler_settings(cfg, "sample")
    device = dist.device()
    batch = cfg.sample.batch_size
    batches = math.ceil(args.images / batch)
    with tempfile.TemporaryDirectory(prefix="benchmark_sampling_") as tmp:
        try:
            ckpt, decoder = prepare(cfg, args, Path(tmp))
            if args.distilled:
                ckpt = save_as_student(cfg, ckpt, args.distilled, Path(tmp) / "student.pt")
                settings.sampler, settings.steps = "distilled", args.distilled
            generator = load_generator(cfg, ckpt, settings, cfg.sample.use_ema, device)
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {err}\n(no autoencoder weights here? try --random-vae or --no-decode)")
        margs = generator.model_args
        labels = torch.arange(batch) % margs["num_classes"]  # the speed does not depend on the labels

        def generate(index: int) -> None:
            first = cfg.seed + index * batch
            generator.images(labels, list(range(first, first + batch)))  # uint8 on the host: synchronised

        start = time.perf_counter()
        generate(0)
        warmup = time.perf_counter() - start
        start = time.perf_counter()
        for index in range(1, batches + 1):
            generate(index)
        seconds = time.perf_counter() - start
    rate = batches * batch / seconds

    guided = float(settings.cfg_scale) != 1.0 and not args.distilled
    print(f"{margs['name']} ({sum(p.numel() for p in generator.model.parameters()):,} parameters), latent "
          f"{margs['in_channels']}x{margs['input_size']}x{margs['input_size']}, {device}; sampler {settings.sampler} "
          f"x {settings.steps} steps, cfg scale {settings.cfg_scale} ({'2 rows' if guided else '1 row'} per image "
          f"per forward), {settings.precision}, compile={settings.compile}, batch {batch}; decoder: {decoder}")
    print(f"warm-up batch {warmup:.2f} s; {batches * batch} images in {batches} batches: {seconds:.2f} s")
    print(f"{rate:.3f} img/s")


if __name__ == "__main__":
    main()
