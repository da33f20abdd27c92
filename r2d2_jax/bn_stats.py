"""BatchNorm population statistics of a trained network over a pool of images.

During training a BatchNorm network keeps running averages of each layer's
batch statistics, fed by whichever forward passes the method runs in train
mode (VAT, as takerum/vat_tf, only the labeled one: 100 distinct images on
MNIST-100). takerum/vat's ICLR-2016 MNIST code instead re-estimates them on the
unlabeled data. This module computes such estimates:

- every BatchNorm layer is fed in train mode, batch by batch, so that each
  layer sees the inputs it saw in training (earlier layers normalised by their
  batch's statistics), with the network's train-time noise off (the model's
  `NOISE_ATTRS` set to 0);
- a layer's mean is the size-weighted average of its batch means, its variance
  the pool's: the average of (batch variance + squared batch mean) minus the
  squared mean.

The model must have a `bn_momentum` attribute that all its BatchNorm layers
use (the MLP, the CNNs and the ResNets of `r2d2_jax/models` do): a layer's
running average is read by setting it to 0 (the average becomes the batch's
statistics). Used by the trainer (`config.eval_bn_stats`, see
docs/algorithms.md) and by `benchmarks/bn_reestimate.py`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax
from flax import traverse_util
import jax
import numpy as np

from r2d2_jax.errors import R2D2Error

PyTree = Any

# Train-time noise a model may have, switched off while statistics are read.
NOISE_ATTRS = ("noise_std", "input_noise_std", "dropout_rate",
               "attention_dropout_rate", "drop_path_rate")


def stats_model(model):
  """The model with BN momentum 0 and its train-time noise off.

  Raises:
    R2D2Error: the model has no `bn_momentum` attribute.
  """
  if not hasattr(model, "bn_momentum"):
    raise R2D2Error(
        f"{type(model).__name__} has no `bn_momentum` attribute: BatchNorm "
        "statistics are re-estimated through it (eval_bn_stats='trained' "
        "keeps the running averages).")
  updates = dict(bn_momentum=0.0)
  for name in NOISE_ATTRS:
    if getattr(model, name, 0.0):
      updates[name] = 0.0
  return model.clone(**updates)


def batch_stats_fn(model) -> Callable[[PyTree, jax.Array], PyTree]:
  """`f(variables, x) -> batch_stats`: one batch's BN statistics (pure; jit it)."""
  smodel = stats_model(model)
  names = getattr(model, "rng_names", ("dropout",))

  def batch_stats(variables, x):
    rngs = {n: jax.random.key(0) for n in names}
    _, new = smodel.apply(
        {"params": variables["params"],
         "batch_stats": variables["batch_stats"]},
        x, train=True, rngs=rngs, mutable=["batch_stats"])
    return new["batch_stats"]

  return batch_stats


def combine(per_batch: Iterable[tuple[int, PyTree]]) -> PyTree:
  """The pool's statistics from (batch size, that batch's statistics) pairs.

  Args:
    per_batch: for each batch its number of images n and its `batch_stats`
      tree ({..., 'mean': [C], 'var': [C]} per layer, the biased variance).

  Returns:
    A float32 `batch_stats` tree of the same structure: per layer the mean
    Σ n·mean / N and the variance Σ n·(var + mean²) / N − mean², accumulated
    in float64.

  Raises:
    R2D2Error: no batch.
  """
  sums: dict[tuple[str, ...], np.ndarray] = {}
  total = 0
  for n, stats in per_batch:
    flat = traverse_util.flatten_dict(
        flax.core.unfreeze(jax.device_get(stats)))
    for path, value in flat.items():
      value = np.asarray(value, np.float64)
      if path[-1] == "var":
        value = value + np.asarray(flat[path[:-1] + ("mean",)],
                                   np.float64) ** 2
      sums[path] = sums.get(path, 0.0) + n * value
    total += n
  if not total:
    raise R2D2Error("BatchNorm statistics: the pool gave no images.")
  out = {}
  for path, value in sums.items():
    if path[-1] == "mean":
      mean = value / total
      var = np.maximum(sums[path[:-1] + ("var",)] / total - mean ** 2, 0.0)
      out[path] = mean.astype(np.float32)
      out[path[:-1] + ("var",)] = var.astype(np.float32)
  return traverse_util.unflatten_dict(out)


def population_stats(model, variables: PyTree, images: np.ndarray,
                     batch: int) -> PyTree:
  """Every BatchNorm layer's mean and variance over `images` (one host).

  Args:
    model: the Flax module (`bn_momentum` attribute; see the module docstring).
    variables: its variables ({'params', 'batch_stats'}).
    images: normalised float inputs [N, ...] in the order the batches take
      them; the last batch may be smaller.
    batch: images per train-mode forward.

  Returns:
    A `batch_stats` tree of the same structure as `variables['batch_stats']`.
  """
  fn = jax.jit(batch_stats_fn(model))
  return combine((len(images[s:s + batch]), fn(variables, images[s:s + batch]))
                 for s in range(0, len(images), batch))
