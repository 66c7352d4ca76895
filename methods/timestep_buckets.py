"""A per-sample quantity averaged in equal ranges of the timestep, accumulated on the device.

Bucket k holds t in [k T / K, (k + 1) T / K). Sums and counts stay on the device between log
steps (no host sync per step); report() all-reduces them over the ranks once and resets.
"""
from __future__ import annotations

import torch

from runtime import distributed as dist


class TimestepBuckets:
    def __init__(self, num_timesteps: int, buckets: int):
        if not 1 <= buckets <= num_timesteps:
            raise ValueError(f"train.loss_buckets={buckets} must be in 1..{num_timesteps} (0: off)")
        self.num_timesteps = num_timesteps
        self.edges = [k * num_timesteps // buckets for k in range(buckets + 1)]
        self.sums = self.counts = None

    def bucket_of(self, t: torch.Tensor) -> torch.Tensor:
        return torch.bucketize(t, torch.tensor(self.edges[1:-1], device=t.device), right=True)

    def add(self, t: torch.Tensor, values: torch.Tensor) -> None:
        if self.sums is None:
            self.sums = torch.zeros(len(self.edges) - 1, dtype=torch.float64, device=values.device)
            self.counts = torch.zeros_like(self.sums)
        index = self.bucket_of(t)
        self.sums.index_add_(0, index, values.double())
        self.counts.index_add_(0, index, torch.ones_like(values, dtype=torch.float64))

    def names(self, prefix: str) -> list[str]:
        return [f"{prefix}_t{lo:03d}-{hi - 1:03d}" for lo, hi in zip(self.edges[:-1], self.edges[1:])]

    def report(self, prefix: str) -> dict:
        """{prefix_tLLL-HHH: mean} for the buckets that saw a sample; resets the sums."""
        if self.sums is None:
            return {}
        totals = dist.all_reduce_sum(torch.stack([self.sums, self.counts])).cpu()
        self.sums.zero_()
        self.counts.zero_()
        return {name: (s / c).item() for name, s, c in zip(self.names(prefix), totals[0], totals[1]) if c > 0}
