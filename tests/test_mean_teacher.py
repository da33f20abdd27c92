"""Mean Teacher: the update rule by hand, the teacher's EMA over steps, the trainer, configs.

The float64 test runs the real, jitted `train_step` on a one-layer BatchNorm
network and compares every leaf of the new state with a reference written
here (docs/algorithms.md, "Mean Teacher"): the teacher's train-mode forward on
its own view with its own BatchNorm statistics, the student's loss written
out, its gradient by `jax.grad`, SGD-Nesterov by hand, the teacher's EMA with
the step's decay. The forward, SGD and EMA helpers are test_pi_model's.

Break checks (each line broken in r2d2_jax/methods/mean_teacher.py, the
named tests failed, the line restored):
  teacher forward in eval mode (`apply_eval`)      -> test_mean_teacher_step
  teacher reads the student's view ('weak')        -> test_mean_teacher_step
  teacher BN statistics = student's EMA (line
    `state.replace(ema_model_state=...)` dropped)  -> test_mean_teacher_step
  decay_at: rampup/after swapped                   -> test_mean_teacher_step,
                                                      test_teacher_is_the_ema_...
  decay_at: warm-up cap 1/(t + 2) → 1/(t + 1)      -> test_teacher_is_the_ema_...
  consistency_on_labeled ignored (always all rows) -> test_mean_teacher_step[False]
  teacher rng = student rng                        -> test_teacher_noise_is_...
(Dropping the teacher's stop_gradient is an equivalent mutant: the teacher is
computed outside the differentiated objective.)
"""

import importlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import mean_teacher
from tests import helpers
from tests.test_pi_model import (D, EMA, LR, Net, assert_close, ce, make_ctx,
                                 momentum_of, ramp, random_state, ref_forward,
                                 ref_sgd, run_step, softmax)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def mt_config(weight=3.0, ramp_steps=8, ema_decay=EMA, rampup=0.5,
              warmup=False, on_labeled=True):
  c = helpers.tiny_config("mean_teacher", ema_decay=ema_decay)
  c.mean_teacher = ml_collections.ConfigDict(dict(
      weight=weight, ramp_steps=ramp_steps, ema_decay_rampup=rampup,
      ema_warmup=warmup, consistency_on_labeled=on_labeled))
  return c


def decay_by_hand(t, ramp_steps, after, rampup, warmup):
  d = rampup if t < ramp_steps else after
  return min(d, 1.0 - 1.0 / (t + 2)) if warmup else d


@pytest.mark.parametrize("step,on_labeled", [(3, True), (3, False),
                                              (9, True)])
def test_mean_teacher_step(x64, step, on_labeled):
  """Student: CE + w(t)·MSE(softmax f_θ(weak), softmax f_θ'(weak_1)); θ' ← EMA_d(t)."""
  rng = np.random.default_rng(step)
  cfg = mt_config(on_labeled=on_labeled)
  ctx = make_ctx(cfg, Net(bn=True))
  state = random_state(rng, step=step)
  x = lambda n: jnp.asarray(rng.normal(size=(n, D)))
  lab = {"weak": x(4), "weak_1": x(4), "label": jnp.asarray([0, 1, 3, 1]),
         "index": jnp.arange(4)}
  unl = {"weak": x(6), "weak_1": x(6), "label": jnp.zeros(6, jnp.int32),
         "index": jnp.arange(4, 10)}
  new, m = run_step(mean_teacher.train_step, state,
                    {"labeled": lab, "unlabeled": unl}, ctx)

  w = 3.0 * ramp(step, 8)
  d = decay_by_hand(step, 8, EMA, 0.5, False)
  # The teacher: EMA weights, its own BN statistics, train mode, view weak_1.
  zt, teacher_ms = ref_forward(
      state.ema_params, state.ema_model_state,
      jnp.concatenate([lab["weak_1"], unl["weak_1"]]), train=True)
  q = softmax(zt)
  rows = slice(0, 10) if on_labeled else slice(4, 10)
  xs = jnp.concatenate([lab["weak"], unl["weak"]])

  def loss(params):
    z, ms = ref_forward(params, state.model_state, xs, train=True)
    cons = jnp.mean((softmax(z[rows]) - q[rows]) ** 2)
    return ce(z[:4], lab["label"]) + w * cons, ms

  (total, student_ms), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params)
  params, trace = ref_sgd(state.params, grads, momentum_of(state.opt_state))
  assert_close(new.params, params)
  assert_close(momentum_of(new.opt_state), trace)
  assert_close(new.model_state, student_ms)
  assert_close(new.ema_params, jax.tree.map(
      lambda e, p: d * e + (1 - d) * p, state.ema_params, params))
  assert_close(new.ema_model_state, teacher_ms)
  assert int(new.step) == step + 1
  np.testing.assert_allclose(float(m["losses/total"]), float(total),
                             rtol=1e-12)
  np.testing.assert_allclose(float(m["monitors/weight"]), w, rtol=1e-12)
  np.testing.assert_allclose(float(m["monitors/ema_decay"]), d, rtol=1e-12)
  assert LR == 0.125  # the SGD reference's rate


