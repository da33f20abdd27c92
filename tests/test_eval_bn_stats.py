"""`eval_bn_stats='unlabeled'`: evaluations with BN statistics re-estimated on the pool.

The statistics are recomputed here in numpy from the formula (pool mean and
biased variance of every BatchNorm layer's input, each batch's forward
normalised by its own statistics), the evaluation by a numpy eval-mode
forward; and training must not see any of it.
"""

import shutil

import chex
import jax
import ml_collections
import numpy as np
import pytest

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import inference
from r2d2_jax import metrics as metrics_lib
from r2d2_jax import train
from r2d2_jax.data.views import normalize
from r2d2_jax.errors import R2D2Error
from tests import helpers

EPS = 1e-5     # flax BatchNorm's ε
BATCH = 40     # eval_bn_batch_size


def _config(**overrides):
  c = helpers.tiny_config("supervised", **{
      "eval_bn_stats": "unlabeled", "eval_bn_batch_size": BATCH,
      "ema_decay": 0.0, **overrides})
  c.model.name = "mlp_mnist"
  # One hidden layer and BN on the logits; noise that the statistics must skip.
  c.model.kwargs = ml_collections.ConfigDict(dict(
      widths=(4,), top_bn=True, bn_momentum=0.9, noise_std=0.5))
  return c


def _bn(z, mean, var, scale, bias):
  return (z - mean) / np.sqrt(var + EPS) * scale + bias


def _numpy_pool_stats(params, x):
  """Both layers' pool mean / variance, batches of BATCH normalised in train mode."""
  w1 = params["dense1"]["kernel"]
  wc = params["classifier"]["kernel"]
  g, b = params["bn1"]["scale"], params["bn1"]["bias"]
  pre1, pre2 = [], []
  for s in range(0, len(x), BATCH):
    z = x[s:s + BATCH] @ w1
    h = np.maximum(_bn(z, z.mean(0), z.var(0), g, b), 0.0)
    pre1.append(z)
    pre2.append(h @ wc)
  pre1, pre2 = np.concatenate(pre1), np.concatenate(pre2)
  return dict(bn1=(pre1.mean(0), pre1.var(0)),
              bn_top=(pre2.mean(0), pre2.var(0)))


def _numpy_logits(params, stats, x):
  """The eval-mode forward with the given statistics."""
  p = params
  z = _bn(x @ p["dense1"]["kernel"], *stats["bn1"], p["bn1"]["scale"],
          p["bn1"]["bias"])
  h = np.maximum(z, 0.0)
  return _bn(h @ p["classifier"]["kernel"], *stats["bn_top"],
             p["bn_top"]["scale"], p["bn_top"]["bias"])


def _flat(images, info):
  x = np.asarray(normalize(images, info), np.float64)
  return x.reshape(len(x), -1)


