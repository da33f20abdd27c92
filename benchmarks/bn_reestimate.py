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
  each weighted by the batch's size (`r2d2_jax/bn_stats.py`). `unlabeled` is
  every train row outside the validation split (the pool VAT draws its
  unlabeled batches from when `data.unlabeled='all'`).

The validation error is printed beside the test error so that a choice among
the rows is made on validation; the test column is only reported. The model
must have a `bn_momentum` attribute that all its BatchNorm layers use (see
`r2d2_jax/bn_stats.py`). A run trained with `eval_bn_stats='unlabeled'`
already evaluated with the `unlabeled` statistics at every evaluation (its
checkpoints hold the running averages, and the re-estimate in their
metadata); `trained` here reads the running averages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from r2d2_jax import bn_stats
from r2d2_jax import inference
from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error

POOLS = ("trained", "labeled", "unlabeled")


def error(predictor: inference.Predictor, images: np.ndarray,
          labels: np.ndarray) -> float:
  """Error % of the predictor's eval-mode network on uint8 `images`."""
  return 100.0 * float(np.mean(predictor.predict(images) != labels))


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
  preds = [inference.load(args.workdir, which=which, variables=args.variables,
                          bn_stats="trained")
           for which in args.weights]
  config, info = preds[0].config, preds[0].info
  data = sources.load_in_memory(config.data.dataset, args.data_dir,
                                args.manual_dir)
  train, test = data["train"], data["test"]
  val = np.asarray(split["val"], np.int64)
  batch = args.batch or int(config.data.batch_size *
                            max(1, config.data.uratio))
  order = np.random.default_rng(args.shuffle_seed)
  inputs = {k: np.asarray(inference.normalize(
      jnp.asarray(train.images[order.permutation(v)]), info))
            for k, v in pools(split, len(train)).items()}
  lines = ["| weights | step | BN statistics | val error % | test error % |",
           "| --- | ---: | --- | ---: | ---: |"]
  for which, pred in zip(args.weights, preds):
    for pool in POOLS:
      net = pred
      if pool != "trained":
        stats = bn_stats.population_stats(pred.net.model, pred.variables,
                                          inputs[pool], batch)
        net = dataclasses.replace(
            pred, variables=dict(pred.variables, batch_stats=stats))
      v_err = error(net, train.images[val], train.labels[val])
      t_err = error(net, test.images, test.labels)
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
