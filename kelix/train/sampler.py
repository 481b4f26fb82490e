"""Batches as a pure function of the step: what makes resume-after-crash equal an uninterrupted run.

The example order is a seeded permutation per epoch, so the batch of step k is known without replaying
steps 0..k-1, and a run resumed at step k reads exactly the examples it would have read.
"""
from __future__ import annotations

import numpy as np


class StepSampler:
    def __init__(self, num_examples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        if num_examples <= 0:
            raise ValueError("the training split is empty: generate or import data first")
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self._perms[epoch]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of this rank's share of the global batch at `step`."""
        global_batch = self.batch_size * self.world_size
        start = step * global_batch + self.rank * self.batch_size
        out = np.empty(self.batch_size, dtype=np.int64)
        for i in range(self.batch_size):
            pos = start + i
            epoch, offset = divmod(pos, self.num_examples)
            out[i] = self._perm(epoch)[offset]
        return out
