"""The labeled / unlabeled / validation split: class-balanced, chosen by a seed, saved in the workdir.

The validation set is carved from the train split (never from test) and drawn
first, from its own stream of the split seed: for a given (split seed,
num_val) it is the same whatever `num_labels`, so runs with 40 and 250 labels
select on the same images. The labeled set is then drawn from the remaining
examples with the split seed itself (so with `num_val=0` it is exactly the
labeled set of a run made before validation splits existed). Validation rows
are in neither the labeled set nor the unlabeled pool, 'all' included: no
method trains on them, and a per-example table keeps them unlearnable.

Rows whose label is negative (`custom.UNKNOWN_LABEL`: images of a user
dataset's unlabeled folder or array) have no class: they are never labeled nor
validation rows, only members of the unlabeled pool ('rest' and 'all').

`data.labeled_split_file` replaces the random labeled draw by a published one
(`read_split_file`, `file_split`): the validation set is then drawn from each
class's other rows, from the same stream as above.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from r2d2_jax import paths
from r2d2_jax.errors import R2D2Error

# Mixed into the split seed for the validation draw, so it is a stream of its
# own that does not depend on how many labels are drawn after it.
_VAL_STREAM = 0x76616C  # 'val'


@dataclasses.dataclass(frozen=True)
class Split:
  """Indices into the train split.

  Attributes:
    labeled: sorted indices of the labeled examples.
    unlabeled: sorted indices of the unlabeled examples ('rest' excludes the
      labeled ones, 'all' includes them, as in FixMatch; both exclude `val`).
    val: sorted indices of the validation examples (empty: no validation set).
  """
  labeled: np.ndarray
  unlabeled: np.ndarray
  val: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(0, np.int64))


def labels_per_class(num_labels: int, num_classes: int) -> int:
  if num_labels <= 0 or num_labels % num_classes:
    raise R2D2Error(
        f"data.num_labels={num_labels} must be a positive multiple of the "
        f"number of classes ({num_classes}) so that the labeled set is "
        "class-balanced.")
  return num_labels // num_classes


def val_per_class(num_val: int, num_classes: int) -> int:
  if num_val < 0 or num_val % num_classes:
    raise R2D2Error(
        f"data.num_val={num_val} must be 0 (no validation set) or a positive "
        f"multiple of the number of classes ({num_classes}) so that the "
        "validation set is class-balanced.")
  return num_val // num_classes


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Examples per class; rows with a negative (unknown) label are not counted."""
  labels = np.asarray(labels)
  return np.bincount(labels[labels >= 0], minlength=num_classes)


def draw_val(labels: np.ndarray, num_classes: int, num_val: int, seed: int,
             labels_wanted: int | np.ndarray = 0, what: str = "",
             exclude: np.ndarray | None = None) -> np.ndarray:
  """The class-balanced validation rows: `num_val / num_classes` of each class.

  Args:
    labels: int labels of the whole train split (negative: no class; never
      drawn).
    num_classes: number of classes.
    num_val: total validation examples (a multiple of `num_classes`; 0: none).
    seed: the split seed; the draw uses its own stream of it.
    labels_wanted: labels that must remain outside the validation set, per
      class (an int for every class, or an array by class).
    what: how the labels were asked for, for the error message.
    exclude: rows that may not be drawn (a labeled set fixed in advance);
      each class's permutation is the same, these rows are skipped in it.

  Returns:
    Sorted int64 indices. The first k per class of a larger `num_val` are
    those of a smaller one (validation sets are nested).
  """
  per_class = val_per_class(num_val, num_classes)
  if not per_class:
    return np.zeros(0, np.int64)
  if seed is None:
    raise ValueError("draw_val needs an integer seed")
  counts = class_counts(labels, num_classes)
  wanted = np.broadcast_to(np.asarray(labels_wanted, np.int64), counts.shape)
  room = counts - wanted
  if room.min() < per_class:
    c = int(np.argmin(room))
    largest = max(int(room.min()), 0) * num_classes
    asked = (f" and {what} takes {int(wanted[c])} of them as labels"
             if wanted[c] else "")
    raise R2D2Error(
        f"data.num_val={num_val} asks for {per_class} validation examples per "
        f"class, but class {c} has only {counts[c]} training examples{asked}. "
        f"The largest possible data.num_val here is {largest} "
        f"({largest // num_classes} per class): the validation set is "
        "class-balanced, comes from the train split only and never overlaps "
        "the labeled set.")
  rng = np.random.default_rng([_VAL_STREAM, int(seed)])
  skip = np.zeros(len(labels), bool)
  if exclude is not None:
    skip[np.asarray(exclude, np.int64)] = True
  val = []
  for c in range(num_classes):
    order = rng.permutation(np.flatnonzero(labels == c))
    val.append(order[~skip[order]][:per_class])
  return np.sort(np.concatenate(val)).astype(np.int64)


