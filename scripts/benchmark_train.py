"""Training speed of the real train phase (`main.py -p train`): images per second after a warm-up.

    python scripts/benchmark_train.py -c configs/imagenet_256/dit_xl2.yaml train.batch_size=32
    python scripts/benchmark_train.py -c configs/imagenet_256/dit_xl2.yaml train.batch_size=128 train.compile=true
    python scripts/benchmark_train.py -c configs/imagenet_256/dit_xl2.yaml --nproc 8 train.batch_size=256
    python scripts/benchmark_train.py -c configs/demo/digits.yaml data.cache_path=data/digits16.h5

It runs `main.py -c CONFIG -p train [overrides]` as a subprocess (under torchrun when --nproc N > 1)
in a temporary run folder for --warmup + --steps steps, logging every --warmup steps, then reads
the img/s of the log records after the warm-up from logs/train.jsonl. train.batch_size is global
(over all processes), so the result is global too (DESIGN.md's "batch 32 per GPU" on 8 GPUs is
train.batch_size=256 --nproc 8). The steps timed are the train phase's own: data loading, forward,
backward, optimizer, EMA. Only the final checkpoint is written, after the timed steps (DiT-XL/2's
is about 11 GB with the optimizer state: point TMPDIR at a big disk).

Data: data.cache_path when that file exists; otherwise a temporary cache of --items random
latents made by scripts/benchmark_data.py's make_synthetic_cache. Those are 4x32x32 latents of
1000 classes, so they stand in for configs whose model expects exactly that (256 px images through
an 8x down-sampling VAE: every configs/imagenet_256 config); for another geometry (the demo's
16x16x1 pixels), extract a cache first and pass data.cache_path. Random latents train at the
same speed as real ones. With repa.enabled the synthetic cache stores 256 px JPEG photo crops too, and
--random-encoder times the encoder with random weights of its architecture (repa.encoder) when no weights file
is at hand. The last line printed is "<img/s> img/s".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchmark_data import make_synthetic_cache  # noqa: E402
from datasets.latent_cache import read_cache_info  # noqa: E402
from runtime.config import load_config  # noqa: E402
from models.flops import dit_forward_flops  # noqa: E402
from runtime.model_spec import model_args_from_config  # noqa: E402
from scripts.stand_ins import save_random_encoder  # noqa: E402

# Keys this script sets for the timed run; a user override of one of them would change what is timed.
RESERVED_KEYS = ("experiment_dir", "train.max_steps", "train.log_every", "train.ckpt_every",
                 "train.eval_every", "train.sample_every", "train.progress", "wandb.mode")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True, help="experiment YAML under configs/")
    parser.add_argument("overrides", nargs="*", metavar="a.b=value", help="config overrides, as for main.py")
    parser.add_argument("--items", type=int, default=4096,
                        help="items in the synthetic cache when data.cache_path does not exist (default 4096)")
    parser.add_argument("--warmup", type=int, default=20, help="steps not timed (compilation, allocator, workers)")
    parser.add_argument("--steps", type=int, default=100, help="steps timed after the warm-up")
    parser.add_argument("--random-encoder", action="store_true",
                        help="repa.enabled: random weights for repa.encoder (its speed, not its features)")
    parser.add_argument("--nproc", type=int, default=1, help="processes (GPUs); > 1 runs under torchrun --standalone")
    args = parser.parse_args(argv)
    for name in ("items", "warmup", "steps", "nproc"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    reserved = [item for item in args.overrides if item.split("=", 1)[0] in RESERVED_KEYS]
    if reserved:
        parser.error(f"{', '.join(reserved)}: set by this script ({', '.join(RESERVED_KEYS)}); use --warmup/--steps")
    return args


def synthetic_cache(cfg, folder: Path, items: int) -> tuple[Path, list[str]]:
    """A random cache of the latent shape the config's model expects, and the overrides that let it pass
    the train phase's cache check (its autoencoder and image size attributes name a synthetic source)."""
    expected = model_args_from_config(cfg)
    shape = (expected["in_channels"], expected["input_size"], expected["input_size"])
    path = folder / "synthetic.h5"
    make_synthetic_cache(path, items, seed=cfg.seed, images="jpeg" if cfg.repa.enabled else "none")
    info = read_cache_info(path)
    if tuple(info["latent_shape"]) != shape or info["num_classes"] > cfg.model.num_classes:
        raise ValueError(
            f"the synthetic cache holds {'x'.join(map(str, info['latent_shape']))} latents of {info['num_classes']} "
            f"classes, but this config's model expects {'x'.join(map(str, shape))} latents and "
            f"model.num_classes={cfg.model.num_classes}: extract a cache first "
            f"(python main.py -c CONFIG -p extract) and pass data.cache_path=PATH"
        )
    return path, [f"autoencoder.name={info['autoencoder']}", f"data.image_size={info['image_size']}"]


def random_encoder(cfg, folder: Path) -> Path:
    """A file of random weights for the config's REPA encoder (timm's layout)."""
    return save_random_encoder(cfg.repa.encoder, folder / "random_encoder.pth", **dict(cfg.repa.encoder_kwargs))


