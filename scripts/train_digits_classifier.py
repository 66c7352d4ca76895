"""The digits demo's feature network for `evaluate`: a small CNN classifier trained here in seconds, saved locally.

FID compares Inception features; for the bundled 16x16 digits (nothing can be downloaded, and Inception sees
little in them) `evaluate.features=digits` compares the features of this classifier instead
(metrics/digits_features.py), and scores whether each generated digit is the one asked for. It trains on four
fifths of the demo's digits (random shifts of up to 2 pixels), reports its accuracy on the held-out fifth, and
writes the file `evaluate.digits_classifier` names (configs/demo/base.yaml: data/digits_classifier.pt).

    python scripts/train_digits_classifier.py [--out data/digits_classifier.pt] [--steps 600] [--force]
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
from metrics.digits_features import DigitsNet, save_classifier, to_input  # noqa: E402


def train(steps: int, batch_size: int, seed: int, image_size: int = 16) -> tuple[DigitsNet, float, int]:
    """The classifier (eval mode), its accuracy on the held-out fifth of the digits, and that fifth's size."""
    torch.manual_seed(seed)
    images, labels = digits_images(image_size)
    images, labels = torch.from_numpy(images)[:, None], torch.from_numpy(labels)
    split = held_out_start(len(images))
    net = DigitsNet(image_size)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(1, steps + 1):
        rows = torch.randint(0, split, (batch_size,), generator=generator)
        _, logits = net(to_input(shifted(images[rows], generator)))
        loss = F.cross_entropy(logits, labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 200 == 0 or step == steps:
            print(f"step {step}/{steps}  loss {loss.item():.4f}  {time.time() - start:.1f} s", flush=True)
    net.eval()
    with torch.no_grad():
        guesses = net(to_input(images[split:]))[1].argmax(dim=1)
    return net, (guesses == labels[split:]).float().mean().item(), len(labels) - split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/digits_classifier.pt")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="train again over an existing file")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.is_file() and not args.force:
        print(f"{out} exists (--force trains again; cached reference statistics follow the new file)")
        return 0
    if args.steps < 1 or args.batch_size < 1:
        raise SystemExit("--steps and --batch-size must be >= 1")
    net, accuracy, held_out = train(args.steps, args.batch_size, args.seed)
    print(f"held-out accuracy {accuracy:.4f} ({held_out} real digits never trained on)")
    save_classifier(net, accuracy, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
