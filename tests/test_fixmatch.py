"""FixMatch: the update rule by hand, the mask at τ, the rule's statistics, the trainer, errors, configs.

The update-rule tests run the real, jitted `train_step` (bound as the trainer
binds it) on the float64 one-layer model of tests/test_update_rules.py and
compare every leaf of the new state with a reference written here: logits by
hand over the concatenated batch (BatchNorm statistics of labeled + weak +
strong together), the loss from its formula, the gradient by `jax.grad` of it,
SGD-Nesterov with coupled weight decay and the EMA by hand.

Break checks (each line was broken in r2d2_jax/methods/fixmatch.py, the tests
named failed, the line was restored; `..._step` is test_mask_at_the_threshold_
through_the_step):
  mask `>=` -> `>`               test_fixed_threshold_at_the_boundary, ..._step[at]
  mask `>=` -> `<`               test_fixmatch_step[hard], [soft],
                                 test_fixed_threshold_at_the_boundary,
                                 ..._step[at], [below], [above]
  stop_gradient of the weak probabilities dropped (the weak logits get a
  gradient through the soft targets)
                                 test_fixmatch_step[soft]
  targets from the strong logits instead of the weak
                                 test_fixmatch_step[*], ..._step[*],
                                 test_rule_statistics_thread_through_the_state
  mean over the masked rows (`/ mean(mask)`) instead of over all rows
                                 test_fixmatch_step[*], ..._step[above],
                                 test_rule_statistics_thread_through_the_state
  λu dropped (`xe + xeu`)        test_fixmatch_step[*], ..._step[*],
                                 test_rule_statistics_thread_through_the_state
  soft targets without T         test_fixmatch_step[soft]
  label smoothing not passed     test_fixmatch_step[hard], [soft]
  new stats not written to the state (`stats=... and state.stats`)
                                 test_rule_statistics_thread_through_the_state
  inputs concatenated as (labeled, strong, weak)
                                 test_fixmatch_step[*], ..._step[*],
                                 test_rule_statistics_thread_through_the_state
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import fixmatch_cifar10, fixmatch_digits, fixmatch_mnist
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import optim
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import fixmatch
from tests import helpers
from tests import test_update_rules as ur

C = ur.C


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def fm_config(**block):
  cfg = helpers.tiny_config("fixmatch", ema_decay=ur.EMA)
  cfg.data.uratio = 2
  cfg.fixmatch = fixmatch.default_block()
  cfg.fixmatch.update(block)
  return cfg


def make_batch(rng, n_l=4, n_u=8, weak=None):
  y = lambda n: ur.y_of(rng, n)
  return {"labeled": {"weak": ur.x_of(rng, n_l), "label": y(n_l),
                      "index": jnp.arange(n_l, dtype=jnp.int32)},
          "unlabeled": {"weak": ur.x_of(rng, n_u) if weak is None else weak,
                        "strong": ur.x_of(rng, n_u), "label": y(n_u),
                        "index": jnp.arange(n_l, n_l + n_u, dtype=jnp.int32)}}


def fm_state(rng, ctx, bn, stats=None, bias=None):
  state = ur.random_train_state(rng, ctx.tx, bn=bn, scale=2.0,
                                cls=fixmatch.FixMatchState,
                                stats={} if stats is None else stats)
  if bias is not None:
    params = dict(state.params)
    params["Dense_0"] = {"kernel": params["Dense_0"]["kernel"], "bias": bias}
    state = state.replace(params=params)
  return state


def by_hand(params, model_state, batch, *, threshold, weight, smoothing,
            hard, temperature):
  """The FixMatch loss from its formula; returns (loss, (mask, model_state))."""
  lab, unl = batch["labeled"], batch["unlabeled"]
  n_l, n_u = lab["weak"].shape[0], unl["weak"].shape[0]
  x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
  z, ms = ur.ref_forward(params, model_state, x, train=True)
  z_l, z_w, z_s = z[:n_l], z[n_l:n_l + n_u], z[n_l + n_u:]
  p = ur.softmax(jax.lax.stop_gradient(z_w))
  mask = (jnp.max(p, -1) >= threshold).astype(z.dtype)
  if hard:
    t = ur.onehot(jnp.argmax(p, -1))
  else:
    t = ur.softmax(jax.lax.stop_gradient(z_w) / temperature)
  xe = ur.ce(ur.smooth(ur.onehot(lab["label"]), smoothing), z_l)
  per_row = -jnp.sum(t * ur.log_softmax(z_s), -1)
  return xe + weight * jnp.sum(mask * per_row) / n_u, (mask, ms)


def max_weak_probs(params, model_state, batch):
  lab, unl = batch["labeled"], batch["unlabeled"]
  x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
  z, _ = ur.ref_forward(params, model_state, x, train=True)
  n_l, n_u = lab["weak"].shape[0], unl["weak"].shape[0]
  return np.sort(np.asarray(jnp.max(ur.softmax(z[n_l:n_l + n_u]), -1)))


# ---------------------------------------------------------------------------
# The update rule


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_fixmatch_step(x64, hard):
  """One forward over [x_l, weak, strong] with BN; SGD on the FixMatch loss; EMA.

  τ is set between the 4th and 5th largest max-probabilities of the 8 weak
  rows, so exactly half the rows pass, none of them near τ.
  """
  rng = np.random.default_rng(11)
  cfg = fm_config(weight=2.0, hard_labels=hard, temperature=0.5)
  cfg.label_smoothing = 0.1
  ctx = ur.make_ctx(cfg, ur.Net(bn=True))
  state = fm_state(rng, ctx, bn=True)
  batch = make_batch(rng)
  p = max_weak_probs(state.params, state.model_state, batch)
  threshold = float((p[3] + p[4]) / 2)
  assert p[4] - p[3] > 1e-3
  cfg.fixmatch.threshold = threshold
  ctx = ur.make_ctx(cfg, ur.Net(bn=True))
  new, metrics = ur.run_step(fixmatch.train_step, state, batch, ctx)

  kw = dict(threshold=threshold, weight=2.0, smoothing=0.1, hard=hard,
            temperature=0.5)
  (value, (mask, ms)), grads = jax.value_and_grad(
      lambda q: by_hand(q, state.model_state, batch, **kw), has_aux=True)(
          state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)  # pylint: disable=protected-access
  assert float(jnp.mean(mask)) == 0.5
  np.testing.assert_allclose(float(metrics["monitors/mask"]), 0.5, rtol=0)
  np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                             rtol=1e-12)
  assert new.stats == {}


def test_fixed_threshold_at_the_boundary():
  """A row exactly at τ is kept, one ulp below is dropped, one ulp above kept."""
  for dtype in (np.float32, np.float64):
    tau = dtype(0.95)
    below, above = np.nextafter(tau, dtype(0)), np.nextafter(tau, dtype(1))
    probs = np.array([[tau, 1 - tau, 0, 0], [below, 1 - below, 0, 0],
                      [above, 0, 0, 0]], dtype)
    hp = fixmatch.FixMatchHparams(threshold=0.95)
    with jax.enable_x64(dtype == np.float64):
      mask, stats = fixmatch.fixed_threshold(jnp.asarray(probs), {}, None, hp)
    np.testing.assert_array_equal(np.asarray(mask), [1.0, 0.0, 1.0])
    assert stats == {}


@pytest.mark.parametrize("where", ["at", "below", "above"])
def test_mask_at_the_threshold_through_the_step(x64, where):
  """A weak row with equal logits has max prob exactly 1/C = 0.25 (x = 0,
  equal biases): τ = 0.25 or one ulp below keeps it, one ulp above drops it;
  every other row is far above 0.25."""
  rng = np.random.default_rng(5)
  tau = {"at": 0.25, "below": np.nextafter(0.25, 0.0),
         "above": np.nextafter(0.25, 1.0)}[where]
  cfg = fm_config(threshold=float(tau), weight=2.0)
  ctx = ur.make_ctx(cfg, ur.Net())
  state = fm_state(rng, ctx, bn=False, bias=jnp.full((C,), 0.3))
  weak = ur.x_of(rng, 8).at[0].set(0.0)
  batch = make_batch(rng, weak=weak)
  assert max_weak_probs(state.params, {}, batch)[1] > 0.26
  new, metrics = ur.run_step(fixmatch.train_step, state, batch, ctx)
  kw = dict(threshold=float(tau), weight=2.0, smoothing=0.0, hard=True,
            temperature=1.0)
  (_, (mask, ms)), grads = jax.value_and_grad(
      lambda q: by_hand(q, {}, batch, **kw), has_aux=True)(state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)  # pylint: disable=protected-access
  expected = 7 / 8 if where == "above" else 1.0
  assert float(jnp.mean(mask)) == expected
  assert float(metrics["monitors/mask"]) == expected


# A rule with statistics, as a later variant would write one: it aligns the
# weak probabilities by a prior kept in the state, weights each row by its
# (aligned) confidence, and counts the weight it gave.
def _toy_init(task, hp):
  del hp
  return {"prior": jnp.full((task.num_classes,), 1.0 / task.num_classes),
          "weight_sum": jnp.zeros(())}


def _toy_align(probs, stats, signals, hp):
  del hp
  aligned = probs / stats["prior"]
  aligned = aligned / jnp.sum(aligned, -1, keepdims=True)
  # The prior moves towards the labeled batch's mean prediction.
  prior = 0.5 * stats["prior"] + 0.5 * jnp.mean(signals.probs_l, 0)
  return aligned, dict(stats, prior=prior)


def _toy_mask(probs, stats, signals, hp):
  del signals, hp
  w = jnp.max(probs, -1)
  return w, dict(stats, weight_sum=stats["weight_sum"] + jnp.sum(w))


TOY = fixmatch.Rule(init_stats=_toy_init, align=_toy_align, mask=_toy_mask)


def test_rule_statistics_thread_through_the_state(x64):
  """The step reads the rule's stats from the state, writes its updates back,
  and weighs each row by the rule's (fractional) weights."""
  rng = np.random.default_rng(3)
  cfg = fm_config(weight=1.5)
  ctx = ur.make_ctx(cfg, ur.Net(bn=True))
  prior = jnp.asarray([0.1, 0.2, 0.3, 0.4])
  state = fm_state(rng, ctx, bn=True, stats={"prior": prior,
                                             "weight_sum": jnp.asarray(2.0)})
  batch = make_batch(rng)
  new, metrics = ur.run_step(fixmatch.make_train_step(TOY), state, batch, ctx)

  lab, unl = batch["labeled"], batch["unlabeled"]

  def loss(params):
    x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
    z, ms = ur.ref_forward(params, state.model_state, x, train=True)
    z_l, z_w, z_s = z[:4], z[4:12], z[12:]
    q = ur.softmax(jax.lax.stop_gradient(z_w)) / prior
    q = q / jnp.sum(q, -1, keepdims=True)
    w = jnp.max(q, -1)
    per_row = -jnp.sum(ur.onehot(jnp.argmax(q, -1)) * ur.log_softmax(z_s), -1)
    value = ur.ce(ur.onehot(lab["label"]), z_l) + 1.5 * jnp.mean(w * per_row)
    probs_l = ur.softmax(jax.lax.stop_gradient(z_l))
    return value, (ms, w, 0.5 * prior + 0.5 * jnp.mean(probs_l, 0))

  (value, (ms, w, new_prior)), grads = jax.value_and_grad(
      loss, has_aux=True)(state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)  # pylint: disable=protected-access
  ur.assert_close(new.stats["prior"], new_prior)
  ur.assert_close(new.stats["weight_sum"], 2.0 + jnp.sum(w))
  # monitors/* are float32.
  np.testing.assert_allclose(float(metrics["monitors/mask"]),
                             float(jnp.mean(w)), rtol=1e-6)
  np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                             rtol=1e-12)


