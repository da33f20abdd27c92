"""R2-D2: label gradient, theorems, the sharded table, reprediction, resume."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import common
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import table as table_lib
from r2d2_jax import train
from r2d2_jax.data import views
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import r2d2
from tests import helpers


def r2d2_config(label_grad="closed_form", **overrides):
  c = helpers.tiny_config("r2d2", **overrides)
  common.r2d2_block(c)
  c.r2d2.label_grad = label_grad
  c.data.uratio = 3
  return c


# ---------------------------------------------------------------------------
# The label gradient and the theorems (float64, no network)


def test_closed_form_label_gradient_equals_autodiff():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(12, 7)) * 3)
    rows = jnp.asarray(rng.normal(size=(12, 7)) * 3)
    closed = r2d2.label_grad_closed_form(logits, rows, 0.1)
    auto = r2d2.label_grad_autodiff(logits, rows, 0.1, 0.03)
    assert closed.dtype == jnp.float64
    np.testing.assert_allclose(closed, auto, atol=1e-6, rtol=1e-6)
    # Each row's step sums to zero over classes (the equality constraint).
    np.testing.assert_allclose(closed.sum(-1), 0.0, atol=1e-15)


@pytest.mark.parametrize("alpha,beta", [(0.1, 0.03), (1.0, 0.5)])
def test_theorem1_stationary_point_is_exponential_transform(alpha, beta):
  """With Y fixed, descending L in the network's logits gives q ∝ p^(1−β/α)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    rows = jnp.asarray(rng.normal(size=(5, 10)))   # Y, fixed
    loss = lambda z: r2d2.d2_loss(z, rows, alpha, beta) * z.shape[0]
    grad = jax.jit(jax.grad(loss))
    z = jnp.zeros_like(rows)
    # The curvature in z scales with α − β; a step of 1/(α − β) is stable.
    step = 1.0 / (alpha - beta)
    z = jax.lax.fori_loop(0, 50000, lambda _, z: z - step * grad(z), z)
    assert float(jnp.max(jnp.abs(grad(z)))) < 1e-8
    log_p = jax.nn.log_softmax(z)
    log_q = jax.nn.log_softmax(rows)
    for i in range(rows.shape[0]):
      x = log_p[i] - log_p[i].mean()
      y = log_q[i] - log_q[i].mean()
      slope = float(jnp.dot(x, y) / jnp.dot(x, x))
      assert abs(slope - (1 - beta / alpha)) < 1e-3
      # Theorem 2: the largest pseudo-label probability is at most p's.
      n = int(jnp.argmax(log_p[i]))
      assert float(jnp.exp(log_q[i, n])) <= float(jnp.exp(log_p[i, n])) + 1e-12
    # The paper's form of the largest entry: q_n = exp(−β/α)·p_n^(1−β/α) holds
    # up to the normaliser, i.e. log q − (1−β/α) log p is constant over classes.
    resid = log_q - (1 - beta / alpha) * log_p
    np.testing.assert_allclose(resid - resid.mean(-1, keepdims=True), 0.0,
                               atol=1e-4)


# ---------------------------------------------------------------------------
# Hyperparameters: config.r2d2, parsed once, for D2/R2 and the finetune


FIELDS = ("alpha", "beta", "label_lr", "label_grad", "repredict_epochs",
          "finetune_labels")


def test_hparams_parse_the_block():
  hp = r2d2.hparams(r2d2_config("autodiff"))
  assert (hp.alpha, hp.beta, hp.label_lr) == (0.1, 0.03, 4000 / 512)
  assert hp.label_grad == "autodiff" and hp.finetune_labels == "repredict"
  assert hp.repredict_epochs == (0.0,)
  with pytest.raises(dataclasses.FrozenInstanceError):
    hp.alpha = 1.0  # type: ignore[misc]
  # Optional keys take their defaults; the finetune reads the same block.
  c = r2d2_config()
  for k in ("label_grad", "repredict_epochs", "finetune_labels"):
    del c.r2d2[k]
  hp = r2d2.hparams(c)
  assert (hp.label_grad, hp.repredict_epochs, hp.finetune_labels) == (
      "closed_form", (), "repredict")
  assert r2d2.FINETUNE.hparams is r2d2.METHOD.hparams


def test_unknown_key_is_an_error_naming_it_and_the_fields():
  c = r2d2_config()
  c.r2d2.lambda_ = 4000.0
  with pytest.raises(R2D2Error,
                     match="config.r2d2: unknown key.* lambda_") as e:
    r2d2.hparams(c)
  for field in FIELDS:
    assert field in str(e.value), (field, str(e.value))


