"""Batches as a pure function of the step: what makes resume-after-crash equal an uninterrupted run.

The example order is a seeded permutation per epoch, so the batch of step k is known without replaying
steps 0..k-1, and a run resumed at step k reads exactly the examples it would have read.
`batch_size` is the global batch: under torchrun each rank takes its slice of it, so the ranks together
read what a single process reads, and the averaged gradients match (see kelix/train/distributed.py).
"""
from __future__ import annotations

import numpy as np
import torch.distributed as dist


class StepSampler:
    def __init__(self, num_examples: int, batch_size: int, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None):
        if num_examples <= 0:
            raise ValueError("the training split is empty: generate or import data first")
        if world_size is None:
            joined = dist.is_available() and dist.is_initialized()
            world_size = dist.get_world_size() if joined else 1
            rank = dist.get_rank() if joined else 0
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} does not split over {world_size} processes")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.per_rank = batch_size // world_size
        self.seed = seed
        self.rank = rank or 0
        self.world_size = world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._perms[epoch]

    @property
    def rank_slice(self) -> slice:
        """This rank's rows of a tensor drawn for the whole global batch: random draws made that way (noise,
        dropout) give each example the same values on any number of processes."""
        return slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)

    def indices(self, step: int) -> np.ndarray:
        """Example indices of this rank's slice of the global batch at `step`."""
        start = step * self.batch_size + self.rank * self.per_rank
        out = np.empty(self.per_rank, dtype=np.int64)
        for i in range(self.per_rank):
            epoch, offset = divmod(start + i, self.num_examples)
            out[i] = self._perm(epoch)[offset]
        return out
