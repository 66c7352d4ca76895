"""Turn a sharded checkpoint folder (train.parallel=fsdp|hsdp) into one single-file checkpoint.

    python scripts/consolidate_checkpoint.py runs/big/checkpoints/0050000 -o dit_xl_50k.pt
    python scripts/consolidate_checkpoint.py runs/big/checkpoints/0050000 -o weights.pt --weights-only

Sampling, inference, distillation and model.init_from read folders directly; a single file is for sharing,
for tools that only read files, and for continuing the run with train.parallel=ddp from a copy. The output
is written atomically and holds exactly what a DDP run's checkpoint holds (whole tensors, the optimizer
states keyed by position), loadable with torch.load(..., weights_only=True). --weights-only drops what only
training needs (AdamW's moments, the RNG, the scaler): half the size, for sampling and sharing.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAINING_ONLY = ("optimizers", "scaler", "rng", "method_state")  # dropped by --weights-only


def consolidated(folder: Path, weights_only: bool) -> dict:
    """The folder as a single-file checkpoint's dict (with --weights-only: the weights and metadata only)."""
    from runtime.checkpoint import load_checkpoint
    from runtime.sharded_checkpoint import is_sharded

    if not is_sharded(folder):
        raise ValueError(f"{folder} is not a finished sharded checkpoint folder (a checkpoints/NNNNNNN/ of a "
                         "train.parallel=fsdp|hsdp run)")
    state = load_checkpoint(folder)
    if weights_only:
        for key in TRAINING_ONLY:
            state.pop(key, None)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="a sharded checkpoint folder, e.g. checkpoints/0050000")
    parser.add_argument("-o", "--out", type=Path, required=True, help="the single .pt file to write")
    parser.add_argument("--weights-only", action="store_true",
                        help="keep the weights (raw and EMA) and the metadata, not the optimizer state")
    args = parser.parse_args(argv)
    import torch

    from runtime.atomic_file import atomic_write

    if args.out.resolve() == args.folder.resolve() or args.out.is_dir():
        parser.error(f"-o {args.out}: give a file name, not a folder")
    try:
        state = consolidated(args.folder, args.weights_only)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(args.out) as handle:
        torch.save(state, handle)
    parameters = sum(t.numel() for t in state["model"].values())
    print(f"wrote {args.out} (step {state.get('step', '?')}, {parameters:,} parameters"
          f"{', weights only' if args.weights_only else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