def train_command(config: Path, overrides: list[str], nproc: int) -> list[str]:
    """`main.py -p train`, under torchrun for several processes."""
    main = [str(ROOT / "main.py"), "-c", str(config), "-p", "train", *overrides]
    if nproc == 1:
        return [sys.executable, *main]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *main]


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"the train phase wrote no log at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def throughput_after(records: list[dict], warmup: int, batch_size: int) -> tuple[float, int, float]:
    """(img/s, steps, seconds) over the logged windows after step `warmup`.

    Each record's img/s covers the steps since the previous record at `batch_size` images per step,
    so that window took steps x batch_size / (img/s) seconds.
    """
    timed = sorted((r for r in records if "img/s" in r), key=lambda r: r["step"])
    steps = [r["step"] for r in timed]
    if warmup not in steps:
        raise ValueError(f"no log record at the end of the warm-up (step {warmup}); logged steps: {steps}")
    total_steps, seconds, previous = 0, 0.0, warmup
    for record in timed[steps.index(warmup) + 1:]:
        window = record["step"] - previous
        total_steps += window
        seconds += window * batch_size / record["img/s"]
        previous = record["step"]
    if total_steps == 0:
        raise ValueError(f"no log record after the warm-up (step {warmup}); logged steps: {steps}")
    return total_steps * batch_size / seconds, total_steps, seconds


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = Path(args.config).resolve()
    total = args.warmup + args.steps
    with tempfile.TemporaryDirectory(prefix="benchmark_train_") as tmp:
        run_dir = Path(tmp) / "run"
        overrides = list(args.overrides)
        try:  # config errors and a cache that cannot stand in for this config, before anything long
            cfg = load_config(config, args.overrides)
            if Path(cfg.data.cache_path).is_file():
                data = f"cache {cfg.data.cache_path}"
            else:
                cache, extra = synthetic_cache(cfg, Path(tmp), args.items)
                overrides += [f"data.cache_path={cache}", *extra]
                data = f"synthetic cache of {args.items} random latents ({' '.join(extra)})"
        except (OSError, ValueError) as err:
            raise SystemExit(f"error: {err}")
        if args.random_encoder and cfg.repa.enabled:
            overrides.append(f"repa.encoder_weights={random_encoder(cfg, Path(tmp))}")
            cfg = load_config(config, overrides)
        overrides += [f"experiment_dir={run_dir}", f"train.max_steps={total}", f"train.log_every={args.warmup}",
                      f"train.ckpt_every={total}", "train.eval_every=0", "train.sample_every=0", "train.progress=false",
                      "wandb.mode=disabled"]
        command = train_command(config, overrides, args.nproc)
        print(" ".join(command), flush=True)
        child_tmp = Path(tmp) / "tmp"  # torchrun's log folders and the like go, and are removed, with the rest
        child_tmp.mkdir()
        done = subprocess.run(command, env={**os.environ, "TMPDIR": str(child_tmp)})
        if done.returncode != 0:
            raise SystemExit(f"the train phase failed (exit code {done.returncode}); its output is above")
        records = read_log(run_dir / "logs" / "train.jsonl")
        extra_flops = alignment_flops(cfg) if cfg.repa.enabled else 0.0  # while the encoder file exists
    tc = cfg.train
    rate, steps, seconds = throughput_after(records, args.warmup, tc.batch_size)
    print(f"{cfg.model.name}, global batch {tc.batch_size} ({tc.batch_size // args.nproc} per process, "
          f"grad_accum {tc.grad_accum}), {args.nproc} process(es), {tc.precision}, compile={tc.compile}, "
          f"grad_checkpointing={cfg.model.grad_checkpointing}; data: {data}")
    print(f"{steps} steps timed after {args.warmup} warm-up steps: {seconds:.2f} s, {steps / seconds:.2f} steps/s, "
          f"{rate / args.nproc:.1f} img/s per process")
    print(efficiency(cfg, records, args.warmup, rate, args.nproc, extra_flops))
    print(f"{rate:.3g} img/s")


def efficiency(cfg, records: list[dict], warmup: int, rate: float, nproc: int, extra_flops: float = 0.0) -> str:
    """Model FLOPs per image and MFU with the train phase's formula (models/flops.py), peak memory, data wait."""
    margs = model_args_from_config(cfg)
    flops = 3 * dit_forward_flops(margs)
    timed = [r for r in records if r.get("step", 0) > warmup]
    parts = [f"{margs['name']}: {flops / 1e9:.1f} GFLOP per training image (3 x forward)"]
    if extra_flops:
        parts.append(f"REPA: + {extra_flops / 1e9:.1f} GFLOP (the encoder's forward, the projector)")
    if timed and "mfu" in timed[-1]:  # logged by the train phase against the device's dense peak
        parts.append(f"MFU {100 * sum(r['mfu'] for r in timed) / len(timed):.1f}%")
    else:
        parts.append("MFU: device peak unknown (set train.peak_tflops)")
    if timed and "max_mem_gib" in timed[-1]:
        parts.append(f"peak memory {max(r['max_mem_gib'] for r in timed):.1f} GiB")
    if timed:
        parts.append(f"data wait {sum(r['data_wait_ms'] for r in timed) / len(timed):.1f} ms/step")
    return "; ".join(parts)


def alignment_flops(cfg) -> float:
    """What REPA adds per training image, as the train phase counts it (methods/alignment.py)."""
    from methods import alignment, registry

    margs = model_args_from_config(cfg)
    cache = {"image_format": "jpeg", "image_size": cfg.data.image_size}
    aligned, encoder = alignment.prepare(cfg, registry.training_spec(cfg), margs, cache, "cpu")
    return alignment.flops_per_image(aligned, encoder, cfg.data.image_size)


if __name__ == "__main__":
    main()