@pytest.mark.parametrize("key,value,message", [
    ("label_lr", -1.0, r"label_lr=-1.0 is outside \[0.0, inf\]"),
    ("alpha", -0.1, r"alpha=-0.1 is outside \[0.0, inf\]"),
    ("beta", -0.03, r"beta=-0.03 is outside \[0.0, inf\]"),
    ("label_grad", "numeric", "label_grad='numeric'; choose one of "
                              "'closed_form', 'autodiff'"),
    ("finetune_labels", "argmax", "finetune_labels='argmax'; choose one of "
                                  "'repredict', 'table'"),
    ("repredict_epochs", (0.0, -1.0),
     r"repredict_epochs entry=-1.0 is outside"),
    ("repredict_epochs", 0.0, "repredict_epochs=0.0 must be a sequence"),
    ("label_lr", "7.8", "label_lr='7.8' must be a number"),
])
def test_bad_value_is_an_error_naming_the_field(key, value, message):
  c = r2d2_config()
  # A fresh block: ConfigDict would refuse a value of another type.
  c.r2d2 = ml_collections.ConfigDict({**c.r2d2.to_dict(), key: value})
  with pytest.raises(R2D2Error, match=message):
    r2d2.hparams(c)


def test_missing_block_or_required_key_is_an_error():
  c = r2d2_config()
  del c.r2d2.alpha
  with pytest.raises(R2D2Error, match="missing key.* alpha"):
    r2d2.hparams(c)
  c = helpers.tiny_config("r2d2")
  with pytest.raises(R2D2Error, match="config.r2d2 is missing.*r2d2_block"):
    r2d2.hparams(c)


# ---------------------------------------------------------------------------
# The sharded table


def test_gather_scatter_match_numpy_on_8_devices():
  mesh = sharding.make_mesh(jax.devices())
  rng = np.random.default_rng(0)
  table = rng.normal(size=(64, 5)).astype(np.float32)
  idx = np.array([3, 63, 0, 17, 17, 40, 8, 9], np.int32)
  delta = rng.normal(size=(8, 5)).astype(np.float32)
  t = jax.device_put(table, table_lib.table_sharding(mesh))
  i = jax.device_put(idx, NamedSharding(mesh, P("data")))
  d = jax.device_put(delta, NamedSharding(mesh, P("data", None)))
  np.testing.assert_array_equal(
      jax.jit(table_lib.gather_rows, static_argnums=2)(t, i, mesh), table[idx])
  expected = table.copy()
  np.add.at(expected, idx, delta)
  np.testing.assert_allclose(
      jax.jit(table_lib.scatter_add_rows, static_argnums=3)(t, i, d, mesh),
      expected, rtol=1e-6)


