"""Which samples each rank takes at each step, as a pure function of (seed, epoch, step, rank, world).

A global batch is `batch_size * world_size` consecutive entries of a per-epoch seeded permutation; rank r
takes the r-th slice. Consequences that training relies on:
- every rank runs the same number of steps per epoch (the permutation is padded by cycling), so no rank
  runs out of data before another (a collective training job hangs otherwise);
- a global batch holds the same samples whatever the world size, so 2 ranks x batch 1 sees what
  1 rank x batch 2 sees;
- resuming at (epoch, step) needs no replay: the position is the state.

With `groups` (a bucket id per sample, e.g. the reference-image sizes of editing data), every global batch is
drawn from one group: each group's seeded permutation is padded by cycling to whole global batches, and the
order of all those global batches is shuffled. Every rank then holds samples of the same shapes at every step.
A single group (text-to-image data) takes the plain path above, unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


def sample_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (seed, step, global sample index, ...)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


@dataclass(frozen=True)
class Position:
    epoch: int = 0
    step_in_epoch: int = 0


class GlobalBatchSampler:
    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, groups: list[int] | None = None):
        if num_samples <= 0:
            raise ValueError("no samples")
        self.n, self.batch_size, self.rank, self.world = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.global_batch = batch_size * world_size
        self.groups: list[list[int]] | None = None
        if groups is not None:
            if len(groups) != num_samples:
                raise ValueError(f"{len(groups)} group ids for {num_samples} samples")
            members: dict[int, list[int]] = {}
            for i, g in enumerate(groups):
                members.setdefault(g, []).append(i)
            if len(members) > 1:
                self.groups = [members[g] for g in sorted(members)]

    def _steps(self, n: int) -> int:
        return -(-n // self.global_batch)  # ceil: the last global batch is completed by cycling

    @property
    def steps_per_epoch(self) -> int:
        if self.groups is None:
            return self._steps(self.n)
        return sum(self._steps(len(m)) for m in self.groups)

    def _permuted(self, members: list[int], *salt: int) -> list[int]:
        if not self.shuffle:
            return list(members)
        g = torch.Generator().manual_seed(sample_seed(self.seed, *salt))
        return [members[i] for i in torch.randperm(len(members), generator=g).tolist()]

    def _grouped_order(self, epoch: int) -> list[int]:
        batches = []
        for k, members in enumerate(self.groups):
            order = self._permuted(members, epoch, 0x5A, k)
            padded = [order[i % len(order)] for i in range(self._steps(len(order)) * self.global_batch)]
            batches += [padded[i:i + self.global_batch] for i in range(0, len(padded), self.global_batch)]
        return [i for b in self._permuted(batches, epoch, 0xB5) for i in b]

    def _order(self, epoch: int) -> list[int]:
        if self.groups is not None:
            return self._grouped_order(epoch)
        if self.shuffle:
            g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, 0x5A))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = self.steps_per_epoch * self.global_batch
        return [order[i % self.n] for i in range(total)]

    def batch(self, epoch: int, step_in_epoch: int, order: list[int] | None = None) -> list[int]:
        order = order or self._order(epoch)
        start = step_in_epoch * self.global_batch + self.rank * self.batch_size
        return order[start:start + self.batch_size]

    def global_offsets(self) -> list[int]:
        """Index of each of this rank's samples within the global batch (names the sample's noise)."""
        return [self.rank * self.batch_size + j for j in range(self.batch_size)]

    def iterate(self, start: Position = Position()) -> Iterator[tuple[Position, list[int]]]:
        epoch, step = start.epoch, start.step_in_epoch
        while True:
            order = self._order(epoch)
            for s in range(step, self.steps_per_epoch):
                yield Position(epoch, s), self.batch(epoch, s, order)
            epoch, step = epoch + 1, 0
