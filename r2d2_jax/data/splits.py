"""The labeled / unlabeled split: class-balanced, chosen by a seed, saved in the workdir."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from r2d2_jax.errors import R2D2Error


@dataclasses.dataclass(frozen=True)
class Split:
  """Indices into the train split.

  Attributes:
    labeled: sorted indices of the labeled examples.
    unlabeled: sorted indices of the unlabeled examples ('rest' excludes the
      labeled ones, 'all' includes them, as in FixMatch).
  """
  labeled: np.ndarray
  unlabeled: np.ndarray


def labels_per_class(num_labels: int, num_classes: int) -> int:
  if num_labels <= 0 or num_labels % num_classes:
    raise R2D2Error(
        f"data.num_labels={num_labels} must be a positive multiple of the "
        f"number of classes ({num_classes}) so that the labeled set is "
        "class-balanced.")
  return num_labels // num_classes


def make_split(labels: np.ndarray, num_classes: int, num_labels: int, seed: int,
               unlabeled: str = "rest") -> Split:
  """Chooses a class-balanced labeled subset.

  Args:
    labels: int labels of the whole train split.
    num_classes: number of classes.
    num_labels: total number of labels; a multiple of `num_classes`, or -1 for
      every example (fully supervised).
    seed: which labeled subset.
    unlabeled: 'rest' (the examples not labeled) or 'all' (every example).

  Returns:
    The `Split`. The same arguments always give the same split.
  """
  if unlabeled not in ("rest", "all"):
    raise R2D2Error(f"data.unlabeled={unlabeled!r}: use 'rest' or 'all'.")
  n = len(labels)
  if num_labels == -1:
    labeled = np.arange(n)
  else:
    per_class = labels_per_class(num_labels, num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < per_class:
      c = int(np.argmin(counts))
      raise R2D2Error(
          f"data.num_labels={num_labels} asks for {per_class} labels per class, "
          f"but class {c} has only {counts[c]} training examples.")
    if seed is None:
      raise ValueError("make_split needs an integer seed")
    rng = np.random.default_rng(seed)
    labeled = np.concatenate([
        rng.choice(np.flatnonzero(labels == c), per_class, replace=False)
        for c in range(num_classes)])
    labeled.sort()
  if unlabeled == "all":
    rest = np.arange(n)
  else:
    rest = np.setdiff1d(np.arange(n), labeled)
  return Split(labeled.astype(np.int64), rest.astype(np.int64))


def save_or_check(split: Split, path: str, meta: dict) -> None:
  """Writes the split to `path` as JSON, or checks it equals the saved one.

  A resumed run must train on the same labels; a workdir made with another split
  is an error rather than a silent switch.
  """
  record = dict(meta, labeled=split.labeled.tolist(),
                num_unlabeled=int(len(split.unlabeled)))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved.get("labeled") != record["labeled"] or saved.get(
        "num_unlabeled") != record["num_unlabeled"]:
      raise R2D2Error(
          f"The labeled split in {path} ({saved.get('meta', saved.get('dataset'))}, "
          f"{len(saved.get('labeled', []))} labels) differs from the one this "
          "config makes. Use a new --workdir, or the config that made it.")
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  # A temporary name of this process's own: on a multi-host run every process
  # writes the same record at once, and each rename is atomic.
  tmp = f"{path}.tmp.{os.getpid()}.{jax.process_index()}"
  with open(tmp, "w") as f:
    json.dump(record, f)
  os.replace(tmp, path)