def make_split(labels: np.ndarray, num_classes: int, num_labels: int, seed: int,
               unlabeled: str = "rest", num_val: int = 0) -> Split:
  """Chooses a class-balanced validation set, then a class-balanced labeled subset.

  Args:
    labels: int labels of the whole train split.
    num_classes: number of classes.
    num_labels: total number of labels; a multiple of `num_classes`, or -1 for
      every example outside the validation set that has a label (fully
      supervised).
    seed: which validation and labeled subsets.
    unlabeled: 'rest' (the examples neither labeled nor validation) or 'all'
      (every example outside the validation set).
    num_val: validation examples, a multiple of `num_classes` (0: none).

  Returns:
    The `Split`. The same arguments always give the same split; the validation
    set does not depend on `num_labels` or `unlabeled`.
  """
  if unlabeled not in ("rest", "all"):
    raise R2D2Error(f"data.unlabeled={unlabeled!r}: use 'rest' or 'all'.")
  n = len(labels)
  per_class = 0 if num_labels == -1 else labels_per_class(num_labels,
                                                          num_classes)
  counts = class_counts(labels, num_classes)
  if counts.min() < per_class:
    c = int(np.argmin(counts))
    raise R2D2Error(
        f"data.num_labels={num_labels} asks for {per_class} labels per class, "
        f"but class {c} has only {counts[c]} training examples.")
  val = draw_val(labels, num_classes, num_val, seed, per_class,
                 f"data.num_labels={num_labels}")
  in_val = np.zeros(n, bool)
  in_val[val] = True
  if num_labels == -1:
    labeled = np.flatnonzero(~in_val & (labels >= 0))
  else:
    if seed is None:
      raise ValueError("make_split needs an integer seed")
    rng = np.random.default_rng(seed)
    labeled = np.concatenate([
        rng.choice(np.flatnonzero((labels == c) & ~in_val), per_class,
                   replace=False)
        for c in range(num_classes)])
    labeled.sort()
  if unlabeled == "all":
    rest = np.flatnonzero(~in_val)
  else:
    rest = np.setdiff1d(np.flatnonzero(~in_val), labeled)
  return Split(labeled.astype(np.int64), rest.astype(np.int64), val)


def save_or_check(split: Split, path: str, meta: dict) -> None:
  """Writes the split to `path` as JSON, or checks it equals the saved one.

  A resumed run must train on the same labels and select on the same
  validation set; a workdir made with another split is an error rather than a
  silent switch. A `split.json` written before validation sets existed (no
  'val' entry) is accepted only by a config without one (`data.num_val=0`).
  """
  record = dict(meta, labeled=split.labeled.tolist(),
                num_unlabeled=int(len(split.unlabeled)),
                val=split.val.tolist())
  text = paths.read_text(path)
  if text is not None:
    saved = json.loads(text)
    if "val" not in saved and record["val"]:
      raise R2D2Error(
          f"The split in {path} was saved without a validation set, and this "
          f"config carves {len(record['val'])} validation examples "
          f"(data.num_val={len(record['val'])}) from the train split, which "
          "changes the labeled and unlabeled sets. Use a new --workdir, or "
          "--config.data.num_val=0 to continue the old run as it was.")
    if saved.get("labeled") != record["labeled"] or saved.get(
        "num_unlabeled") != record["num_unlabeled"] or saved.get(
            "val", []) != record["val"]:
      raise R2D2Error(
          f"The split in {path} ({saved.get('meta', saved.get('dataset'))}, "
          f"{len(saved.get('labeled', []))} labels, "
          f"{len(saved.get('val', []))} validation examples) differs from the "
          f"one this config makes ({len(record['labeled'])} labels, "
          f"{len(record['val'])} validation examples). Use a new --workdir, or "
          "the config that made it.")
    return
  # On a multi-host run every process writes the same record at once; each
  # write is atomic (a temporary file of its own and a rename, or one upload).
  paths.write_text_atomic(path, json.dumps(record))


