"""Pseudo-Label: the update rule by hand, α(t), the trainer, errors, configs.

The update-rule test runs the real, jitted `train_step` on the float64
one-layer BatchNorm model of tests/test_update_rules.py against a reference
written here: the labeled logits by hand in train mode (their BatchNorm
statistics are the new running statistics), the unlabeled logits by hand in
train mode on their own batch statistics (not kept), the loss from its
formula, the gradient by `jax.grad` of it, SGD-Nesterov and the EMA by hand.

Break checks (each line was broken in r2d2_jax/methods/pseudo_label.py, the
tests named failed, the line was restored):
  one concatenated forward (labeled + unlabeled: the unlabeled rows enter the
  BN statistics)                 test_pseudo_label_step[all_rows], [threshold]
  unlabeled pass in eval mode    test_pseudo_label_step[all_rows], [threshold]
  α(t) ramp `(t − T1)/(T2 − T1)` -> `t/T2`
                                 test_weight_schedule, test_pseudo_label_step[*]
  T1 = T2 step `>=` -> `>`       test_weight_schedule
  mask `>=` -> `>`               test_pseudo_label_step[tie] (a row at τ)
  mask dropped (every row)       test_pseudo_label_step[threshold]
  pseudo-label argmin            test_pseudo_label_step[*]
  label smoothing not passed     test_pseudo_label_step[*]
  α(t) dropped (`xe + xeu`)      test_pseudo_label_step[*]
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import pseudo_label_digits, pseudo_label_mnist
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import pseudo_label
from tests import helpers
from tests import test_update_rules as ur


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def pl_config(**block):
  cfg = helpers.tiny_config("pseudo_label", ema_decay=ur.EMA)
  cfg.data.uratio = 2
  cfg.pseudo_label = pseudo_label.default_block()
  cfg.pseudo_label.update(block)
  return cfg


def alpha_by_hand(t, t1, t2, alpha_f):
  """Lee (2013), eq. 16: 0 before T1, linear to α_f at T2, α_f after."""
  if t < t1:
    return 0.0
  if t < t2:
    return (t - t1) / (t2 - t1) * alpha_f
  return alpha_f


def test_weight_schedule(x64):
  hp = pseudo_label.PseudoLabelHparams(weight=3.0, ramp_start_steps=100,
                                       ramp_end_steps=600)
  for t in (0, 50, 99, 100, 101, 350, 599, 600, 601, 10_000):
    np.testing.assert_allclose(float(hp.weight_at(jnp.asarray(t))),
                               alpha_by_hand(t, 100, 600, 3.0), rtol=1e-14,
                               atol=0)
  step = pseudo_label.PseudoLabelHparams(weight=2.0, ramp_start_steps=5,
                                         ramp_end_steps=5)
  assert [float(step.weight_at(t)) for t in (0, 4, 5, 6)] == [0, 0, 2, 2]
  none = pseudo_label.PseudoLabelHparams(weight=3.0)   # T1 = T2 = 0
  assert float(none.weight_at(0)) == 3.0


@pytest.mark.parametrize("case", ["all_rows", "threshold", "tie"])
def test_pseudo_label_step(x64, case):
  """Labeled pass updates BN; unlabeled pass uses its own batch statistics;
  α(5) = 3 · (5 − 2)/(10 − 2) = 1.125 inside the ramp.

  'threshold': τ midway between the 3rd and 4th largest max-probabilities of
  the 8 unlabeled rows: 3 rows pass. 'tie' (no BatchNorm): one unlabeled row
  is 0 and the biases are equal, so its max-probability is exactly 1/C = τ:
  `>=` keeps it, and every row passes.
  """
  rng = np.random.default_rng(7)
  bn = case != "tie"
  cfg = pl_config(weight=3.0, ramp_start_steps=2, ramp_end_steps=10,
                  threshold=0.25 if case == "tie" else 0.0)
  cfg.label_smoothing = 0.1
  ctx = ur.make_ctx(cfg, ur.Net(bn=bn))
  state = ur.random_train_state(rng, ctx.tx, bn=bn, scale=2.0, step=5)
  lab = {"weak": ur.x_of(rng, 4), "label": ur.y_of(rng, 4),
         "index": jnp.arange(4, dtype=jnp.int32)}
  unl = {"weak": ur.x_of(rng, 8), "label": ur.y_of(rng, 8),
         "index": jnp.arange(4, 12, dtype=jnp.int32)}
  if case == "tie":
    unl["weak"] = unl["weak"].at[0].set(0.0)
    params = dict(state.params)
    params["Dense_0"] = dict(params["Dense_0"], bias=jnp.full((ur.C,), 0.3))
    state = state.replace(params=params)
  batch = {"labeled": lab, "unlabeled": unl}

  def unlabeled_logits(params):
    return ur.ref_forward(params, state.model_state, unl["weak"], True)[0]

  threshold = cfg.pseudo_label.threshold
  if case == "threshold":
    conf = np.sort(np.asarray(jnp.max(jax.nn.softmax(
        unlabeled_logits(state.params)), -1)))
    assert conf[-3] - conf[-4] > 1e-3
    threshold = float((conf[-3] + conf[-4]) / 2)
    cfg.pseudo_label.threshold = threshold
    ctx = ur.make_ctx(cfg, ur.Net(bn=bn))
  new, metrics = ur.run_step(pseudo_label.train_step, state, batch, ctx)

  alpha = 1.125
  assert alpha == alpha_by_hand(5, 2, 10, 3.0)

  def loss(params):
    z_l, ms = ur.ref_forward(params, state.model_state, lab["weak"], True)
    z_u = unlabeled_logits(params)
    p = ur.softmax(jax.lax.stop_gradient(z_u))
    m = (jnp.max(p, -1) >= threshold).astype(z_u.dtype)
    per_row = -jnp.sum(ur.onehot(jnp.argmax(p, -1)) * ur.log_softmax(z_u), -1)
    xe = ur.ce(ur.smooth(ur.onehot(lab["label"]), 0.1), z_l)
    return xe + alpha * jnp.mean(m * per_row), (ms, m)

  (value, (ms, mask)), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)  # pylint: disable=protected-access
  expected_mask = 3 / 8 if case == "threshold" else 1.0
  assert float(jnp.mean(mask)) == expected_mask
  assert float(metrics["monitors/mask"]) == expected_mask
  np.testing.assert_allclose(float(metrics["monitors/weight"]), alpha,
                             rtol=1e-14)
  np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                             rtol=1e-12)


# ---------------------------------------------------------------------------
# Through the trainer


def stage_config(**overrides):
  c = helpers.tiny_config("pseudo_label", **overrides)
  c.data.uratio = 2
  c.pseudo_label = pseudo_label.default_block()
  c.pseudo_label.update(weight=3.0, ramp_start_steps=1, ramp_end_steps=3,
                        threshold=0.2)
  return c


def test_four_devices_equal_one_and_no_recompilation(tmp_path):
  c = stage_config()
  s4 = train.Stage(c, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(c, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  assert float(m1["monitors/weight"]) == 1.5 and float(m1["losses/xeu"]) > 0
  assert len(jax.tree.leaves(st4.params)[0].sharding.device_set) == 4
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_continues_bitwise(tmp_path):
  c = stage_config(total_steps=6, checkpoint_every_steps=3)
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  stage = train.Stage(c, str(tmp_path / "resumed"))
  stage.total_steps = 3
  stage.run()
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 6
  chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("edit, match", [
    (dict(alpha=3.0), r"config\.pseudo_label: unknown key\(s\) alpha\. "
     r"PseudoLabelHparams has: weight=3\.0"),
    (dict(ramp_start_steps=10, ramp_end_steps=5),
     r"ramp_end_steps=5 is before ramp_start_steps=10; T1 ≤ T2"),
    (dict(weight=-0.5), r"weight=-0\.5 is outside \[0\.0, inf\]"),
    (dict(threshold=1.5), r"threshold=1\.5 is outside \[0\.0, 1\.0\]"),
    (dict(threshold=-0.1), r"threshold=-0\.1 is outside \[0\.0, 1\.0\]"),
    (dict(ramp_start_steps=-1), r"ramp_start_steps=-1 is outside \[0, inf\]"),
    (dict(ramp_end_steps=2.5), r"ramp_end_steps=2\.5 must be an integer"),
    (dict(label_smoothing=0.1), r"set the top-level config\.label_smoothing"),
])
def test_bad_hyperparameters(edit, match):
  c = stage_config()
  c.pseudo_label = ml_collections.ConfigDict({**c.pseudo_label.to_dict(),
                                              **edit})
  with pytest.raises(R2D2Error, match=match):
    pseudo_label.hparams(c)


def test_bad_input_fails_when_the_stage_is_built(tmp_path):
  c = stage_config()
  c.data.uratio = 0
  with pytest.raises(R2D2Error, match=r"config\.data\.uratio=0: pseudo_label"):
    train.Stage(c, str(tmp_path / "a"))
  c = stage_config()
  c.pseudo_label.threshold = 2.0
  with pytest.raises(R2D2Error, match=r"config\.pseudo_label: threshold=2\.0"):
    train.Stage(c, str(tmp_path / "b"))
  c = stage_config()
  del c.pseudo_label
  with pytest.raises(R2D2Error, match=r"config\.pseudo_label is missing"):
    train.Stage(c, str(tmp_path / "c"))


# ---------------------------------------------------------------------------
# Configs


def test_configs():
  d = pseudo_label_digits.get_config()
  assert d.method == "pseudo_label"
  assert (d.model.name, d.data.dataset, d.data.num_labels,
          d.data.num_val) == ("cnn_small", "digits", 50, 200)
  assert d.total_steps == 2000 and d.eval_every_steps == 80
  assert d.log_every_steps == 100
  hp = pseudo_label.hparams(d)
  # Lee: α_f = 3, no threshold; T1, T2 at 10 % and 40 % of the run.
  assert hp == pseudo_label.PseudoLabelHparams(
      weight=3.0, ramp_start_steps=200, ramp_end_steps=800, threshold=0.0)
  m = pseudo_label_mnist.get_config()
  assert (m.model.name, m.data.dataset, m.data.num_labels,
          m.data.num_val) == ("mlp_mnist", "mnist", 100, 1000)
  assert pseudo_label.hparams(m) == pseudo_label.PseudoLabelHparams(
      weight=3.0, ramp_start_steps=600, ramp_end_steps=2400, threshold=0.0)
  for mod in (pseudo_label_digits, pseudo_label_mnist):
    small = mod.get_config("runlocal")
    assert small.total_steps == 6
    pseudo_label.hparams(small)
    with pytest.raises(ValueError, match="Unknown variant"):
      mod.get_config("nope")
