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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.digits import fit_classifier  # noqa: E402
from metrics.digits_features import DigitsNet, save_classifier, to_input  # noqa: E402


def train(steps: int, batch_size: int, seed: int, image_size: int = 16) -> tuple[DigitsNet, float, int]:
    """The classifier (eval mode), its accuracy on the held-out fifth of the digits, and that fifth's size."""
    torch.manual_seed(seed)
    net = DigitsNet(image_size)
    accuracy, held_out = fit_classifier(net, lambda n, images: n(to_input(images))[1], steps, batch_size, seed,
                                        lr=3e-3, weight_decay=1e-4, log_every=200)
    return net, accuracy, held_out


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
