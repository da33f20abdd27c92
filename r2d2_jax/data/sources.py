"""Datasets by name: where the pixels come from.

Small datasets (`digits`, `mnist`, `cifar10`, `cifar100`, `svhn_cropped`) are read
once into host memory as uint8 arrays and sampled by the stateless step-indexed
sampler of `r2d2_jax.data.sampler`. `imagenet2012` is streamed by tf.data (see
`r2d2_jax.data.imagenet`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np

from r2d2_jax.errors import R2D2Error, unknown_name


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  Attributes:
    name: registry name.
    num_classes: number of classes.
    image_shape: (H, W, C) of the images the model sees.
    mean: per-channel mean on the 0..255 scale, used to normalise.
    std: per-channel std on the 0..255 scale.
    flip: whether horizontal flips are label-preserving (not for digits).
    in_memory: whether the train split is held in host memory.
    tfds_name: the tensorflow-datasets builder, if any.
    manual_files: files a `manual_dir` must hold for an offline build.
  """
  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  flip: bool
  in_memory: bool = True
  tfds_name: str | None = None
  manual_files: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  """One split held in memory: images uint8 [N, H, W, C], labels int32 [N]."""
  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")

DATASETS: dict[str, DatasetInfo] = {
    "digits": DatasetInfo("digits", 10, (8, 8, 1), (83.,), (95.,), flip=False),
    "mnist": DatasetInfo("mnist", 10, (28, 28, 1), (33.3,), (78.6,), flip=False,
                         tfds_name="mnist", manual_files=_MNIST_FILES),
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), (125.3, 123.0, 113.9),
                           (63.0, 62.1, 66.7), flip=True, tfds_name="cifar10",
                           manual_files=("cifar-10-binary.tar.gz",)),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), (129.3, 124.1, 112.4),
                            (68.2, 65.4, 70.4), flip=True, tfds_name="cifar100",
                            manual_files=("cifar-100-binary.tar.gz",)),
    "svhn_cropped": DatasetInfo("svhn_cropped", 10, (32, 32, 3),
                                (111.6, 113.2, 120.6), (50.5, 51.3, 50.2),
                                flip=False, tfds_name="svhn_cropped",
                                manual_files=("train_32x32.mat", "test_32x32.mat")),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, (224, 224, 3),
                                (123.7, 116.3, 103.5), (58.4, 57.1, 57.4),
                                flip=True, in_memory=False,
                                tfds_name="imagenet2012",
                                manual_files=("ILSVRC2012_img_train.tar",
                                              "ILSVRC2012_img_val.tar")),
}

# sklearn's digits have no official split: the last 360 of the 1797 images
# (about 20%) are the test split, always the same ones.
_DIGITS_TEST = 360


def get_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of a dataset, or an error listing valid names."""
  if name not in DATASETS:
    raise unknown_name("dataset", name, DATASETS)
  return DATASETS[name]


def _load_digits() -> dict[str, ArraySplit]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  # Pixel values are 0..16; put them on the 0..255 scale of every other dataset.
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  n = len(labels) - _DIGITS_TEST
  return {"train": ArraySplit(images[:n], labels[:n]),
          "test": ArraySplit(images[n:], labels[n:])}


def check_manual_dir(info: DatasetInfo, manual_dir: str) -> None:
  """Raises a readable error if `manual_dir` lacks files the offline build needs."""
  missing = [f for f in info.manual_files
             if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    raise R2D2Error(
        f"Offline data for {info.name!r} is incomplete: {', '.join(missing)} "
        f"not found in manual_dir={manual_dir!r}. Put the original files "
        f"({', '.join(info.manual_files)}) in that folder (for MNIST they are in "
        f"../shared/data/mnist), or unset data.manual_dir to download them.")


def _load_tfds(info: DatasetInfo, data_dir: str | None,
               manual_dir: str | None) -> dict[str, ArraySplit]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  kwargs = {}
  if manual_dir:
    check_manual_dir(info, manual_dir)
    kwargs["download_and_prepare_kwargs"] = {
        "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
  out = {}
  for split in ("train", "test"):
    try:
      data = tfds.load(info.tfds_name, split=split, batch_size=4096,
                       data_dir=data_dir, as_supervised=True,
                       shuffle_files=False, **kwargs)
      batches = list(tfds.as_numpy(data))
    except Exception as e:  # tfds raises many kinds; all mean "cannot read it".
      raise R2D2Error(
          f"Could not load {info.name!r} split {split!r} with "
          f"tensorflow_datasets (data_dir={data_dir!r}, manual_dir="
          f"{manual_dir!r}): {type(e).__name__}: {e}") from e
    out[split] = ArraySplit(
        np.concatenate([b[0] for b in batches]).astype(np.uint8),
        np.concatenate([b[1] for b in batches]).astype(np.int32))
  return out


def validate(info: DatasetInfo, splits: dict[str, ArraySplit],
             source: str) -> None:
  """Checks shapes, dtypes and label range; raises an error naming `source`."""
  for name, s in splits.items():
    if s.images.ndim != 4 or s.images.shape[1:] != info.image_shape:
      raise R2D2Error(
          f"{source}: split {name!r} has images of shape {s.images.shape[1:]}, "
          f"expected {info.image_shape} for {info.name!r}.")
    if s.images.dtype != np.uint8:
      raise R2D2Error(f"{source}: split {name!r} images are {s.images.dtype}, "
                      "expected uint8.")
    if len(s.labels) != len(s.images):
      raise R2D2Error(f"{source}: split {name!r} has {len(s.images)} images "
                      f"but {len(s.labels)} labels.")
    if len(s.labels) and (s.labels.min() < 0 or
                          s.labels.max() >= info.num_classes):
      raise R2D2Error(
          f"{source}: split {name!r} has labels in [{s.labels.min()}, "
          f"{s.labels.max()}], outside [0, {info.num_classes - 1}].")


_LOADERS: dict[str, Callable[..., dict[str, ArraySplit]]] = {
    "digits": lambda info, data_dir, manual_dir: _load_digits(),
}


def load_in_memory(name: str, data_dir: str | None = None,
                   manual_dir: str | None = None) -> dict[str, ArraySplit]:
  """Loads the train and test splits of a small dataset into host memory.

  Args:
    name: a dataset name from `DATASETS` with `in_memory=True`.
    data_dir: tensorflow-datasets data dir (None: its default).
    manual_dir: folder with the original files, for an offline build.

  Returns:
    {"train": ArraySplit, "test": ArraySplit}, validated.
  """
  info = get_info(name)
  if not info.in_memory:
    raise R2D2Error(f"Dataset {name!r} is streamed, not held in memory.")
  loader = _LOADERS.get(name, _load_tfds)
  splits = loader(info, data_dir, manual_dir)
  validate(info, splits, source=f"dataset {name!r} (manual_dir={manual_dir!r})"
           if manual_dir else f"dataset {name!r}")
  return splits
