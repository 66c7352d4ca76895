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
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.digits import digits_images, held_out_start, shifted  # noqa: E402
from models.encoders import encoder_input  # noqa: E402

ARCHITECTURE = "vit_tiny_patch16_224"
SIZES = {"patch_size": 4, "depth": 4}  # with img_size=16: 4x4 tokens; the config's repa.encoder_kwargs


def build(image_size: int = 16) -> torch.nn.Module:
    import timm

    return timm.create_model(ARCHITECTURE, pretrained=False, img_size=image_size, num_classes=10, **SIZES)


def train(steps: int, batch_size: int, seed: int) -> tuple[torch.nn.Module, float]:
    """The classifier and its accuracy on the last fifth of the digits (held out)."""
    torch.manual_seed(seed)
    images, labels = digits_images(16)
    images, labels = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
    split = held_out_start(len(images))
    vit = build()
    mean = torch.tensor(vit.pretrained_cfg["mean"])
    std = torch.tensor(vit.pretrained_cfg["std"])
    optimizer = torch.optim.AdamW(vit.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, steps + 1):
        rows = torch.randint(0, split, (batch_size,), generator=generator)
        x = encoder_input(shifted(images[rows], generator), mean, std, 16)
        loss = F.cross_entropy(vit(x), labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.time() - start:.0f} s", flush=True)
    vit.eval()
    with torch.no_grad():
        guesses = vit(encoder_input(images[split:], mean, std, 16)).argmax(dim=1)
    return vit, (guesses == labels[split:]).float().mean().item()


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
