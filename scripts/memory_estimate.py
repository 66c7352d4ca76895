"""Per-GPU memory of a run's model states under DDP, FSDP and HSDP, computed from the real model built on the meta
device (no memory, no weights): what train.parallel buys before anything is launched.

    python scripts/memory_estimate.py                      # DiT-XL/2 and a 3B-parameter DiT at 8 and 64 GPUs
    python scripts/memory_estimate.py --model DiT-XL/2 --gpus 8 16 --gpus-per-node 8
    python scripts/memory_estimate.py --custom 40 2048 16  # depth, width, heads of a DiT with patch 2

Counted per GPU, in GiB: fp32 master weights (4 bytes a parameter), their fp32 gradients (4), AdamW's two
moments (8) and the EMA (4): 20 bytes a parameter, all of it on every GPU under DDP (whose gradient buckets,
gradient_as_bucket_view off as in DiT's train.py, add up to another 4), divided by the sharding group under
FSDP (every process) and HSDP (the processes of a node). FSDP also holds, for a moment, the gathered bf16
parameters of two blocks (the one computing and the one prefetched) and one block's unsharded fp32
gradients. Activations are left out: they depend on the batch per GPU and model.grad_checkpointing, not on
the strategy (the same under all three).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GIB = 2**30
STATE_BYTES = {"weights": 4, "grads": 4, "adamw": 8, "ema": 4}  # per parameter, fp32


def count(model) -> tuple[int, int]:
    """(all parameters, the largest block's): what is sharded, and what FSDP gathers at a time."""
    total = sum(p.numel() for p in model.parameters())
    block = max((sum(p.numel() for p in b.parameters()) for b in getattr(model, "blocks", [])), default=0)
    return total, block


def per_gpu(total: int, block: int, strategy: str, shard: int) -> dict:
    """GiB per GPU of each model state, and the transient FSDP gathers, for a sharding group of `shard`."""
    divide = 1 if strategy == "ddp" else shard
    out = {name: total * size / divide / GIB for name, size in STATE_BYTES.items()}
    out["buckets"] = total * 4 / GIB if strategy == "ddp" else 0.0
    out["gathered"] = 0.0 if strategy == "ddp" else (2 * block * 2 + block * 4) / GIB
    out["total"] = sum(out.values())
    return out


def build(name: str | None, custom: list[int] | None):
    import torch

    from models import create_model
    from models.dit import DiT

    with torch.device("meta"):
        if custom:
            depth, width, heads = custom
            return f"DiT depth {depth}, width {width}, {heads} heads, patch 2", DiT(
                input_size=32, patch_size=2, in_channels=4, hidden_size=width, depth=depth, num_heads=heads,
                num_classes=1000, learn_sigma=True)
        return name, create_model(name=name, input_size=32, in_channels=4, num_classes=1000)


def table(label: str, model, gpus: list[int], per_node: int) -> list[str]:
    total, block = count(model)
    lines = [f"### {label}: {total / 1e9:.2f}B parameters ({block / 1e6:.1f}M a block)", "",
             "| GPUs | strategy | sharded over | weights | grads | AdamW | EMA | DDP buckets | gathered blocks | total |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in gpus:
        for strategy, shard in (("ddp", 1), ("fsdp", n), ("hsdp", min(per_node, n))):
            if strategy == "hsdp" and shard == n:
                continue  # one node: HSDP is FSDP
            m = per_gpu(total, block, strategy, shard)
            cells = " | ".join(f"{m[k]:.2f}" for k in ("weights", "grads", "adamw", "ema", "buckets", "gathered", "total"))
            lines.append(f"| {n} | {strategy} | {shard if strategy != 'ddp' else '-'} | {cells} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="a registered model name (repeatable); default DiT-XL/2")
    parser.add_argument("--custom", type=int, nargs=3, metavar=("DEPTH", "WIDTH", "HEADS"),
                        help="also a DiT of this shape; default with no --model: 40 2048 16 (3.0B parameters)")
    parser.add_argument("--gpus", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--gpus-per-node", type=int, default=8, help="HSDP's sharding group (train.shard_size)")
    args = parser.parse_args(argv)
    names = args.model or ["DiT-XL/2"]
    custom = args.custom or ([40, 2048, 16] if not args.model else None)
    print("Per-GPU GiB of the model states (activations excluded; see the docstring).\n")
    for name in names:
        print("\n".join(table(*build(name, None), args.gpus, args.gpus_per_node)))
    if custom:
        print("\n".join(table(*build(None, custom), args.gpus, args.gpus_per_node)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
