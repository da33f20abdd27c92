"""Datasets the user brings: `tfds:NAME`, `folder:PATH` and `npz:PATH`.

Each source is read once into host memory, like the registered small datasets,
and described by a `sources.DatasetInfo` made from the data itself: the number
of classes (from the folder names, the tfds `ClassLabel`, or the labels of the
arrays), the image shape (after `data.image_size`) and the per-channel mean and
std of the train images. Horizontal flips are off by default for these
datasets (`data.augment.weak.flip=True` turns them on).

Unlabeled images (`PATH/unlabeled/*`, `x_unlabeled`, a tfds `unlabeled` split)
are appended to the train split after its labeled rows, with the label
`UNKNOWN_LABEL` (-1): they have rows of their own in every per-example table,
and the split puts them in the unlabeled pool only (`splits.py`).

Only `tfds:` imports tensorflow (tensorflow_datasets, inside its loader);
`folder:` reads images with Pillow and `npz:` with numpy.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Sequence

import numpy as np

from r2d2_jax.errors import R2D2Error

# The label of an image that has none (an unlabeled-folder image, `x_unlabeled`,
# a tfds 'unlabeled' split). It is never a training target: those rows are in
# the unlabeled pool only; diagnostics that compare with the hidden label must
# skip rows whose label is negative.
UNKNOWN_LABEL = -1

PREFIXES = ("tfds:", "folder:", "npz:")


def is_custom(name: Any) -> bool:
  """Whether `name` (data.dataset) names a user dataset, e.g. 'folder:/data/x'."""
  return isinstance(name, str) and name.startswith(PREFIXES)


def parse_image_size(value: Any) -> tuple[int, int] | None:
  """`data.image_size` as (H, W): None keeps the images' size; S means (S, S)."""
  if value is None or (isinstance(value, (int, np.integer)) and
                       not isinstance(value, bool) and value == 0):
    return None
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    value = (int(value), int(value))
  ok = (isinstance(value, (tuple, list)) and len(value) == 2 and
        all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and
            v > 0 for v in value))
  if not ok:
    raise R2D2Error(
        f"data.image_size={value!r} must be None (keep the images' size), a "
        "positive int S (resize to S x S) or a pair (H, W) of positive ints.")
  return int(value[0]), int(value[1])