def test_imagenet_table_is_planned_at_one_eighth_per_device():
  mesh = sharding.make_mesh(jax.devices())
  n, c = 1_281_167, 1000
  rows = table_lib.padded_rows(n, mesh)
  abstract = jax.eval_shape(lambda: jnp.zeros((rows, c), jnp.float32))
  shard = table_lib.table_sharding(mesh).shard_shape(abstract.shape)
  total_bytes = rows * c * 4
  assert shard == (rows // 8, c)
  assert shard[0] * shard[1] * 4 == total_bytes // 8
  # And through the method's own state sharding, with a real (tiny) network.
  cfg = r2d2_config()
  stage = train.Stage(cfg, "/tmp/unused_r2d2_plan", mesh=mesh,
                      pipeline=_fake_pipeline(cfg, mesh, n_train=n, classes=10))
  spec = stage.state_shardings.table
  assert spec.spec == P("data", None)
  assert spec.shard_shape(stage.abstract_state.table.shape)[0] == rows // 8


def _fake_pipeline(cfg, mesh, n_train=200, classes=10):
  from r2d2_jax.data import pipeline as pipeline_lib
  from r2d2_jax.data import sources
  rng = np.random.default_rng(0)
  labels = (np.arange(n_train) % classes).astype(np.int32)
  # Images are never read in the planning test: a broadcast view costs nothing.
  images = np.broadcast_to(np.zeros((1, 8, 8, 1), np.uint8), (n_train, 8, 8, 1))
  test = sources.ArraySplit(rng.integers(0, 255, (8, 8, 8, 1), np.uint8),
                            labels[:8])
  return pipeline_lib.InMemoryPipeline(
      cfg.data, 0, mesh, arrays={"train": sources.ArraySplit(images, labels),
                                 "test": test})


# ---------------------------------------------------------------------------
# Steps on digits


def _stage(tmp_path, name, cfg, devices):
  return train.Stage(cfg, str(tmp_path / name),
                     mesh=sharding.make_mesh(devices))


def _steps(stage, state, n):
  batches = stage.pipeline.iterate(int(state.step), stage.streams)
  for _ in range(n):
    state, m = stage.train_step(state, next(batches))
  return state, m


def test_d2_step_properties(tmp_path):
  stage = _stage(tmp_path, "a", r2d2_config(), jax.devices()[:4])
  state = stage.init_state()
  state = r2d2.repredict(stage.hooks, state)
  before = np.asarray(state.table)
  labeled = stage.pipeline.split.labeled
  labels = stage.pipeline.train.labels
  # Labeled rows: logit 10 at the true class.
  np.testing.assert_array_equal(before[labeled].argmax(-1), labels[labeled])
  np.testing.assert_array_equal(before[labeled].max(-1), 10.0)
  state, m = _steps(stage, state, 3)
  after = np.asarray(state.table)
  np.testing.assert_array_equal(after[labeled], before[labeled])
  # Every unlabeled row's class-sum is invariant (the label steps sum to 0).
  np.testing.assert_allclose(after.sum(-1), before.sum(-1), atol=1e-4)
  changed = np.flatnonzero(np.abs(after - before).max(-1) > 0)
  assert len(changed) > 0
  assert not set(changed) & set(labeled.tolist())
  assert np.isfinite(float(m["losses/total"]))


def test_label_step_is_independent_of_batch_size():
  """One row's change per visit is label_lr·α·(q − p), whatever n is."""
  rng = np.random.default_rng(0)
  for n in (4, 64):
    logits = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
    rows = jnp.asarray(rng.normal(size=(n, 5)), jnp.float32)
    step = 7.8125 * n * r2d2.label_grad_closed_form(logits, rows, 0.1)
    expected = 7.8125 * 0.1 * (jax.nn.softmax(rows) - jax.nn.softmax(logits))
    np.testing.assert_allclose(step, expected, rtol=1e-5, atol=1e-7)


def test_reprediction_touches_only_unlabeled_rows(tmp_path):
  stage = _stage(tmp_path, "a", r2d2_config(), jax.devices()[:4])
  state = stage.init_state()
  before = np.asarray(state.table)
  state = r2d2.repredict(stage.hooks, state)
  after = np.asarray(state.table)
  labeled = stage.pipeline.split.labeled
  unlabeled = stage.pipeline.split.unlabeled
  np.testing.assert_array_equal(after[labeled], before[labeled])
  assert (np.abs(after[unlabeled]).max(-1) > 0).all()
  # Padding rows past the train split stay zero.
  np.testing.assert_array_equal(after[stage.task.num_train:], 0.0)
  # The written rows are the network's eval-mode logits.
  x = views.normalize(jnp.asarray(stage.pipeline.train.images[unlabeled[:5]]),
                      stage.info)
  logits = stage.net.apply_eval(state.variables(), x)
  np.testing.assert_allclose(after[unlabeled[:5]], logits, rtol=1e-4,
                             atol=1e-4)


def test_sharded_table_step_equals_single_device(tmp_path):
  s8 = _stage(tmp_path, "eight", r2d2_config(**{"data.batch_size": 16}),
              jax.devices())
  s1 = _stage(tmp_path, "one", r2d2_config(**{"data.batch_size": 16}),
              jax.devices()[:1])
  a, ma = _steps(s8, r2d2.repredict(s8.hooks, s8.init_state()), 2)
  b, mb = _steps(s1, r2d2.repredict(s1.hooks, s1.init_state()), 2)
  assert len(a.table.sharding.device_set) == 8
  assert a.table.sharding.spec == P("data", None)
  assert a.table.shape[0] % 8 == 0
  n = s1.task.num_train
  chex.assert_trees_all_close(np.asarray(a.table)[:n], np.asarray(b.table)[:n],
                              rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(jax.device_get(a.params),
                              jax.device_get(b.params), rtol=1e-5, atol=1e-6)


def _pipeline_config(**stage_steps):
  c = helpers.tiny_config()
  common.r2d2_stages(
      c,
      supervised=dict(total_steps=stage_steps.get("supervised", 2)),
      d2=dict(total_steps=stage_steps.get("d2", 2)),
      r2=dict(total_steps=stage_steps.get("r2", 6),
              r2d2=dict(repredict_epochs=(0.0, 0.15))),
      finetune=dict(total_steps=2, data=dict(uratio=1)))
  c.data.uratio = 3
  c.checkpoint_every_steps = 2
  return c


def test_resume_in_the_middle_of_r2_continues_identically(tmp_path):
  c = _pipeline_config()
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  # Interrupted in stage 3 after its step-2 checkpoint: run the first two
  # stages and part of r2, then the same command again.
  c_int = _pipeline_config()
  c_int.run_stages = "supervised,d2"
  train.train_and_evaluate(c_int, str(tmp_path / "resumed"))
  r2_cfg = train.stage_config(_pipeline_config(), "r2")
  stage = train.Stage(r2_cfg, str(tmp_path / "resumed" / "r2"))
  stage.total_steps = 2  # killed right after the step-2 save
  stage.run(init_from=str(tmp_path / "resumed" / "d2" / "checkpoints"),
            stage_name="r2")
  train.train_and_evaluate(_pipeline_config(), str(tmp_path / "resumed"))
  for name in ("r2", "finetune"):
    a, _ = ckpt_lib.restore_raw(str(tmp_path / "straight" / name))
    b, _ = ckpt_lib.restore_raw(str(tmp_path / "resumed" / name))
    chex.assert_trees_all_equal(a, b)
