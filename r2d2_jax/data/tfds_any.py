"""`tfds:NAME`: any tensorflow-datasets image classification builder.

The builder's `info` gives the image and label features (its
`supervised_keys`, else 'image' and 'label'), the number of classes (the
label's `ClassLabel`) and the splits: 'train'; the first of 'test',
'validation', 'valid', 'val' as the test split; and 'unlabeled', if the builder
has one, as unlabeled images (a builder whose info lists no splits even after
preparing, i.e. under `tfds.testing.mock_data`, is read as 'train' and
'test'). The images are read once into memory. A builder
with images of varying size needs `data.image_size`. tensorflow_datasets (and
so tensorflow) is imported here only, when such a dataset is loaded.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from r2d2_jax.data import custom
from r2d2_jax.data import tfds_extra
from r2d2_jax.errors import R2D2Error

_TEST_SPLITS = ("test", "validation", "valid", "val")


def _builder(tfds: Any, name: str, data_dir: str | None) -> Any:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises many kinds; all mean "no such builder".
    raise R2D2Error(
        f"data.dataset='tfds:{name}': tensorflow_datasets cannot make builder "
        f"{name!r} ({type(e).__name__}: {e}). Use the name of a "
        "tensorflow-datasets image classification dataset, e.g. "
        "tfds:fashion_mnist.") from None


def split_names(info: Any) -> list[str]:
  """The builder's split names; 'train' and 'test' if its info lists none.

  Only a builder that has not been prepared lists none after
  `download_and_prepare`: `tfds.testing.mock_data` without metadata files.
  """
  return list(info.splits.keys()) or ["train", "test"]


def read(name: str, data_dir: str | None, size: tuple[int, int] | None
         ) -> custom.Raw:
  """Reads `name`'s train / test (/ unlabeled) splits into memory."""
  _, tfds = tfds_extra.import_tfds(f"dataset 'tfds:{name}'")
  source = f"tfds:{name}"
  builder = _builder(tfds, name, data_dir)
  info = builder.info
  keys = info.supervised_keys
  image_key, label_key = ((keys[0], keys[1]) if keys and len(keys) == 2 and
                          all(isinstance(k, str) for k in keys)
                          else ("image", "label"))
  features = info.features
  image_f = features[image_key] if image_key in features else None
  label_f = features[label_key] if label_key in features else None
  if not isinstance(image_f, tfds.features.Image) or not isinstance(
      label_f, tfds.features.ClassLabel):
    raise R2D2Error(
        f"{source}: not an image classification dataset: its features are "
        f"{', '.join(features.keys())}; it needs an Image feature "
        f"{image_key!r} and a ClassLabel {label_key!r}.")
  if not info.splits:
    # Not prepared yet: download and prepare it now (as tfds.load would), so
    # that its info knows the splits.
    try:
      builder.download_and_prepare()
    except Exception as e:  # pylint: disable=broad-except
      raise R2D2Error(
          f"{source}: tensorflow_datasets could not download and prepare it "
          f"(data_dir={data_dir!r}): {type(e).__name__}: {e}") from e
    info = builder.info
  splits = split_names(info)
  test = next((s for s in _TEST_SPLITS if s in splits), None)
  if "train" not in splits or test is None:
    raise R2D2Error(
        f"{source}: needs a 'train' split and one of {', '.join(_TEST_SPLITS)}"
        f"; it has {', '.join(splits) or 'none'}.")
  fixed = image_f.shape is not None and all(d is not None
                                            for d in image_f.shape)

  def load(split: str, with_labels: bool):
    try:
      ds = tfds.load(name, split=split, data_dir=data_dir,
                     shuffle_files=False, batch_size=4096 if fixed else None)
      images, labels = [], []
      for ex in tfds.as_numpy(ds):
        x = ex[image_key]
        x = x[None] if not fixed else x
        if x.ndim == 3:
          x = x[..., None]
        images.append(custom.resize(x.astype(np.uint8), size))
        if with_labels:
          labels.append(np.reshape(ex[label_key], (-1,)))
    except R2D2Error:
      raise
    except Exception as e:  # tfds raises many kinds; all mean "cannot read it".
      raise R2D2Error(
          f"{source}: could not load split {split!r} with tensorflow_datasets "
          f"(data_dir={data_dir!r}): {type(e).__name__}: {e}") from e
    shapes = {x.shape[1:] for x in images}
    if len(shapes) > 1:
      raise R2D2Error(
          f"{source}: split {split!r} holds images of different shapes "
          f"({', '.join(str(s) for s in sorted(shapes))}). Set "
          "data.image_size=(H, W) (or S) to resize them all.")
    x = np.concatenate(images)
    return (x, np.concatenate(labels).astype(np.int64)) if with_labels else x

  train = load("train", True)
  test_split = load(test, True)
  unlabeled = load("unlabeled", False) if "unlabeled" in splits else None
  parts = [train[0], test_split[0]] + ([unlabeled] if unlabeled is not None
                                       else [])
  if len({p.shape[-1] for p in parts}) > 1:
    parts = [custom.to_rgb(p) for p in parts]
  if len({p.shape[1:] for p in parts}) > 1:
    raise R2D2Error(
        f"{source}: the splits hold images of different shapes; set "
        "data.image_size=(H, W) (or S) to resize them all.")
  return custom.Raw(
      train=(parts[0], train[1]), test=(parts[1], test_split[1]),
      unlabeled=parts[2] if unlabeled is not None else None,
      num_classes=int(label_f.num_classes), source=source,
      class_names=tuple(label_f.names))
