"""A stateless, step-indexed sampler: the batch at step k is a function of (seed, k).

Resuming at step k needs no iterator state: the sampler is asked for step k.
Examples are visited epoch by epoch in a permutation drawn from (seed, epoch);
a batch that straddles two epochs takes the end of one and the start of the next.
"""

from __future__ import annotations

import functools

import numpy as np


class StepSampler:
  """Maps a step to the global batch of pool positions.

  Args:
    num_examples: size of the pool being sampled.
    batch_size: global batch size.
    seed: the permutation seed.
  """

  def __init__(self, num_examples: int, batch_size: int, seed: int):
    if num_examples <= 0:
      raise ValueError("cannot sample from an empty pool")
    self.num_examples = num_examples
    self.batch_size = batch_size
    self.seed = seed

  @functools.lru_cache(maxsize=4)
  def _permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(
        self.num_examples)

  def positions(self, step: int) -> np.ndarray:
    """Pool positions of the global batch at `step` (int64 [batch_size])."""
    flat = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(flat, self.num_examples)
    out = np.empty(self.batch_size, np.int64)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[offsets[sel]]
    return out

  def epoch(self, step: int) -> float:
    """Fractional epoch reached at the start of `step`."""
    return step * self.batch_size / self.num_examples