# ---------------------------------------------------------------------------
# Through the trainer


def stage_config(**overrides):
  c = helpers.tiny_config("fixmatch", **overrides)
  c.data.uratio = 2
  c.data.augment.strong.update(policy="fixmatch", magnitude=4, cutout=4)
  # Two of the policy's ops: the same step, a fraction of the compile time.
  c.data.augment.strong.ops = ("Identity", "TranslateX")
  c.fixmatch = fixmatch.default_block()
  c.fixmatch.threshold = 0.3   # some rows pass within a few steps
  return c


def test_four_devices_equal_one_and_no_recompilation(tmp_path):
  c = stage_config()
  s4 = train.Stage(c, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(c, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  assert 0.0 < float(m1["monitors/mask"]) < 1.0
  assert len(jax.tree.leaves(st4.params)[0].sharding.device_set) == 4
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_continues_bitwise(tmp_path):
  """Straight to 6 == to 3, stop, rerun the same command to 6."""
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


def test_rule_statistics_survive_a_checkpoint(x64, tmp_path):
  """A rule's statistics are part of the checkpointed state (a later variant's)."""
  ctx = helpers.StepContext(stage_config(), ur.Net(), ur.student_tx(),
                            lambda step: 0.1, image_shape=(1, ur.D, 1),
                            num_classes=C, method="fixmatch")
  state = ctx.bind(fixmatch.make_init_state(TOY))(jax.random.key(0))
  state = state.replace(stats={"prior": jnp.asarray([0.1, 0.2, 0.3, 0.4]),
                               "weight_sum": jnp.asarray(7.5)})
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(1, state, {"step": 1})
  restored, _ = ck.restore(1, abstract)
  ck.close()
  assert isinstance(restored, fixmatch.FixMatchState)
  chex.assert_trees_all_equal(jax.device_get(restored), jax.device_get(state))


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.fixmatch.update(dict(tau=0.9)),
     r"config\.fixmatch: unknown key\(s\) tau\. FixMatchHparams has: "
     r"threshold=0\.95"),
    (lambda c: c.fixmatch.update(dict(threshold=0.0)),
     r"config\.fixmatch: threshold=0\.0 is outside \(0\.0, 1\.0\]"),
    (lambda c: c.fixmatch.update(dict(threshold=1.5)),
     r"config\.fixmatch: threshold=1\.5 is outside \(0\.0, 1\.0\]"),
    (lambda c: c.fixmatch.update(dict(weight=-1.0)),
     r"config\.fixmatch: weight=-1\.0 is outside \[0\.0, inf\]"),
    (lambda c: c.fixmatch.update(dict(temperature=0.0)),
     r"config\.fixmatch: temperature=0\.0 is outside \(0\.0, inf\]"),
    (lambda c: setattr(c, "fixmatch", ml_collections.ConfigDict(
        dict(hard_labels="yes"))),
     r"config\.fixmatch: hard_labels='yes' must be True or False"),
    (lambda c: c.fixmatch.update(dict(label_smoothing=0.1)),
     r"config\.fixmatch\.label_smoothing: set the top-level "
     r"config\.label_smoothing"),
    (lambda c: setattr(c.data, "uratio", 0),
     r"config\.data\.uratio=0: fixmatch trains on an unlabeled batch"),
    (lambda c: delattr(c, "fixmatch"), r"config\.fixmatch is missing"),
    (lambda c: c.fixmatch.update(dict(ctaugment=dict(decay=0.9))),
     r"config\.fixmatch\.ctaugment: CTAugment is the strong view's policy"),
])
def test_bad_input_errors(tmp_path, edit, match):
  c = stage_config()
  edit(c)
  with pytest.raises(R2D2Error, match=match):
    train.Stage(c, str(tmp_path))