def test_statistics_and_evaluation_follow_the_formula(tmp_path):
  c = _config()
  stage = train.Stage(c, str(tmp_path))
  state, _ = helpers.run_steps(stage, 3)
  pipe = stage.pipeline
  params = jax.tree.map(lambda v: np.asarray(v, np.float64),
                        jax.device_get(state.params))
  # The pool in the order the trainer takes it: a fixed shuffle by the seed,
  # whole batches only.
  rows = pipe.split.unlabeled
  order = rows[np.random.default_rng(c.seed).permutation(len(rows))]
  order = order[:len(order) // BATCH * BATCH]
  assert len(order) < len(rows)   # the partial batch is really left out
  want = _numpy_pool_stats(params, _flat(pipe.train.images[order], stage.info))

  got = jax.device_get(stage.eval_networks(state)["raw"]["batch_stats"])
  for layer, (mean, var) in want.items():
    np.testing.assert_allclose(got[layer]["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[layer]["var"], var, rtol=1e-4, atol=1e-5)
  # The state keeps its running averages.
  kept = jax.device_get(state.variables()["batch_stats"])
  assert not np.allclose(kept["bn1"]["mean"], want["bn1"][0], atol=1e-3)

  # The evaluation: accuracy and CE of the eval-mode forward with them.
  metrics = stage.evaluate(state, "test")
  logits = _numpy_logits(params, want, _flat(pipe.test.images, stage.info))
  labels = pipe.test.labels
  accuracy = np.mean(np.argmax(logits, -1) == labels)
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  xe = -np.mean(logp[np.arange(len(labels)), labels])
  assert abs(metrics["accuracy/test/raw"] - accuracy) <= 1.0 / len(labels)
  np.testing.assert_allclose(metrics["losses/eval_xe/test/raw"], xe,
                             rtol=1e-4)


def test_training_is_unchanged_and_only_evaluations_differ(tmp_path):
  runs = {}
  for mode in ("trained", "unlabeled"):
    c = _config(total_steps=4, eval_every_steps=2, eval_bn_stats=mode)
    c.data.num_val = 100
    train.train_and_evaluate(c, str(tmp_path / mode))
    state, _ = ckpt_lib.restore_raw(str(tmp_path / mode))
    history = metrics_lib.read_history(
        str(tmp_path / mode / metrics_lib.EVAL_HISTORY))
    runs[mode] = (state, history)
  chex.assert_trees_all_equal(runs["trained"][0], runs["unlabeled"][0])
  (_, h_trained), (_, h_unlabeled) = runs["trained"], runs["unlabeled"]
  assert [r["step"] for r in h_trained] == [r["step"] for r in h_unlabeled]
  for a, b in zip(h_trained, h_unlabeled):
    for key in ("losses/eval_xe/val/raw", "losses/eval_xe/test/raw"):
      assert a[key] != b[key], key


def test_predictions_reproduce_the_evaluations(tmp_path):
  """inference.load uses the statistics the evaluation used (checkpoint meta)."""
  c = _config(total_steps=4, eval_every_steps=2, checkpoint_every_steps=2,
              eval_bn_stats="unlabeled")
  c.data.num_val = 100
  work = str(tmp_path / "run")
  train.train_and_evaluate(c, work)
  history = {r["step"]: r for r in metrics_lib.read_history(
      str(tmp_path / "run" / metrics_lib.EVAL_HISTORY))}
  test = train.Stage(c, str(tmp_path / "data")).pipeline.test
  for which in ("final", "best"):
    pred = inference.load(work, which=which, variables="raw")
    assert pred.bn_stats == "unlabeled"
    accuracy = np.mean(pred.predict(test.images) == test.labels)
    assert accuracy == pytest.approx(
        history[pred.step]["accuracy/test/raw"], abs=1e-6), which
  # The running averages: a forward with the checkpoint's own statistics.
  pred = inference.load(work, which="final", variables="raw",
                        bn_stats="trained")
  state, _ = ckpt_lib.restore_raw(work)
  chex.assert_trees_all_equal(
      jax.device_get(pred.variables["batch_stats"]),
      jax.device_get(state["model_state"]["batch_stats"]))
  # A checkpoint saved at a step without an evaluation has no re-estimate.
  c2 = _config(total_steps=4, eval_every_steps=4, checkpoint_every_steps=2,
               checkpoint_keep=3)
  work2 = tmp_path / "run2"
  train.train_and_evaluate(c2, str(work2))
  shutil.rmtree(work2 / "checkpoints" / "4")
  with pytest.raises(R2D2Error, match="no re-estimated"):
    inference.load(str(work2), which="final", variables="raw")
  assert inference.load(str(work2), which="final", variables="raw",
                        bn_stats="trained").step == 2


@pytest.mark.parametrize("overrides, match", [
    (dict(eval_bn_stats="pool"), "use 'trained'"),
    (dict(eval_bn_batch_size=100000), "fewer than one batch"),
])
def test_bad_settings_say_what_to_change(tmp_path, overrides, match):
  c = _config(**overrides)
  with pytest.raises(R2D2Error, match=match):
    stage = train.Stage(c, str(tmp_path))
    stage.eval_networks(stage.init_state())


def test_a_model_without_batchnorm_is_refused(tmp_path):
  c = _config()
  c.model.name = "vit_digits"
  c.model.kwargs = ml_collections.ConfigDict()
  with pytest.raises(R2D2Error, match="no `bn_momentum`"):
    train.Stage(c, str(tmp_path))