def test_teacher_noise_is_independent_of_the_student(x64):
  """Same weights, same images: only independent dropout makes p ≠ q."""
  rng = np.random.default_rng(0)
  ctx = make_ctx(mt_config(), Net(dropout=0.5))
  state = random_state(rng, bn=False)
  state = state.replace(ema_params=state.params)
  x = jnp.asarray(rng.normal(size=(8, D)))
  batch = {"labeled": {"weak": x[:4], "weak_1": x[:4],
                       "label": jnp.zeros(4, jnp.int32), "index": jnp.arange(4)},
           "unlabeled": {"weak": x[4:], "weak_1": x[4:],
                         "label": jnp.zeros(4, jnp.int32),
                         "index": jnp.arange(4, 8)}}
  _, m = run_step(mean_teacher.train_step, state, batch, ctx)
  assert float(m["losses/xeu"]) > 1e-4


# ---------------------------------------------------------------------------
# Through the trainer


def _tiny(**kw):
  c = mt_config(**kw)
  c.data.uratio = 1
  c.total_steps, c.checkpoint_every_steps = 6, 3
  return c


def _stage(tmp_path, name, cfg, n_dev):
  return train.Stage(cfg, str(tmp_path / name),
                     mesh=sharding.make_mesh(jax.devices()[:n_dev]))


def _run(stage, n):
  """n steps; the student's params after each (the state is donated)."""
  state = stage.init_state()
  init = jax.device_get(state.params)
  batches = stage.pipeline.iterate(0, stage.streams)
  history = []
  for _ in range(n):
    state, m = stage.train_step(state, next(batches))
    history.append(jax.device_get(state.params))
  return state, jax.device_get(m), init, history


@pytest.mark.parametrize("warmup", [False, True])
def test_teacher_is_the_ema_of_the_student_after_k_steps(tmp_path, warmup):
  """θ'_k = d(k−1) θ'_{k−1} + (1 − d(k−1)) θ_k, θ'_0 = θ_0, with d's schedule."""
  cfg = _tiny(ramp_steps=2, ema_decay=0.9, rampup=0.5, warmup=warmup)
  s1 = _stage(tmp_path, "one", cfg, 1)
  state, m1, init, history = _run(s1, 4)
  teacher = init
  for k, params in enumerate(history):
    d = decay_by_hand(k, 2, 0.9, 0.5, warmup)
    teacher = jax.tree.map(lambda e, p, d=d: d * e + (1 - d) * p, teacher,
                           params)
  chex.assert_trees_all_close(jax.device_get(state.ema_params), teacher,
                              rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(m1["monitors/ema_decay"]),
                             decay_by_hand(3, 2, 0.9, 0.5, warmup), rtol=1e-6)
  if warmup:
    return
  # 4 devices == 1 device, one compilation for every step.
  s4 = _stage(tmp_path, "four", cfg, 4)
  state4, m4, _, _ = _run(s4, 4)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access
  assert len(jax.tree.leaves(state4.params)[0].sharding.device_set) == 4
  chex.assert_trees_all_close(jax.device_get(state4), jax.device_get(state),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)


