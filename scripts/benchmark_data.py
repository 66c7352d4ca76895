"""Throughput of the training data path: LatentDataset + DataLoader, as the train phase builds it.

    python scripts/benchmark_data.py -c configs/demo/digits.yaml [a.b=value ...]
    python scripts/benchmark_data.py -c CONFIG --synthetic 20000    # no cache yet: a temporary random one
    python scripts/benchmark_data.py -c CONFIG --synthetic 20000 --images jpeg   # with REPA's 256 px crops

Keys come from the train phase's shuffled stream sampler (one (index, draw_seed) per sample, batch
train.batch_size / train.grad_accum) unless --plain asks for a shuffled int-key DataLoader. The
loader uses data.num_workers workers. `--images` reads each item's stored crop too (representation
alignment), decoded in the workers: the synthetic cache then stores photo crops of 256 px (sklearn's two
bundled photos, random crops), encoded as the format asks. The last line printed is "<samples/s> samples/s".
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datasets.cache_writer import write_cache  # noqa: E402
from datasets.latent_cache import LatentDataset  # noqa: E402
from runtime.config import load_config  # noqa: E402
from runtime.data_stream import StreamBatchSampler  # noqa: E402

SYNTHETIC_SHAPE = (4, 32, 32)  # SD-VAE latents of 256 px images


def photo_crops(count: int, fmt: str, seed: int = 0, size: int = 256) -> list[np.ndarray]:
    """`count` encoded random crops of sklearn's bundled photos, resized to `size` (real-image statistics)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from datasets.image_codec import encode_image

    photos, rng, out = load_sample_images().images, np.random.default_rng(seed), []
    for k in range(count):
        photo = photos[k % len(photos)]
        side = int(rng.integers(size, min(photo.shape[:2]) + 1))
        y, x = rng.integers(0, photo.shape[0] - side + 1), rng.integers(0, photo.shape[1] - side + 1)
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
        out.append(encode_image(np.asarray(crop).transpose(2, 0, 1), fmt, 95))
    return out


def make_synthetic_cache(path: Path, count: int, seed: int = 0, block: int = 4096, images: str = "none") -> None:
    """`count` random items of SYNTHETIC_SHAPE latents in the real cache layout (with 64 photo crops repeated as
    their images unless `images` is none)."""
    rng = np.random.default_rng(seed)

    def blocks():
        for start in range(0, count, block):
            n = min(block, count - start)
            moments = np.empty((n, 2, 2, *SYNTHETIC_SHAPE), dtype=np.float16)
            moments[:, :, 0] = rng.standard_normal((n, 2, *SYNTHETIC_SHAPE))
            moments[:, :, 1] = rng.uniform(0.01, 0.1, (n, 2, *SYNTHETIC_SHAPE))
            yield moments

    attrs = {
        "source": "synthetic", "autoencoder": "synthetic", "scale_factor": 0.18215, "image_size": 256,
        "latent_shape": list(SYNTHETIC_SHAPE), "precision": "fp32", "item_list_sha256": "",
        "num_listed": count, "image_root": "",
    }
    crops = None
    if images != "none":
        pool = photo_crops(64, images, seed)
        attrs["store_images"] = images
        crops = ([pool[(start + j) % len(pool)] for j in range(min(block, count - start))]
                 for start in range(0, count, block))
    write_cache(
        path, blocks(), labels=rng.integers(0, 1000, count), paths=[f"synthetic/{i}" for i in range(count)],
        class_names=[str(c) for c in range(1000)], attrs=attrs, images=crops,
    )


def measure(loader, seconds: float, warmup_batches: int = 5) -> float:
    """Samples per second over about `seconds`, after the workers have started."""
    def forever():
        while True:  # a finite (int-key) loader starts a new epoch
            yield from loader

    batches = forever()
    for _ in range(warmup_batches):
        next(batches)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(batches)[0])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("overrides", nargs="*", help="a.b=value config overrides")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N",
                        help="if data.cache_path does not exist, benchmark a temporary cache of N random 4x32x32 items")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--images", choices=("none", "jpeg", "png"), default="none",
                        help="read the stored crops too (REPA); with --synthetic, store crops in this format")
    parser.add_argument("--plain", action="store_true", help="shuffled int keys instead of the train stream's keyed batches")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(cfg.data.cache_path)
        if not path.is_file():
            if args.synthetic <= 0:
                raise SystemExit(f"{path} does not exist: run -p extract first, or pass --synthetic N")
            path = Path(tmp) / "synthetic.h5"
            make_synthetic_cache(path, args.synthetic, seed=cfg.seed, images=args.images)
        dataset = LatentDataset(path, cfg.data.sample_posterior, cfg.data.random_flip, cfg.data.in_memory,
                                images=args.images != "none")
        batch = cfg.train.batch_size // cfg.train.grad_accum
        workers = cfg.data.num_workers
        common = dict(num_workers=workers, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)
        if args.plain:
            loader = DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=True, **common)
        else:
            sampler = StreamBatchSampler(range(len(dataset)), cfg.seed, batch, 1, rank=0, world_size=1)
            loader = DataLoader(dataset, batch_sampler=sampler, **common)
        print(f"{path}: {len(dataset)} items, latent {dataset.latent_shape}, batch {batch}, {workers} worker(s), "
              f"{'int keys' if args.plain else 'keyed stream'}, in_memory={cfg.data.in_memory}"
              + (f", with the {dataset.info['image_format']} crops" if args.images != "none" else ""))
        rate = measure(loader, args.seconds)
        del loader
    print(f"{rate:.0f} samples/s")


if __name__ == "__main__":
    main()
