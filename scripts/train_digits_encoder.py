"""The digits demo's frozen encoder for representation alignment: a tiny timm ViT trained here, saved locally.

REPA aligns with a pretrained self-supervised encoder (DINOv2 on ImageNet); nothing can be downloaded for the
bundled demo, so this trains a small ViT (`vit_tiny_patch16_224` shape, 4 blocks, 4x4 patches: 16 tokens of
16x16 digits, the DiT-T/4 token grid) to classify the digits, with random shifts, and writes its weights in
timm's layout. The demo's config (configs/demo/digits_repa.yaml) loads it like any ViT: repa.encoder names the
architecture, repa.encoder_weights the file, repa.encoder_kwargs the sizes. A supervised encoder is REPA's
"DeiT" row (its Table 2: every encoder it tried helps, the self-supervised ones most).

    python scripts/train_digits_encoder.py [--out data/digits_vit.pth] [--steps 600]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.digits import fit_classifier  # noqa: E402
from models.encoders import encoder_input  # noqa: E402

ARCHITECTURE = "vit_tiny_patch16_224"
SIZES = {"patch_size": 4, "depth": 4}  # with img_size=16: 4x4 tokens; the config's repa.encoder_kwargs


def build(image_size: int = 16) -> torch.nn.Module:
    import timm

    return timm.create_model(ARCHITECTURE, pretrained=False, img_size=image_size, num_classes=10, **SIZES)


def train(steps: int, batch_size: int, seed: int) -> tuple[torch.nn.Module, float]:
    """The classifier and its accuracy on the last fifth of the digits (held out)."""
    torch.manual_seed(seed)
    vit = build()
    mean = torch.tensor(vit.pretrained_cfg["mean"])
    std = torch.tensor(vit.pretrained_cfg["std"])
    accuracy, _ = fit_classifier(vit, lambda net, images: net(encoder_input(images, mean, std, 16)), steps,
                                 batch_size, seed, lr=1e-3, weight_decay=0.05, log_every=250)
    return vit, accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/digits_vit.pth")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_file():
        print(f"{out} exists (delete it to train again)")
        return 0
    vit, accuracy = train(args.steps, args.batch_size, args.seed)
    print(f"held-out accuracy {accuracy:.3f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(vit.state_dict(), partial)
    partial.replace(out)  # atomically: a killed run leaves no half-written weights
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
