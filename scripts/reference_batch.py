"""A reference batch for `evaluate` from a latent cache: the training images as the model sees them, as an ADM `.npz`.

ADM's ImageNet reference batch is a file of images (arr_0, uint8 NHWC) that `evaluate` turns into feature
statistics (cached per feature network). For a dataset without a published batch (the digits demo, your own
data) this writes the same kind of file from the latent cache `data.cache_path`: each item's unflipped posterior
mean, decoded by the cache's autoencoder (for the demo's identity autoencoder: the pixels), mapped to uint8 as
generated samples are, with the labels as arr_1. Scoring samples against it then compares them with exactly
what the model was trained to reproduce.

    python scripts/reference_batch.py -c configs/demo/digits.yaml [-o data/digits16_reference.npz] [--num N] [--force]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.autoencoder import load_autoencoder  # noqa: E402
from datasets.latent_cache import LatentDataset  # noqa: E402
from datasets.latent_norm import LatentNorm  # noqa: E402
from phases.generation import to_uint8  # noqa: E402
from phases.npz_writer import write_npz  # noqa: E402
from runtime.config import load_config  # noqa: E402


def decoded_batches(cache: LatentDataset, autoencoder, rows: np.ndarray, batch_size: int, device: torch.device):
    """uint8 NHWC images of the cache items `rows`, `batch_size` at a time, in order."""
    for start in range(0, len(rows), batch_size):
        keys = [(int(i), 0) for i in rows[start:start + batch_size]]  # fixed keys: no flip, no posterior noise
        latents = torch.stack([latent for latent, _ in cache.__getitems__(keys)])
        with torch.no_grad():
            yield to_uint8(autoencoder.decode(latents.to(device))).numpy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("-o", "--out", help="default: evaluate.reference of the config")
    parser.add_argument("--num", type=int, default=0, help="the first N items of a random order (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="the order's seed, with --num")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--force", action="store_true", help="write again over an existing file")
    parser.add_argument("overrides", nargs="*", help="config overrides a.b=value")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out or cfg.evaluate.reference or "")
    if not out.name:
        raise SystemExit("no output: pass -o PATH or set evaluate.reference in the config")
    if out.is_file() and not args.force:
        print(f"{out} exists (--force writes it again, e.g. after a new extract)")
        return 0
    # raw moments (scale 1), the posterior mean, never flipped
    cache = LatentDataset(cfg.data.cache_path, sample_posterior=False, random_flip=False, norm=LatentNorm.scalar(1.0))
    info = cache.info
    rows = np.arange(len(cache))
    if args.num:
        if not 0 < args.num <= len(rows):
            raise SystemExit(f"--num must be in 1..{len(rows)} (the cache's items), got {args.num}")
        rows = np.sort(np.random.default_rng(args.seed).permutation(len(rows))[:args.num])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    autoencoder = load_autoencoder(info["autoencoder"], device, scale_factor=info["scale_factor"])
    first = next(decoded_batches(cache, autoencoder, rows[:1], 1, device))
    labels = cache.labels.numpy()[rows]
    write_npz(out, [("arr_0", (len(rows), *first.shape[1:]), np.uint8,
                     decoded_batches(cache, autoencoder, rows, args.batch_size, device)),
                    ("arr_1", (len(rows),), np.int64, [labels])])
    print(f"wrote {out}: {len(rows)} images of {first.shape[1]}x{first.shape[2]}x{first.shape[3]} from "
          f"{cfg.data.cache_path} (autoencoder {info['autoencoder']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
