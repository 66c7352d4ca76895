"""The training data order: one infinite, seeded stream of (index, draw_seed) keys.

Position p in the stream (p = 0, 1, 2, ...) belongs to epoch p // N and is item
perm_epoch[p % N], where perm_epoch is a permutation seeded by (seed, epoch). Global batch s
covers positions [s*B, (s+1)*B); rank r of W takes its own contiguous slice of every
micro-batch. So the data a step sees is a function of (seed, step) alone: resuming at step s
needs nothing but s, and the same global batch is seen whatever the number of processes.
Each key also carries a draw seed (derived from the position) that fixes the random flip and
the posterior noise of that draw (see datasets.latent_cache.LatentDataset).
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64-style mixing)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
        value = value * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 29
    return value & _MASK


class StreamBatchSampler(Sampler[list]):
    """Yields this rank's micro-batches of keys, starting at `start_step`, forever."""

    def __init__(
        self,
        items: Sequence[int],
        seed: int,
        global_batch: int,
        grad_accum: int,
        rank: int,
        world_size: int,
        start_step: int = 0,
    ):
        if global_batch % (grad_accum * world_size) != 0:
            raise ValueError(
                f"train.batch_size={global_batch} is not divisible by grad_accum*world_size={grad_accum * world_size}"
            )
        if len(items) == 0:
            raise ValueError("no training items (check data.holdout and the cache)")
        self.items = torch.as_tensor(list(items), dtype=torch.long)
        self.seed = seed
        self.global_batch = global_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.local_batch = global_batch // (grad_accum * world_size)
        self.start_step = start_step
        self._perm_epoch = -1
        self._perm = self.items

    def _item_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.items))
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm = self.items[torch.randperm(len(self.items), generator=gen)]
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def keys_for(self, step: int, micro: int) -> list[tuple[int, int]]:
        """The (index, draw_seed) keys of this rank's part of micro-batch `micro` of step `step`."""
        micro_global = self.global_batch // self.grad_accum
        first = step * self.global_batch + micro * micro_global + self.rank * self.local_batch
        return [(self._item_at(p), mix_seed(self.seed, p, 1)) for p in range(first, first + self.local_batch)]

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        while True:
            for micro in range(self.grad_accum):
                yield self.keys_for(step, micro)
            step += 1

    def __len__(self) -> int:  # infinite stream; DataLoader only needs this for len()
        return 2**62
