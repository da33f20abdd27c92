"""TensorFlow and tensorflow-datasets: the optional `tfds` extra.

Only the datasets read through tensorflow-datasets need them (MNIST, CIFAR,
SVHN, ImageNet); the rest of r2d2_jax, the embedded digits included, never
imports TensorFlow. `pip install -e ".[tfds]"` installs them.
"""

from __future__ import annotations

from typing import Any

from r2d2_jax.errors import R2D2Error

INSTALL = 'pip install -e ".[tfds]"'


def import_tfds(what: str) -> tuple[Any, Any]:
  """The modules (tensorflow, tensorflow_datasets), imported on first use.

  Args:
    what: what needs them, for the error, e.g. "dataset 'cifar10'".

  Raises:
    R2D2Error: either is missing (or fails to import), naming the extra that
      installs them.
  """
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise R2D2Error(
        f"{what} is read with tensorflow-datasets, and TensorFlow or "
        f"tensorflow-datasets cannot be imported ({type(e).__name__}: {e}). "
        f"Install the tfds extra from the repository's root: {INSTALL} (it "
        "adds tensorflow-cpu and tensorflow-datasets), or pick a dataset that "
        "needs no TensorFlow, such as data.dataset='digits'.") from e
  return tf, tfds