# ---------------------------------------------------------------------------
# Configs, value by value against google-research/fixmatch


@pytest.mark.parametrize("labels", [40, 250, 4000])
def test_cifar10_config_matches_the_reference(labels):
  c = fixmatch_cifar10.get_config(str(labels))
  assert c.method == "fixmatch"
  # `arch=resnet`, filters 32, repeat 4, scales 3: WRN-28-2; bn decay 0.999.
  assert c.model.name == "wrn28_2" and c.model.kwargs.bn_momentum == 0.999
  assert c.model.kwargs.dropout_rate == 0.0
  assert (c.data.dataset, c.data.num_labels) == ("cifar10", labels)
  assert c.data.unlabeled == "all" and c.data.num_val == 0
  assert (c.data.batch_size, c.data.uratio) == (64, 7)       # batch, uratio
  weak, strong = c.data.augment.weak, c.data.augment.strong
  assert (weak.flip, weak.translate, weak.pad_mode) == (True, 4, "reflect")
  assert (strong.policy, strong.num_ops, strong.magnitude,
          strong.cutout) == ("fixmatch", 2, 10, 16)          # 'rac'
  assert not strong.get("weak_after", False)
  o = c.optimizer
  assert (o.name, o.lr, o.momentum, o.nesterov) == ("sgd", 0.03, 0.9, True)
  assert (o.weight_decay, o.decay_mask, o.grad_clip_norm) == (5e-4,
                                                               "kernels", 0)
  assert o.schedule.name == "fixmatch_cosine"
  assert (o.schedule.warmup_steps, o.schedule.wait_steps,
          o.schedule.decay_steps) == (0, 0, 0)
  assert c.total_steps == 2 ** 20                        # train_kimg = 2^16
  assert c.ema_decay == 0.999 and c.label_smoothing == 0.0
  hp = fixmatch.hparams(c)
  assert hp == fixmatch.FixMatchHparams(threshold=0.95, weight=1.0,
                                        hard_labels=True)
  assert c.eval_every_steps == 1024                      # report_kimg = 64
  # lr · cos(7πk / 16K) over K = 2^20 steps.
  _, schedule = optim.make_optimizer(o, c.total_steps)
  for k in (0, 2 ** 18, 2 ** 19, 2 ** 20):
    np.testing.assert_allclose(
        float(schedule(k)), 0.03 * np.cos(7 * np.pi * k / (16 * 2 ** 20)),
        rtol=1e-5)


