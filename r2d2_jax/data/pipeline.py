"""Labeled and unlabeled streams for in-memory datasets, as global sharded batches.

At step k the pipeline yields
  {'labeled':   {'image': uint8 [B, H, W, C], 'label': int32 [B], 'index': int32 [B]},
   'unlabeled': {'image': uint8 [μB, ...],    'label': int32 [μB], 'index': int32 [μB]}}
where `index` is the example's row in the train split (the row of a per-example
table) and the unlabeled `label` is the true label, for diagnostics only (-1
for a user dataset's images without one, `custom.UNKNOWN_LABEL`). The
batch is a pure function of (seed, k); augmentation happens later, on device,
from (seed, k, index) (see `r2d2_jax.data.augment`).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import ml_collections
import numpy as np
from jax.sharding import Mesh

from r2d2_jax import sharding
from r2d2_jax.data import interface
from r2d2_jax.data import sampler as sampler_lib
from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error


class InMemoryPipeline:
  """Step-indexed labeled/unlabeled batches of a dataset held in host memory.

  Satisfies `interface.Pipeline`.

  Args:
    config: the `data` block of the config.
    seed: the run's seed (split and sampling derive from it).
    mesh: the device mesh.
    workdir: where the split is saved (None: not saved).
    arrays: preloaded splits (tests); default loads `config.dataset`.
  """

  def __init__(self, config: ml_collections.ConfigDict, seed: int, mesh: Mesh,
               workdir: str | None = None,
               arrays: dict[str, sources.ArraySplit] | None = None):
    self.info = sources.get_info(config.dataset, config)
    self.mesh = mesh
    self.config = config
    if arrays is None:
      arrays = sources.load_in_memory(config.dataset, config.get("data_dir"),
                                      config.get("manual_dir"),
                                      config.get("image_size"))
    self.train, self.test = arrays["train"], arrays["test"]
    # Quick experiments (a notebook's FAST mode) may use the first examples only.
    if config.get("train_limit"):
      self.train = sources.ArraySplit(self.train.images[:config.train_limit],
                                      self.train.labels[:config.train_limit])
    if config.get("test_limit"):
      self.test = sources.ArraySplit(self.test.images[:config.test_limit],
                                     self.test.labels[:config.test_limit])
    self.split = interface.split_from_config(
        config, self.train.labels, self.info.num_classes, seed, workdir)
    self.batch_size, self.unlabeled_batch_size = interface.batch_sizes(
        config, mesh)
    # Two independent streams; the seeds differ so their orders are unrelated.
    self._samplers = {"labeled": (self.split.labeled, sampler_lib.StepSampler(
        len(self.split.labeled), self.batch_size, seed * 2 + 1))}
    if self.unlabeled_batch_size:
      self._samplers["unlabeled"] = (self.split.unlabeled,
                                     sampler_lib.StepSampler(
                                         len(self.split.unlabeled),
                                         self.unlabeled_batch_size,
                                         seed * 2 + 2))

  @property
  def num_train(self) -> int:
    return len(self.train)

  @property
  def train_labels(self) -> np.ndarray:
    """True labels of the whole train split (for diagnostics)."""
    return self.train.labels

  def steps_per_epoch(self, stream: str = "unlabeled") -> int:
    """Steps for one pass over a stream (unlabeled if there is one)."""
    return interface.steps_per_epoch(
        {k: pool for k, (pool, _) in self._samplers.items()},
        {k: s.batch_size for k, (_, s) in self._samplers.items()}, stream)

  def host_batch(self, step: int, streams: tuple[str, ...] | None = None
                 ) -> dict[str, dict[str, np.ndarray]]:
    """This process's rows of the global batch at `step`.

    Args:
      step: the step.
      streams: which of 'labeled' / 'unlabeled' to read (default: both).
    """
    out = {}
    for stream, (pool, s) in self._samplers.items():
      if streams is not None and stream not in streams:
        continue
      rows = sharding.process_slice(s.batch_size, self.mesh)
      idx = pool[s.positions(step)[rows]]
      out[stream] = {"image": self.train.images[idx],
                     "label": self.train.labels[idx],
                     "index": idx.astype(np.int32)}
    return out

  def global_batch(self, step: int,
                   streams: tuple[str, ...] | None = None) -> Any:
    return sharding.to_global(self.host_batch(step, streams), self.mesh)

  def iterate(self, start_step: int, streams: tuple[str, ...] | None = None,
              prefetch: int = 2) -> Iterator[Any]:
    """Global batches for start_step, start_step + 1, ..., built ahead in a thread."""
    interface.check_streams(streams, self._samplers, self.config)
    return _prefetch((self.host_batch(k, streams) for k in _count(start_step)),
                     prefetch, lambda b: sharding.to_global(b, self.mesh))

  @property
  def eval_splits(self) -> tuple[str, ...]:
    """The splits evaluated during training: 'test', and 'val' if there is one."""
    return ("test", "val") if len(self.split.val) else ("test",)

  def eval_batches(self, split: str, batch_size: int) -> Iterator[Any]:
    """The whole split exactly once, padded to full batches, with a mask.

    Args:
      split: 'test', 'val' (the validation rows of the train split) or
        'train' (the whole train split, e.g. to predict a per-example table).
      batch_size: global batch size (divisible by the device count).

    Yields:
      Global {'image', 'label', 'index', 'mask'} batches; padded rows have
      mask 0. `index` is the row in the test split for 'test', in the train
      split for 'val' and 'train'.
    """
    sharding.check_batch_size("data.eval_batch_size", batch_size, self.mesh)
    if split == "test":
      data, rows_of = self.test, np.arange(len(self.test))
    elif split == "train":
      data, rows_of = self.train, np.arange(len(self.train))
    elif split == "val":
      if not len(self.split.val):
        raise R2D2Error("There is no validation set to evaluate: "
                        "data.num_val is 0.")
      data, rows_of = self.train, self.split.val
    else:
      raise R2D2Error(f"Unknown eval split {split!r}: use 'test', 'val' or "
                      "'train'.")
    n = len(rows_of)
    rows = sharding.process_slice(batch_size, self.mesh)
    for start in range(0, n, batch_size):
      pos = np.arange(start, start + batch_size)[rows]
      mask = pos < n
      idx = rows_of[np.where(mask, pos, 0)]
      yield sharding.to_global(
          {"image": data.images[idx], "label": data.labels[idx],
           "index": idx.astype(np.int32), "mask": mask}, self.mesh)

  def unlabeled_batches(self, batch_size: int, seed: int) -> Iterator[Any]:
    """A fixed shuffle of the unlabeled pool in full batches (BatchNorm statistics).

    Args:
      batch_size: global batch size (divisible by the device count).
      seed: the shuffle's seed (the same order at every call).

    Yields:
      Global {'image'} batches of exactly `batch_size` rows; the rows past the
      last full batch are left out (a train-mode forward has no mask).

    Raises:
      R2D2Error: an unlabeled pool smaller than a batch.
    """
    sharding.check_batch_size("eval_bn_batch_size", batch_size, self.mesh)
    rows_of = self.split.unlabeled
    if len(rows_of) < batch_size:
      raise R2D2Error(
          f"The unlabeled pool has {len(rows_of)} rows, fewer than one batch "
          f"of {batch_size}: lower eval_bn_batch_size.")
    order = rows_of[np.random.default_rng(seed).permutation(len(rows_of))]
    rows = sharding.process_slice(batch_size, self.mesh)
    for start in range(0, len(order) - batch_size + 1, batch_size):
      idx = order[start:start + batch_size][rows]
      yield sharding.to_global({"image": self.train.images[idx]}, self.mesh)


def _count(start: int) -> Iterator[int]:
  k = start
  while True:
    yield k
    k += 1


def _prefetch(it: Iterator[Any], size: int, finish) -> Iterator[Any]:
  """Runs `it` in a background thread, `size` items ahead; `finish` on the main thread."""
  if size <= 0:
    for x in it:
      yield finish(x)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def worker():
    try:
      for x in it:
        while not stop.is_set():
          try:
            q.put(("ok", x), timeout=0.1)
            break
          except queue.Full:
            continue
        if stop.is_set():
          return
    except Exception as e:  # surfaced on the consumer side
      q.put(("err", e))

  t = threading.Thread(target=worker, daemon=True)
  t.start()
  try:
    while True:
      kind, x = q.get()
      if kind == "err":
        raise x
      yield finish(x)
  finally:
    stop.set()


def make_pipeline(config: ml_collections.ConfigDict, seed: int, mesh: Mesh,
                  workdir: str | None = None) -> Any:
  """Builds the input pipeline of `config.dataset`.

  Returns an `InMemoryPipeline`, or for streamed datasets (`in_memory=False`,
  i.e. ImageNet) an `imagenet.StreamingPipeline`; both are
  `interface.Pipeline`s.
  """
  info = sources.get_info(config.dataset, config)
  if not info.in_memory:
    # Imported here: it pulls in tensorflow, which small datasets do not need.
    from r2d2_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    return imagenet.StreamingPipeline(config, seed, mesh, workdir)
  return InMemoryPipeline(config, seed, mesh, workdir)
