r"""A diagnostic: a trained run's BatchNorm statistics re-estimated on a pool.

  python -m benchmarks.bn_reestimate --workdir /tmp/R/vat_mnist/0 \
      --manual-dir ../shared/data/mnist --data-dir /tmp/tfdsmnist

During training a BatchNorm network keeps running averages of each layer's
batch statistics; which batches feed them is the method's choice (VAT, as
takerum/vat_tf, only the labeled forward: 100 distinct images on MNIST-100).
takerum/vat's ICLR-2016 MNIST code instead re-estimates the statistics on the
unlabeled data once training ends. This script measures what that choice is
worth on a finished run, without retraining: for the final and the
best-on-validation checkpoint it evaluates the network (validation and test
error, eval mode) with

- `trained`: the running averages the run kept;
- `labeled` / `unlabeled`: every BatchNorm layer's population statistics over
  that pool of the run's split (`split.json`): the layers are fed in train
  mode, batch by batch (`--batch`, default the run's unlabeled batch B·μ), so
  each layer sees the inputs it saw in training (earlier layers normalised by
  their batch's statistics), with the network's train-time noise off; the
  mean is the average of the batch means and the variance the pool's
  (average of batch variance + squared batch mean, minus the squared mean),
  each weighted by the batch's size. `unlabeled` is every train row outside
  the validation split (the pool VAT draws its unlabeled batches from when
  `data.unlabeled='all'`).

The validation error is printed beside the test error so that a choice among
the rows is made on validation; the test column is only reported. The model
must have a `bn_momentum` attribute that all its BatchNorm layers use (the
MLP and the CNNs of `r2d2_jax/models` do); the statistics are read by setting
it to 0 (a layer's running average becomes its batch's statistics).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r2d2_jax import inference
from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error

POOLS = ("trained", "labeled", "unlabeled")


def _stats_model(model):
  """The model with BN momentum 0 and train-time noise off; error if it has none."""
  if not hasattr(model, "bn_momentum"):
    raise R2D2Error(
        f"{type(model).__name__} has no `bn_momentum` attribute: this "
        "diagnostic reads BatchNorm statistics through it.")
  updates = dict(bn_momentum=0.0)
  if getattr(model, "noise_std", 0.0):
    updates["noise_std"] = 0.0
  return model.clone(**updates)


def population_stats(model, variables: dict, images: np.ndarray,
                     batch: int) -> dict:
  """Every BatchNorm layer's mean and variance over `images` (normalised floats).

  Args:
    model: the Flax module (`bn_momentum` attribute; see the module docstring).
    variables: its variables ({'params', 'batch_stats'}).
    images: float inputs [N, ...] in the order the batches take them.
    batch: images per train-mode forward.

  Returns:
    A `batch_stats` tree of the same structure as `variables['batch_stats']`.
  """
  stats_model = _stats_model(model)
  rngs = {n: jax.random.PRNGKey(0)
          for n in getattr(model, "rng_names", ("dropout",))}

  @jax.jit
  def batch_stats(x):
    _, new = stats_model.apply(variables, x, train=True, rngs=rngs,
                               mutable=["batch_stats"])
    return new["batch_stats"]

  total, mean_acc, sq_acc = 0, None, None
  for start in range(0, len(images), batch):
    x = jnp.asarray(images[start:start + batch])
    n = x.shape[0]
    s = batch_stats(x)
    m = _leaves(s, "mean")
    v = _leaves(s, "var")
    sq = {k: v[k] + m[k] ** 2 for k in m}
    if mean_acc is None:
      mean_acc = {k: n * np.asarray(m[k], np.float64) for k in m}
      sq_acc = {k: n * np.asarray(sq[k], np.float64) for k in sq}
    else:
      for k in m:
        mean_acc[k] += n * np.asarray(m[k], np.float64)
        sq_acc[k] += n * np.asarray(sq[k], np.float64)
    total += n
  if not total:
    raise R2D2Error("population_stats: no images.")
  out: dict[str, Any] = {}
  for k in mean_acc:
    mean = mean_acc[k] / total
    var = np.maximum(sq_acc[k] / total - mean ** 2, 0.0)
    out[k] = dict(mean=jnp.asarray(mean, jnp.float32),
                  var=jnp.asarray(var, jnp.float32))
  return out


def _leaves(stats: Any, name: str) -> dict[str, jax.Array]:
  """{layer path: stats[...][name]} of a batch_stats tree (nested dicts)."""
  out = {}

  def walk(node, path):
    if isinstance(node, dict) or hasattr(node, "keys"):
      if name in node and not hasattr(node[name], "keys"):
        out["/".join(path)] = node[name]
        return
      for key in node:
        walk(node[key], path + (key,))
  walk(stats, ())
  return out


def _nest(flat: dict[str, dict]) -> dict:
  """{'a/b': {'mean', 'var'}} -> {'a': {'b': {'mean', 'var'}}}."""
  out: dict = {}
  for path, leaf in flat.items():
    node = out
    keys = path.split("/")
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = leaf
  return out


def error(predictor: inference.Predictor, variables: dict, images: np.ndarray,
          labels: np.ndarray) -> float:
  """Test error % of the eval-mode network with `variables`."""
  correct = 0
  bs = predictor.batch_size
  for start in range(0, len(images), bs):
    logits = predictor.apply(variables, jnp.asarray(images[start:start + bs]))
    correct += int(np.sum(np.argmax(np.asarray(logits), -1) ==
                          labels[start:start + bs]))
  return 100.0 * (1.0 - correct / len(labels))


def pools(split: dict, num_train: int) -> dict[str, np.ndarray]:
  """Row indices of the labeled set and of every train row outside val."""
  val = np.asarray(split["val"], np.int64)
  rest = np.setdiff1d(np.arange(num_train), val)
  return dict(labeled=np.asarray(split["labeled"], np.int64), unlabeled=rest)


def run(argv: Sequence[str]) -> str:
  p = argparse.ArgumentParser(prog="python -m benchmarks.bn_reestimate",
                              description=__doc__.split("\n\n")[1])
  p.add_argument("--workdir", required=True, help="one run (a seed's folder)")
  p.add_argument("--weights", nargs="+", default=["final", "best"],
                 choices=("final", "best"))
  p.add_argument("--variables", default="raw")
  p.add_argument("--batch", type=int, default=None,
                 help="images per train-mode forward (default: B·μ)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--manual-dir", default=None)
  p.add_argument("--shuffle-seed", type=int, default=0,
                 help="order of the pool's rows in the batches")
  args = p.parse_args(list(argv))
  split_path = os.path.join(args.workdir, "split.json")
  if not os.path.exists(split_path):
    raise R2D2Error(f"{split_path} does not exist: --workdir is one run's "
                    "folder (the one holding split.json and checkpoints/).")
  with open(split_path) as f:
    split = json.load(f)
  data = None
  lines = ["| weights | step | BN statistics | val error % | test error % |",
           "| --- | ---: | --- | ---: | ---: |"]
  for which in args.weights:
    pred = inference.load(args.workdir, which=which, variables=args.variables)
    if data is None:
      data = sources.load_in_memory(pred.config.data.dataset, args.data_dir,
                                    args.manual_dir)
      train, test = data["train"], data["test"]
      rows = pools(split, len(train))
      val = np.asarray(split["val"], np.int64)
      batch = args.batch or int(pred.config.data.batch_size *
                                max(1, pred.config.data.uratio))
      order = np.random.default_rng(args.shuffle_seed)
      rows = {k: order.permutation(v) for k, v in rows.items()}
    model = pred.net.model
    for pool in POOLS:
      variables = dict(pred.variables)
      if pool != "trained":
        x = inference.normalize(jnp.asarray(train.images[rows[pool]]),
                                pred.info)
        variables["batch_stats"] = _nest(population_stats(
            model, pred.variables, np.asarray(x), batch))
      v_err = error(pred, variables, train.images[val], train.labels[val])
      t_err = error(pred, variables, test.images, test.labels)
      lines.append(f"| {which} | {pred.step} | {pool} | {v_err:.2f} | "
                   f"{t_err:.2f} |")
      print(lines[-1], flush=True)
  table = "\n".join(lines)
  return table


def main() -> None:
  try:
    print(run(sys.argv[1:]))
  except R2D2Error as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
