"""Small configs and data shared by the tests."""

import numpy as np

from configs import common
from r2d2_jax.data import sources


def tiny_config(method: str = "supervised", **overrides):
  """A digits config that trains in a second."""
  c = common.base_config()
  c.method = method
  c.model.name = "cnn_small"
  c.data.dataset = "digits"
  c.data.num_labels = 50
  c.data.batch_size = 16
  c.data.eval_batch_size = 120
  c.data.augment.weak.translate = 1
  c.total_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2
  c.checkpoint_async = False
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def fake_splits(n_train: int = 200, n_test: int = 50, shape=(8, 8, 1),
                num_classes: int = 10, seed: int = 0):
  rng = np.random.default_rng(seed)
  mk = lambda n: sources.ArraySplit(
      rng.integers(0, 256, (n, *shape), dtype=np.uint8),
      (np.arange(n) % num_classes).astype(np.int32))
  return {"train": mk(n_train), "test": mk(n_test)}