def fraction_split(labels: np.ndarray, num_classes: int, fraction: float,
                   seed: int, unlabeled: str = "rest",
                   num_val: int = 0) -> Split:
  """A class-balanced labeled subset holding `fraction` of each class.

  Class c with n_c > 0 examples gets max(1, floor(fraction * n_c + 0.5))
  labels, chosen by `seed` (as in ImageNet-10%); n_c counts the whole class,
  so the labeled count does not change with `num_val`. The validation set
  (`num_val / num_classes` per class, `splits.draw_val`) is drawn first and
  the labels from the rest of each class; both 'rest' and 'all' exclude it.
  """
  if unlabeled not in ("rest", "all"):
    raise R2D2Error(f"data.unlabeled={unlabeled!r}: use 'rest' or 'all'.")
  if not 0.0 < fraction <= 1.0:
    raise R2D2Error(f"data.labeled_fraction={fraction} must be in (0, 1].")
  if seed is None:
    raise ValueError("fraction_split needs an integer seed")
  counts = class_counts(labels, num_classes)
  wanted = np.where(counts > 0,
                    np.maximum(1, np.floor(fraction * counts + 0.5)), 0)
  val = draw_val(labels, num_classes, num_val, seed,
                            wanted.astype(np.int64),
                            f"data.labeled_fraction={fraction}")
  in_val = np.zeros(len(labels), bool)
  in_val[val] = True
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero((labels == c) & ~in_val)
    if counts[c]:
      chosen.append(rng.choice(members, int(wanted[c]), replace=False))
  labeled = np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
  keep = np.flatnonzero(~in_val)
  rest = keep if unlabeled == "all" else np.setdiff1d(keep, labeled)
  return Split(labeled.astype(np.int64), rest.astype(np.int64), val)


def read_split_file(path: str, labels: np.ndarray,
                    names: tuple[str | None, ...] | None = None) -> np.ndarray:
  """The train rows listed in `data.labeled_split_file`, sorted.

  One entry a line: a train-split row index (an integer), or, for a folder
  dataset (`names` given), an image's file name relative to `train/`, e.g.
  'cat/0001.png'. Blank lines and lines starting with '#' are skipped. An
  index outside the train split, a name no train image has, a row listed
  twice, or a row without a label (an unlabeled image) is an error naming the
  line.

  Args:
    path: the file.
    labels: labels of the train split (its length is the number of rows).
    names: each train row's name (None for a row without one), or None.
  """
  key = "data.labeled_split_file"
  try:
    with open(path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise R2D2Error(f"{key}={path!r} cannot be read ({e}). Give a text file "
                    "listing one labeled example a line.") from None
  n = len(labels)
  by_name = {}
  if names is not None:
    by_name = {m: i for i, m in enumerate(names[:n]) if m is not None}
  seen: dict[int, int] = {}
  rows = []
  for number, line in enumerate(lines, 1):
    entry = line.strip()
    if not entry or entry.startswith("#"):
      continue
    where = f"{key}={path!r}, line {number}"
    if entry.isdigit():
      row = int(entry)
      if row >= n:
        raise R2D2Error(
            f"{where}: index {row} is outside the train split, whose rows are "
            f"0..{n - 1}. Use indices of the train split (before any "
            "unlabeled images), or the split file made for this dataset.")
    elif names is not None:
      name = entry.replace("\\", "/")
      name = name[2:] if name.startswith("./") else name
      if name not in by_name:
        raise R2D2Error(
            f"{where}: no train image is named {entry!r}. Names are relative "
            "to the dataset's train/ folder, e.g. 'CLASS/image.png' (an "
            "unlabeled/ image cannot be labeled).")
      row = by_name[name]
    else:
      raise R2D2Error(
          f"{where}: {entry!r} is not a train-split index. For this dataset "
          "each line must be a row index (0, 1, ...); file names are for "
          "folder: datasets.")
    if row in seen:
      raise R2D2Error(
          f"{where}: {entry!r} is train row {row}, already listed on line "
          f"{seen[row]}. List each labeled example once.")
    if labels[row] < 0:
      raise R2D2Error(
          f"{where}: train row {row} is an unlabeled image (it has no class), "
          "so it cannot be in the labeled set.")
    seen[row] = number
    rows.append(row)
  if not rows:
    raise R2D2Error(f"{key}={path!r} lists no examples; list one labeled "
                    "example a line.")
  return np.sort(np.asarray(rows, np.int64))


def file_split(labels: np.ndarray, num_classes: int, labeled: np.ndarray,
               seed: int, unlabeled: str = "rest", num_val: int = 0,
               what: str = "data.labeled_split_file") -> Split:
  """The split with a labeled set given in advance (`read_split_file`).

  The validation set (`num_val / num_classes` per class) is drawn from each
  class's rows outside `labeled`, from the stream `draw_val` uses; the
  unlabeled pool is every other row ('rest') or every row outside the
  validation set ('all'), rows without a label included.
  """
  if unlabeled not in ("rest", "all"):
    raise R2D2Error(f"data.unlabeled={unlabeled!r}: use 'rest' or 'all'.")
  labeled = np.sort(np.asarray(labeled, np.int64))
  wanted = class_counts(np.asarray(labels)[labeled], num_classes)
  val = draw_val(labels, num_classes, num_val, seed, wanted, what,
                 exclude=labeled)
  in_val = np.zeros(len(labels), bool)
  in_val[val] = True
  keep = np.flatnonzero(~in_val)
  rest = keep if unlabeled == "all" else np.setdiff1d(keep, labeled)
  return Split(labeled, rest.astype(np.int64), val)
