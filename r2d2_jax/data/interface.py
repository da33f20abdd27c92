"""What an input pipeline is, and the parts every pipeline shares.

Two pipelines satisfy `Pipeline`: `pipeline.InMemoryPipeline` (datasets held in
host memory) and `imagenet.StreamingPipeline` (ImageNet by tf.data). The split
(`split_from_config`), the batch sizes (`batch_sizes`) and the steps per epoch
(`steps_per_epoch`) are computed here, once, for both.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping, Protocol

import ml_collections
import numpy as np
from jax.sharding import Mesh

from r2d2_jax import sharding
from r2d2_jax.data import sources
from r2d2_jax.data import splits as splits_lib
from r2d2_jax.errors import R2D2Error

STREAMS = ("labeled", "unlabeled")


class Pipeline(Protocol):
  """Step-indexed labeled / unlabeled batches and whole-split evaluation batches.

  At step k, `iterate` yields global sharded batches
    {'labeled':   {'image': uint8 [B, H, W, C], 'label': int32 [B], 'index': int32 [B]},
     'unlabeled': {... [μB] ...}}
  where `index` is the row in the train split and the unlabeled `label` the
  hidden true label (diagnostics only). The batch is a pure function of
  (seed, k).
  """
  info: sources.DatasetInfo
  mesh: Mesh
  split: splits_lib.Split
  batch_size: int
  unlabeled_batch_size: int

  @property
  def num_train(self) -> int:
    """Rows of the train split."""

  @property
  def train_labels(self) -> np.ndarray:
    """True labels of every train row (diagnostics)."""

  @property
  def eval_splits(self) -> tuple[str, ...]:
    """The splits evaluated during training: 'test', and 'val' if there is one."""

  def steps_per_epoch(self, stream: str = "unlabeled") -> int:
    """Steps for one pass over a stream (unlabeled if there is one)."""

  def iterate(self, start_step: int, streams: tuple[str, ...] | None = None
              ) -> Iterator[Any]:
    """Global batches for start_step, start_step + 1, ..."""

  def eval_batches(self, split: str, batch_size: int) -> Iterator[Any]:
    """'test', 'val' or 'train' exactly once, padded, with a 'mask'."""


def split_from_config(config: ml_collections.ConfigDict, labels: np.ndarray,
                      num_classes: int, seed: int,
                      workdir: str | None) -> splits_lib.Split:
  """The labeled / unlabeled / validation split of `config` (the data block).

  `num_labels` (per-class balanced), `labeled_fraction`, or
  `labeled_split_file` (the labeled examples listed in a file); `split_seed`
  (default: the run's seed); `unlabeled` 'rest' | 'all'; `num_val` validation
  rows. Saved to (or checked against) `workdir/split.json`.
  """
  split_seed = config.get("split_seed")
  split_seed = seed if split_seed is None else split_seed
  unlabeled = config.get("unlabeled", "rest")
  num_val = int(config.get("num_val", 0) or 0)
  fraction = config.get("labeled_fraction")
  split_file = config.get("labeled_split_file")
  if split_file:
    if fraction:
      raise R2D2Error(
          f"data.labeled_split_file={split_file!r} and data.labeled_fraction="
          f"{fraction} both choose the labeled set; unset one of them.")
    labeled = splits_lib.read_split_file(
        split_file, labels, sources.train_row_names(config.dataset, config))
    split = splits_lib.file_split(labels, num_classes, labeled, split_seed,
                                  unlabeled, num_val)
    meta = dict(labeled_split_file=os.path.abspath(split_file))
  elif fraction:
    split = splits_lib.fraction_split(labels, num_classes, float(fraction),
                                      split_seed, unlabeled, num_val)
    meta = dict(labeled_fraction=float(fraction))
  else:
    split = splits_lib.make_split(labels, num_classes, config.num_labels,
                                  split_seed, unlabeled, num_val)
    meta = dict(num_labels=config.num_labels)
  if workdir is not None:
    splits_lib.save_or_check(
        split, os.path.join(workdir, "split.json"),
        dict(dataset=config.dataset, seed=split_seed, unlabeled=unlabeled,
             num_val=num_val, **meta))
  return split


def batch_sizes(config: ml_collections.ConfigDict, mesh: Mesh
                ) -> tuple[int, int]:
  """(labeled, unlabeled) global batch sizes, each checked against the mesh."""
  labeled = config.batch_size
  unlabeled = int(round(config.get("uratio", 0) * config.batch_size))
  sharding.check_batch_size("data.batch_size", labeled, mesh)
  if unlabeled:
    sharding.check_batch_size("data.uratio * data.batch_size", unlabeled, mesh)
  return labeled, unlabeled


def steps_per_epoch(pools: Mapping[str, np.ndarray], sizes: Mapping[str, int],
                    stream: str = "unlabeled") -> int:
  """ceil(pool / batch) of `stream`; the labeled stream if there is no other."""
  if stream not in pools:
    stream = "labeled"
  return max(1, -(-len(pools[stream]) // sizes[stream]))


def check_streams(streams: tuple[str, ...] | None, available,
                  config: ml_collections.ConfigDict) -> None:
  """Raises a readable error if a method reads a stream the config gives none of."""
  missing = set(streams or ()) - set(available)
  if missing:
    raise R2D2Error(
        f"The method reads the {sorted(missing)} stream but data.uratio="
        f"{config.get('uratio', 0)} gives no unlabeled batch; set "
        "data.uratio > 0.")