def test_resume_is_bitwise(tmp_path):
  train.train_and_evaluate(_tiny(ramp_steps=2), str(tmp_path / "straight"))
  stage = train.Stage(_tiny(ramp_steps=2), str(tmp_path / "resumed"))
  stage.total_steps = 3   # as if killed after the step-3 save
  stage.run()
  train.train_and_evaluate(_tiny(ramp_steps=2), str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 6
  chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("key,value,message", [
    ("weight", -0.5, r"weight=-0.5 is outside \[0.0, inf\]"),
    ("ramp_steps", -2, r"ramp_steps=-2 is outside \[0, inf\]"),
    ("ramp_steps", 1.5, r"ramp_steps=1.5 must be an integer"),
    ("ema_decay_rampup", 1.0, r"ema_decay_rampup=1.0 is outside \[0.0, 1.0\)"),
    ("ema_warmup", 1, r"ema_warmup=1 must be True or False"),
    ("consistency_on_labeled", "yes", r"consistency_on_labeled='yes' must be"),
    ("threshold", 0.9, r"unknown key\(s\) threshold"),
    ("ema_decay", 0.99, r"the top-level config\.ema_decay"),
])
def test_bad_hyperparameters_name_the_field(key, value, message):
  c = mt_config()
  c.mean_teacher = ml_collections.ConfigDict({**c.mean_teacher.to_dict(),
                                              key: value})
  with pytest.raises(R2D2Error, match=rf"config\.mean_teacher.*{message}"):
    mean_teacher.hparams(c)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_top_level_ema_decay_is_checked(decay):
  with pytest.raises(R2D2Error, match=r"ema_decay \(config.ema_decay\)="):
    mean_teacher.hparams(mt_config(ema_decay=decay))


def test_missing_block_is_an_error():
  with pytest.raises(R2D2Error, match=r"config.mean_teacher is missing"):
    mean_teacher.hparams(helpers.tiny_config("mean_teacher"))


# ---------------------------------------------------------------------------
# Configs


def _config(name, arg=None):
  return importlib.import_module(f"configs.{name}").get_config(arg)


def test_cifar10_config_is_the_tf_reference():
  """tensorflow/experiments/cifar10_final_eval.py on model.py's defaults."""
  c = _config("mean_teacher_cifar10")
  hp = mean_teacher.hparams(c)
  assert c.model.name == "convlarge"                 # ConvNet-13 `tower`
  assert c.model.kwargs.dropout_rate == 0.5          # student/teacher dropout
  assert c.model.kwargs.input_noise_std == 0.15      # `input_noise`
  assert c.model.kwargs.bn_momentum == 0.999         # `eval_mean_ema_decay`
  assert c.data.dataset == "cifar10" and c.data.num_labels == 4000
  # minibatch_size 100, 'vary': 8 labeled on average (4000 of 50000); an
  # integer μ: 8 + 96.
  assert c.data.batch_size == 8
  assert c.data.batch_size * (1 + c.data.uratio) == 104
  assert c.data.augment.weak.translate == 2          # random_translate(scale=2)
  assert c.data.augment.weak.pad_mode == "reflect"   # padding_mode='REFLECT'
  assert c.data.augment.weak.flip is True            # flip_horizontally
  # max_consistency_cost 100·4000/50000 = 8 with the CE over the whole batch
  # → the CE a mean over the 8 labeled rows of 104: 8·104/8.
  assert hp.weight == pytest.approx(100.0 * 4000 / 50000 * 104 / 8)
  assert hp.ramp_steps == 40_000                     # rampup_length
  assert hp.ema_decay == 0.999                       # ema_decay_after_rampup
  assert hp.ema_decay_rampup == 0.999                # set by final_eval
  assert not hp.ema_warmup
  assert hp.consistency_on_labeled                   # apply_consistency_to_labeled
  assert c.total_steps == 150_000                    # training_length
  o = c.optimizer
  assert (o.name, o.lr, o.b1, o.b2) == ("adam", 0.003, 0.9, 0.999)
  assert o.weight_decay == 0.0
  assert o.schedule.warmup_steps == 40_000
  # Rampdown over the last 25000 steps: exp(−12.5 p²) at the block midpoints.
  from r2d2_jax import optim  # pylint: disable=g-import-not-at-top
  lr = optim.make_schedule(o.lr, o.schedule, c.total_steps)
  assert float(lr(20_000)) == pytest.approx(0.003 * 20_001 / 40_000)
  assert float(lr(100_000)) == pytest.approx(0.003)
  for p in (0.1, 0.3, 0.5, 0.7, 0.9):
    step = 125_000 + int(p * 25_000)
    assert float(lr(step)) == pytest.approx(0.003 * np.exp(-12.5 * p * p),
                                            rel=1e-4)


@pytest.mark.parametrize("name", ["mean_teacher_digits", "mean_teacher_mnist",
                                  "mean_teacher_cifar10"])
def test_configs_parse(name):
  for arg in (None, "runlocal"):
    c = _config(name, arg)
    hp = mean_teacher.hparams(c)
    assert c.data.uratio >= 1
  c = _config(name)
  hp = mean_teacher.hparams(c)
  if name != "mean_teacher_cifar10":
    # The paper's EMA schedule (TF defaults): 0.99 in the ramp-up, 0.999 after.
    assert (hp.ema_decay_rampup, c.ema_decay) == (0.99, 0.999)
    assert c.data.num_val > 0 and c.total_steps >= 2000
