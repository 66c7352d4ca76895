"""What storing REPA's crops as JPEG does to the encoder's features: choose extract.jpeg_quality by measuring.

    python scripts/jpeg_quality.py -c configs/imagenet_256/sit_xl2_repa.yaml repa.encoder_weights=dinov2_vitb14_pretrain.pth
    python scripts/jpeg_quality.py -c configs/imagenet_256/sit_xl2_repa.yaml --random-encoder   # no weights at hand
    python scripts/jpeg_quality.py -c configs/demo/digits_repa.yaml                            # the demo's ViT

The config's encoder (repa.encoder, its weights, repa.resolution) sees each crop losslessly and after a JPEG
round trip at each --quality; printed per format: bytes per crop, PSNR, decode time, and the cosine between
the encoder's tokens of the two (mean over tokens and images, and the worst image), which is what the
alignment target loses. Crops: the demo's digits for data.source=digits, else --count random crops of
scikit-learn's two bundled photos resized to data.image_size. A random encoder measures the sensitivity of
the architecture, not of trained features: prefer the real weights.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_data import photo_crops  # noqa: E402
from benchmark_train import random_encoder  # noqa: E402
from datasets.image_codec import decode_image, encode_image  # noqa: E402
from models.encoders import build_encoder  # noqa: E402
from runtime.config import load_config  # noqa: E402


def crops_of(cfg, count: int) -> list[np.ndarray]:
    """uint8 [C, H, W] crops: the digits, or photo crops at the config's image size."""
    if cfg.data.source == "digits":
        from datasets.digits import digits_images

        return [image[None] for image in digits_images(cfg.data.image_size)[0][:count]]
    return [decode_image(data) for data in photo_crops(count, "png", size=cfg.data.image_size)]


def tokens(encoder, crops: list[np.ndarray]) -> torch.Tensor:
    return torch.cat([encoder(torch.from_numpy(np.stack(crops[i:i + 16]))) for i in range(0, len(crops), 16)])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", required=True)
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--quality", type=int, action="append", help="JPEG qualities (default 75 85 90 95 100)")
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--random-encoder", action="store_true", help="random weights of repa.encoder")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    r = cfg.repa
    with tempfile.TemporaryDirectory() as tmp:
        weights = random_encoder(cfg, Path(tmp)) if args.random_encoder else r.encoder_weights
        size = int(cfg.data.image_size)
        probe = build_encoder(r.encoder, weights, int(r.resolution), size, 1, dict(r.encoder_kwargs))
        grid = int(round(probe(torch.zeros(1, 3, size, size, dtype=torch.uint8)).shape[1] ** 0.5))
        encoder = build_encoder(r.encoder, weights, int(r.resolution), size, grid, dict(r.encoder_kwargs))
    crops = crops_of(cfg, args.count)
    with torch.no_grad():
        reference = tokens(encoder, crops)
    print(f"{r.encoder} ({'random weights' if args.random_encoder else weights}), {len(crops)} crops of {size} px")
    print("format       KB/crop  PSNR dB  decode ms  token cos (mean)  token cos (worst image)")
    for quality in args.quality or [75, 85, 90, 95, 100]:
        encoded = [encode_image(c, "jpeg", quality) for c in crops]
        start = time.perf_counter()
        decoded = [decode_image(e) for e in encoded]
        decode_ms = 1e3 * (time.perf_counter() - start) / len(decoded)
        errors = [np.mean((d.astype(np.float64) - c) ** 2) for d, c in zip(decoded, crops)]
        psnr = np.mean([10 * np.log10(255.0 ** 2 / max(e, 1e-10)) for e in errors])
        with torch.no_grad():
            cos = F.cosine_similarity(tokens(encoder, decoded), reference, dim=-1).mean(dim=1)
        kb = np.mean([len(e) for e in encoded]) / 1024
        print(f"jpeg q{quality:<5d} {kb:8.1f} {psnr:8.1f} {decode_ms:10.2f} {cos.mean():17.4f} {cos.min():24.4f}")
    png = [encode_image(c, "png") for c in crops]
    print(f"png          {np.mean([len(e) for e in png]) / 1024:8.1f}      inf          -            1.0000")
    return 0


if __name__ == "__main__":
    sys.exit(main())
