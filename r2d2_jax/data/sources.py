"""Datasets by name: where the pixels come from.

Small datasets (`digits`, `mnist`, `cifar10`, `cifar100`, `svhn_cropped`) are read
once into host memory as uint8 arrays and sampled by the stateless step-indexed
sampler of `r2d2_jax.data.sampler`. `imagenet2012` is streamed by tf.data (see
`r2d2_jax.data.imagenet`). A user's own data (`tfds:NAME`, `folder:PATH`,
`npz:PATH`) is held in memory too; `r2d2_jax.data.custom` reads it.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import struct
import zlib
from typing import Any, Callable

import numpy as np

from r2d2_jax.data import custom
from r2d2_jax.data import tfds_extra
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

# The original MNIST files (the checksums tensorflow_datasets registers for them).
_MNIST_SHA256 = {
    "train-images-idx3-ubyte.gz":
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "train-labels-idx1-ubyte.gz":
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "t10k-images-idx3-ubyte.gz":
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "t10k-labels-idx1-ubyte.gz":
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
}

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


def get_info(name: str, config: Any = None) -> DatasetInfo:
  """Returns the `DatasetInfo` of a dataset, or an error listing valid names.

  Args:
    name: a registered name, or a user dataset ('tfds:NAME', 'folder:PATH',
      'npz:PATH'), whose info is read from its data (loaded once, cached).
    config: the data block, for a user dataset's `image_size` and `data_dir`
      (None: the defaults).
  """
  if custom.is_custom(name):
    return _load_custom(name, config).info
  if name not in DATASETS:
    e = unknown_name("dataset", name, DATASETS)
    raise R2D2Error(f"{e} Or use your own data: tfds:NAME (a "
                    "tensorflow-datasets builder), folder:PATH or npz:PATH "
                    "(docs: 'Bring your own data').")
  return DATASETS[name]


def _load_custom(name: str, config: Any = None) -> custom.Loaded:
  config = config or {}
  return custom.load(name, config.get("data_dir"), config.get("image_size"))


def train_row_names(name: str, config: Any = None
                    ) -> tuple[str | None, ...] | None:
  """Each train row's file name relative to `train/` (folder datasets only).

  Unlabeled-folder rows are None; other datasets return None (their rows are
  named by index only).
  """
  if custom.is_custom(name):
    return _load_custom(name, config).train_names
  return None


def _load_digits() -> dict[str, ArraySplit]:
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  d = load_digits()
  # Pixel values are 0..16; put them on the 0..255 scale of every other dataset.
  images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = d.target.astype(np.int32)
  n = len(labels) - _DIGITS_TEST
  return {"train": ArraySplit(images[:n], labels[:n]),
          "test": ArraySplit(images[n:], labels[n:])}


def check_manual_dir(info: DatasetInfo, manual_dir: str,
                     advice: str | None = None) -> None:
  """Raises a readable error if `manual_dir` lacks files the offline build needs.

  Args:
    info: the dataset.
    manual_dir: the folder given as data.manual_dir.
    advice: what the error tells the user to do (default: put the original
      files there, or unset manual_dir to download them).
  """
  missing = [f for f in info.manual_files
             if not os.path.exists(os.path.join(manual_dir, f))]
  if missing:
    if advice is None:
      advice = (f"Put the original files ({', '.join(info.manual_files)}) in "
                "that folder (for MNIST they are in ../shared/data/mnist), or "
                "unset data.manual_dir to download them.")
    raise R2D2Error(
        f"Offline data for {info.name!r} is incomplete: {', '.join(missing)} "
        f"not found in manual_dir={manual_dir!r}. {advice}")


def _bad_mnist_file(path: str, problem: str) -> R2D2Error:
  return R2D2Error(
      f"MNIST file {path} {problem}. Replace it with the original file (from "
      "http://yann.lecun.com/exdb/mnist/ or its mirrors; also in "
      "../shared/data/mnist), or unset data.manual_dir to download it.")


def check_mnist_file(path: str) -> None:
  """Raises an error naming `path` unless it is the original MNIST file.

  A file whose sha256 is the original's passes at once. Otherwise it says what
  is wrong: not gzip or truncated, not an idx file of the right kind, images
  not 28x28, the wrong number of examples, missing bytes, labels outside 0..9,
  or (all of that fine) simply different content.

  Args:
    path: one of the four MNIST files (its name says which).
  """
  name = os.path.basename(path)
  with open(path, "rb") as f:
    raw = f.read()
  digest = hashlib.sha256(raw).hexdigest()
  if digest == _MNIST_SHA256[name]:
    return
  try:
    data = gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise _bad_mnist_file(path, f"is not a complete gzip file ({e}): it is "
                          "truncated or corrupt") from None
  images = "images" in name
  kind = "image" if images else "label"
  magic, header = (2051, 16) if images else (2049, 8)
  expected_count = 60_000 if name.startswith("train") else 10_000
  if len(data) < header:
    raise _bad_mnist_file(path, f"holds {len(data)} bytes, fewer than an idx "
                          f"{kind} file's {header}-byte header")
  got_magic, count = struct.unpack(">II", data[:8])
  if got_magic != magic:
    raise _bad_mnist_file(path, f"starts with magic number {got_magic}, not "
                          f"{magic}: it is not an idx {kind} file")
  if images:
    rows, cols = struct.unpack(">II", data[8:16])
    if (rows, cols) != (28, 28):
      raise _bad_mnist_file(path, f"holds images of {rows}x{cols} pixels, "
                            "not 28x28")
  if count != expected_count:
    raise _bad_mnist_file(path, f"holds {count} {kind}s, not {expected_count}")
  body = count * (28 * 28 if images else 1)
  if len(data) - header != body:
    raise _bad_mnist_file(path, f"has {len(data) - header} bytes of {kind}s "
                          f"after its header, not {body}")
  if not images:
    labels = np.frombuffer(data, np.uint8, offset=header)
    if labels.max() > 9:
      raise _bad_mnist_file(path, f"has labels in [{labels.min()}, "
                            f"{labels.max()}], outside [0, 9]")
  raise _bad_mnist_file(path, f"is not the original: its sha256 is {digest}, "
                        f"the original's {_MNIST_SHA256[name]}")


def check_manual_files(info: DatasetInfo, manual_dir: str) -> None:
  """Checks the files of `manual_dir` we know the contents of (MNIST's)."""
  if info.name == "mnist":
    for f in info.manual_files:
      check_mnist_file(os.path.join(manual_dir, f))


def _load_tfds(info: DatasetInfo, data_dir: str | None,
               manual_dir: str | None) -> dict[str, ArraySplit]:
  if manual_dir:
    check_manual_dir(info, manual_dir)
    check_manual_files(info, manual_dir)
  _, tfds = tfds_extra.import_tfds(f"dataset {info.name!r}")
  kwargs = {}
  if manual_dir:
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
    if not len(s.images):
      raise R2D2Error(f"{source}: split {name!r} has no examples.")
    if s.labels.ndim != 1 or not np.issubdtype(s.labels.dtype, np.integer):
      raise R2D2Error(
          f"{source}: split {name!r} has labels of shape {s.labels.shape} and "
          f"dtype {s.labels.dtype}, expected one integer class per image.")
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
                   manual_dir: str | None = None,
                   image_size: Any = None) -> dict[str, ArraySplit]:
  """Loads the train and test splits of a small dataset into host memory.

  Args:
    name: a dataset name from `DATASETS` with `in_memory=True`, or a user
      dataset ('tfds:NAME', 'folder:PATH', 'npz:PATH').
    data_dir: tensorflow-datasets data dir (None: its default).
    manual_dir: folder with the original files, for an offline build.
    image_size: user datasets only: data.image_size, (H, W) or S to resize
      to, None to keep the images' size.

  Returns:
    {"train": ArraySplit, "test": ArraySplit}, validated. A user dataset's
    unlabeled images are the train split's last rows, labeled
    `custom.UNKNOWN_LABEL` (-1).
  """
  if custom.is_custom(name):
    return dict(custom.load(name, data_dir, image_size).splits)
  info = get_info(name)
  if not info.in_memory:
    raise R2D2Error(f"Dataset {name!r} is streamed, not held in memory.")
  loader = _LOADERS.get(name, _load_tfds)
  splits = loader(info, data_dir, manual_dir)
  validate(info, splits, source=_describe_source(info, data_dir, manual_dir)
           if loader is _load_tfds else f"dataset {name!r}")
  return splits


def _describe_source(info: DatasetInfo, data_dir: str | None,
                     manual_dir: str | None) -> str:
  """Where tensorflow_datasets read `info`'s data: its folder, and manual_dir."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    where = str(tfds.builder(info.tfds_name, data_dir=data_dir).data_dir)
  except Exception:  # pylint: disable=broad-except
    where = f"data_dir={data_dir!r}"
  out = f"dataset {info.name!r} (tensorflow_datasets folder {where}"
  return out + (f", manual_dir={manual_dir!r})" if manual_dir else ")")