@dataclasses.dataclass
class Raw:
  """What a loader read, before the checks and statistics of `load`.

  Attributes:
    train: images uint8 [N, H, W, C] and labels int [N] of the labeled train
      split.
    test: the same for the test split.
    unlabeled: images uint8 [M, H, W, C] without labels, or None.
    num_classes: number of classes.
    source: how errors name the data (e.g. "folder:/data/x").
    train_names: for folders, each train row's file name relative to
      `train/` (e.g. 'cat/0001.png'); None for other sources.
    class_names: the class of each id, if known.
  """
  train: Any
  test: Any
  unlabeled: np.ndarray | None
  num_classes: int
  source: str
  train_names: tuple[str, ...] | None = None
  class_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A user dataset in memory.

  Attributes:
    info: its `DatasetInfo`.
    splits: {'train', 'test'} `ArraySplit`s; the train split's last rows are
      the unlabeled images, labeled `UNKNOWN_LABEL`.
    train_names: folder datasets: the name of each labeled train row relative
      to `train/` (unlabeled rows: None); other sources: None.
    class_names: the class of each id, where the source names them.
  """
  info: Any
  splits: dict[str, Any]
  train_names: tuple[str | None, ...] | None = None
  class_names: tuple[str, ...] | None = None


# Recently loaded datasets, so that the stages of a run (and `get_info` then
# `load_in_memory`) decode the files once. The key holds each file's size and
# modification time, so a changed file is read again.
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 2


def load(name: str, data_dir: str | None = None,
         image_size: Any = None) -> Loaded:
  """Loads the user dataset `name` ('tfds:...', 'folder:...' or 'npz:...').

  Args:
    name: data.dataset.
    data_dir: tensorflow-datasets data dir (tfds: only).
    image_size: data.image_size (see `parse_image_size`).

  Returns:
    The `Loaded` dataset, checked: images uint8 of one shape, labels in
    [0, num_classes), every class present in the train split.
  """
  size = parse_image_size(image_size)
  kind, _, arg = name.partition(":")
  if not arg:
    what, form = ("builder", "NAME") if kind == "tfds" else ("path", "PATH")
    raise R2D2Error(f"data.dataset={name!r} names no {what}: use "
                    f"{kind}:{form}.")
  if kind == "folder":
    from r2d2_jax.data import folder  # pylint: disable=g-import-not-at-top
    listing = folder.scan(arg)
    key = (name, size, listing.fingerprint)
    read = lambda: folder.read(listing, size)
  elif kind == "npz":
    from r2d2_jax.data import arrays  # pylint: disable=g-import-not-at-top
    key = (name, size, arrays.fingerprint(arg))
    read = lambda: arrays.read(arg, size)
  else:
    from r2d2_jax.data import tfds_any  # pylint: disable=g-import-not-at-top
    key = (name, size, data_dir)
    read = lambda: tfds_any.read(arg, data_dir, size)
  if key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]
  loaded = _finish(name, read())
  _CACHE[key] = loaded
  while len(_CACHE) > _CACHE_SIZE:
    _CACHE.popitem(last=False)
  return loaded


def _finish(name: str, raw: Raw) -> Loaded:
  """Checks `raw`, computes its statistics and appends the unlabeled rows."""
  from r2d2_jax.data import sources  # pylint: disable=g-import-not-at-top
  train = sources.ArraySplit(raw.train[0], np.asarray(raw.train[1], np.int32))
  test = sources.ArraySplit(raw.test[0], np.asarray(raw.test[1], np.int32))
  shape = tuple(int(d) for d in train.images.shape[1:])
  counts = np.bincount(train.labels[train.labels >= 0],
                       minlength=raw.num_classes)
  if len(counts) == raw.num_classes and counts.min() == 0:
    c = int(np.argmin(counts))
    what = f" ({raw.class_names[c]!r})" if raw.class_names else ""
    raise R2D2Error(
        f"{raw.source}: class {c}{what} has no training example. Every class "
        f"id in [0, {raw.num_classes - 1}] needs labeled train images.")
  images = [train.images]
  if raw.unlabeled is not None:
    images.append(raw.unlabeled)
  mean, std = channel_stats(images)
  info = sources.DatasetInfo(
      name=name, num_classes=raw.num_classes, image_shape=shape,
      mean=tuple(mean), std=tuple(std), flip=False)
  sources.validate(info, {"train": train, "test": test}, raw.source)
  names = raw.train_names
  if raw.unlabeled is not None:
    if raw.unlabeled.shape[1:] != shape or raw.unlabeled.dtype != np.uint8:
      raise R2D2Error(
          f"{raw.source}: the unlabeled images are {raw.unlabeled.dtype} of "
          f"shape {raw.unlabeled.shape[1:]}, the train images uint8 of shape "
          f"{shape}; they must match.")
    train = sources.ArraySplit(
        np.concatenate([train.images, raw.unlabeled]),
        np.concatenate([train.labels, np.full(len(raw.unlabeled),
                                              UNKNOWN_LABEL, np.int32)]))
    if names is not None:
      names = tuple(names) + (None,) * len(raw.unlabeled)
  return Loaded(info, {"train": train, "test": test}, names, raw.class_names)


def channel_stats(images: Sequence[np.ndarray], chunk: int = 4096
                  ) -> tuple[list[float], list[float]]:
  """Per-channel mean and std (0..255 scale) of uint8 [N, H, W, C] arrays.

  Summed in float64 over chunks of images, so a large dataset needs no float
  copy. A channel of constant value gets std 1 (normalising only shifts it).
  """
  c = images[0].shape[-1]
  total, sq, n = np.zeros(c), np.zeros(c), 0
  for x in images:
    for i in range(0, len(x), chunk):
      part = x[i:i + chunk].reshape(-1, c).astype(np.float64)
      total += part.sum(0)
      sq += np.square(part).sum(0)
      n += len(part)
  mean = total / max(n, 1)
  std = np.sqrt(np.maximum(sq / max(n, 1) - np.square(mean), 0.0))
  std = np.where(std < 1e-3, 1.0, std)
  return [float(v) for v in mean], [float(v) for v in std]


def resize(images: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
  """uint8 [N, H, W, C] images resized to `size` = (H, W) with Pillow (bilinear).

  Returns `images` itself when `size` is None or already their size.
  """
  if size is None or tuple(images.shape[1:3]) == tuple(size):
    return images
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.empty((len(images), *size, images.shape[-1]), np.uint8)
  for i, x in enumerate(images):
    if x.shape[-1] == 1:
      img = Image.fromarray(x[..., 0], "L")
    else:
      img = Image.fromarray(x)
    r = np.asarray(img.resize((size[1], size[0]), Image.BILINEAR))
    out[i] = r.reshape(out.shape[1:])
  return out


def to_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 [N, H, W, 1] grayscale repeated into 3 channels ([N, H, W, 3])."""
  return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images