def test_cifar10_config_variants():
  assert fixmatch_cifar10.get_config(None).data.num_labels == 4000
  small = fixmatch_cifar10.get_config("40,runlocal")
  assert small.data.num_labels == 40 and small.total_steps == 4
  assert small.model.name == "cnn_small"
  assert fixmatch_cifar10.get_config("runlocal").data.num_labels == 4000
  for bad in ("nope", "100", "40,250x"):
    with pytest.raises(ValueError, match="Unknown variant"):
      fixmatch_cifar10.get_config(bad)


def test_digits_and_mnist_configs():
  d = fixmatch_digits.get_config()
  assert (d.model.name, d.data.dataset, d.data.num_labels,
          d.data.num_val) == ("cnn_small", "digits", 50, 200)
  assert d.total_steps == 2000 and d.eval_every_steps == 80
  assert d.log_every_steps == 100
  assert (d.data.augment.strong.policy, d.data.augment.strong.magnitude,
          d.data.augment.strong.cutout) == ("fixmatch", 4, 4)
  assert (d.optimizer.decay_mask, d.optimizer.schedule.name) == (
      "kernels", "fixmatch_cosine")
  assert fixmatch.hparams(d) == fixmatch.FixMatchHparams()
  m = fixmatch_mnist.get_config()
  assert (m.data.dataset, m.data.num_labels, m.data.num_val) == (
      "mnist", 100, 1000)
  assert m.data.uratio == 7 and m.data.augment.strong.policy == "fixmatch"
  assert fixmatch.hparams(m) == fixmatch.FixMatchHparams()
  for mod in (fixmatch_digits, fixmatch_mnist):
    assert mod.get_config("runlocal").total_steps == 6
    with pytest.raises(ValueError, match="Unknown variant"):
      mod.get_config("nope")


def test_default_block_is_the_paper():
  block = fixmatch.default_block()
  assert block.to_dict() == dict(threshold=0.95, weight=1.0, hard_labels=True,
                                 temperature=1.0)
  assert isinstance(block, ml_collections.ConfigDict)
