"""FreeMatch: the EMA statistics and weights over two batches, the fairness term, the trainer, errors, configs.

The update-rule tests run the real, jitted `train_step` (bound as the trainer
binds it) twice, on two known batches, on the float64 one-layer model of
tests/test_update_rules.py (BatchNorm on: the weak probabilities depend on the
whole concatenated batch). The reference is written here: τ_t, p̃, h̃ as USB's
`FreeMatchThresholingHook.update` computes them, the weights from the updated
statistics, the fairness term as USB's `entropy_loss` does it (boolean
selection of the kept rows, `replace_inf_to_zero`, detached scalers), the loss
from its formula, the gradient by `jax.grad`, the optimizer and EMA by hand.

Break checks (each line was broken in r2d2_jax/methods/freematch.py, the tests
named failed, the line was restored; `..._steps` is
test_freematch_two_steps, `..._gradient` test_fairness_loss_and_gradient):
  mask from the statistics before this batch's update
                                 ..._steps[hard], [soft], [quantile_clip]
  p̃'s EMA weights swapped (`(1 − m) · old + m · new`)
                                 ..._steps[hard], [soft], [none_kept]
  p̃ / max p̃ dropped from the threshold (τ_t alone)
                                 ..._steps[hard], [soft], [quantile_clip]
  h̃ updated with the unnormalised histogram
                                 ..._steps[*]
  quantile ignored (mean of max p)  ..._steps[quantile_clip]
  clip ignored                   ..._steps[quantile_clip]
  fairness weight dropped (`loss` instead of `λe · loss`)
                                 ..._steps[hard], [soft], [quantile_clip]
  the 1e-12 in the log dropped   ..._steps[*], ..._gradient[*]
  mean over all rows instead of the kept ones
                                 ..._steps[hard], [soft], [quantile_clip],
                                 ..._gradient[some], [empty_class]
  no-row-kept guard dropped (`return loss`)
                                 ..._steps[none_kept], ..._gradient[none]
  p̃ scaled by h̃ instead of 1/h̃  ..._steps[hard], [soft], [quantile_clip],
                                 ..._gradient[some], [empty_class]
  default temperature 1.0        test_cifar10_config_matches_usb[*],
                                 test_default_block_is_usb
(The 1/h̄ scaler's stop_gradient cannot be broken observably: h̄ counts
argmaxes and has no gradient anyway.)
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import freematch_cifar10, freematch_digits, freematch_mnist
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import fixmatch, freematch
from tests import helpers
from tests import test_update_rules as ur

C = ur.C


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def free_config(**block):
  cfg = helpers.tiny_config("freematch", ema_decay=ur.EMA)
  cfg.data.uratio = 2
  cfg.freematch = freematch.default_block()
  cfg.freematch.update(block)
  return cfg


def make_batch(rng, n_l=4, n_u=8):
  return {"labeled": {"weak": ur.x_of(rng, n_l), "label": ur.y_of(rng, n_l),
                      "index": jnp.arange(n_l, dtype=jnp.int32)},
          "unlabeled": {"weak": ur.x_of(rng, n_u),
                        "strong": ur.x_of(rng, n_u), "label": ur.y_of(rng, n_u),
                        "index": jnp.arange(n_l, n_l + n_u, dtype=jnp.int32)}}


def usb_update(stats, probs, m, quantile, clip):
  """USB's `FreeMatchThresholingHook.update` (numpy, float64)."""
  max_p, idx = probs.max(1), probs.argmax(1)
  level = np.quantile(max_p, 0.8) if quantile else max_p.mean()
  time_p = stats["time_p"] * m + (1 - m) * level
  if clip:
    time_p = np.clip(time_p, 0.0, 0.95)
  p_model = stats["p_model"] * m + (1 - m) * probs.mean(0)
  hist = np.bincount(idx, minlength=C).astype(float)
  label_hist = stats["label_hist"] * m + (1 - m) * hist / hist.sum()
  return {"time_p": time_p, "p_model": p_model, "label_hist": label_hist}


def inf_to_zero(v):
  return jnp.where(jnp.isinf(v), 0.0, v)


def usb_entropy_loss(mask, logits_s, p_model, label_hist):
  """USB's `entropy_loss`, with boolean selection (not jittable, eager)."""
  logits_s = logits_s[np.asarray(mask, bool)]
  prob_s = ur.softmax(logits_s)
  pred = np.asarray(jnp.argmax(prob_s, -1))
  hist_s = np.bincount(pred, minlength=C).astype(float)
  hist_s = jnp.asarray(hist_s / hist_s.sum())
  with np.errstate(divide="ignore"):
    scaler = inf_to_zero(1.0 / jnp.asarray(label_hist))
  mod_prob_model = p_model * scaler
  mod_prob_model = mod_prob_model / mod_prob_model.sum()
  with np.errstate(divide="ignore"):
    mean_scaler = inf_to_zero(1.0 / hist_s)
  mod_mean = prob_s.mean(0) * jax.lax.stop_gradient(mean_scaler)
  mod_mean = mod_mean / mod_mean.sum()
  return jnp.sum(mod_prob_model * jnp.log(mod_mean + 1e-12))


CASES = {
    # name: (block overrides, stored statistics (None: init_stats))
    "hard": (dict(ema_p=0.3, fairness_weight=0.5), None),
    "soft": (dict(ema_p=0.3, fairness_weight=0.5, hard_labels=False,
                  temperature=0.5), None),
    "quantile_clip": (dict(ema_p=0.5, fairness_weight=0.5, use_quantile=True,
                           clip_thresh=True),
                      dict(time_p=1.0, p_model=[0.1, 0.2, 0.3, 0.4],
                           label_hist=[0.0, 0.2, 0.3, 0.5])),
    "none_kept": (dict(ema_p=0.9999, fairness_weight=0.5),
                  dict(time_p=1.0, p_model=[0.25] * 4,
                       label_hist=[0.25] * 4)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_freematch_two_steps(x64, case):
  """Two known batches: EMAs updated first, then weights; loss, gradient."""
  block, stored = CASES[case]
  rng = np.random.default_rng(21)
  cfg = free_config(weight=1.5, **block)
  cfg.label_smoothing = 0.1
  ctx = ur.make_ctx(cfg, ur.Net(bn=True))
  hp = ctx.hp
  if stored is None:
    stats = freematch.init_stats(ctx.task, hp)
    np.testing.assert_array_equal(stats["time_p"], 0.25)
    np.testing.assert_array_equal(stats["p_model"], np.full(C, 0.25))
    np.testing.assert_array_equal(stats["label_hist"], np.full(C, 0.25))
  else:
    stats = {k: jnp.asarray(v, jnp.float64) for k, v in stored.items()}
  state = ur.random_train_state(rng, ctx.tx, bn=True, scale=2.0,
                                cls=fixmatch.FixMatchState, stats=stats)
  ref_stats = {k: np.asarray(v) for k, v in stats.items()}
  masks, clipped = [], []
  for _ in range(2):
    batch = make_batch(rng)
    new, metrics = ur.run_step(freematch.train_step, state, batch, ctx)
    lab, unl = batch["labeled"], batch["unlabeled"]
    x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
    z, _ = ur.ref_forward(state.params, state.model_state, x, train=True)
    z_w = np.asarray(z[4:12])
    p = np.asarray(ur.softmax(jnp.asarray(z_w)))
    clipped.append(usb_update(ref_stats, p, hp.ema_p, hp.use_quantile,
                              False)["time_p"] > 0.95)
    ref_stats = usb_update(ref_stats, p, hp.ema_p, hp.use_quantile,
                           hp.clip_thresh)
    mod = ref_stats["p_model"] / ref_stats["p_model"].max()
    mask = (p.max(1) >= ref_stats["time_p"] * mod[p.argmax(1)]).astype(float)
    masks.append(mask)
    if hp.hard_labels:
      targets = np.eye(C)[p.argmax(1)]
    else:
      targets = np.asarray(ur.softmax(jnp.asarray(z_w) / hp.temperature))

    def loss(params, state=state, mask=mask, targets=targets,
             ref_stats=ref_stats, lab=lab, x=x):
      z, ms = ur.ref_forward(params, state.model_state, x, train=True)
      z_l, z_s = z[:4], z[12:]
      xe = ur.ce(ur.smooth(ur.onehot(lab["label"]), 0.1), z_l)
      per_row = -jnp.sum(targets * ur.log_softmax(z_s), -1)
      value = xe + 1.5 * jnp.sum(mask * per_row) / 8
      if mask.sum() > 0:
        value = value + hp.fairness_weight * usb_entropy_loss(
            mask, z_s, ref_stats["p_model"], ref_stats["label_hist"])
      return value, ms

    (value, ms), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    ur.assert_network_update(new, ur._Old(state), grads, ms)  # pylint: disable=protected-access
    ur.assert_close(new.stats, {k: jnp.asarray(v)
                                for k, v in ref_stats.items()})
    np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                               rtol=1e-12)
    np.testing.assert_allclose(float(metrics["monitors/mask"]), mask.mean(),
                               rtol=1e-6)
    np.testing.assert_allclose(float(metrics["monitors/time_p"]),
                               ref_stats["time_p"], rtol=1e-6)
    state = new
  # Not vacuous.
  if case == "none_kept":
    assert all(m.sum() == 0 for m in masks)
    assert float(metrics["losses/fairness"]) == 0.0
  else:
    assert all(0 < m.mean() < 1 for m in masks), masks
  if case == "quantile_clip":   # the clip binds in the first step
    assert clipped[0]


@pytest.mark.parametrize("case", ["some", "empty_class", "none"])
def test_fairness_loss_and_gradient(x64, case):
  """`fairness_loss` and its gradient w.r.t. the strong logits vs USB's form."""
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(6, C)) * 2.0)
  mask = {"some": [1, 0, 1, 1, 0, 1], "empty_class": [1, 1, 0, 0, 0, 0],
          "none": [0] * 6}[case]
  mask = np.asarray(mask, float)
  p_model = jnp.asarray([0.1, 0.2, 0.3, 0.4])
  label_hist = jnp.asarray([0.0, 0.3, 0.3, 0.4]
                           if case == "empty_class" else [0.2, 0.3, 0.1, 0.4])
  got, g_got = jax.value_and_grad(
      lambda z: freematch.fairness_loss(z, jnp.asarray(mask), p_model,
                                        label_hist))(logits)
  if case == "none":
    assert float(got) == 0.0
    np.testing.assert_array_equal(g_got, np.zeros((6, C)))
    return
  want, g_want = jax.value_and_grad(
      lambda z: usb_entropy_loss(mask, z, p_model, label_hist))(logits)
  ur.assert_close(got, want)
  ur.assert_close(g_got, g_want)
  # The gradient reaches only the kept rows, and is not zero there.
  assert (np.abs(np.asarray(g_got))[mask == 0] == 0).all()
  assert (np.abs(np.asarray(g_got))[mask == 1].sum(1) > 1e-4).all()
  pred = np.asarray(jnp.argmax(logits, -1))[mask == 1]
  if case == "empty_class":  # some class has h̄ = 0 (its 1/h̄ → 0)
    assert len(set(pred.tolist())) < C


# ---------------------------------------------------------------------------
# Through the trainer


def stage_config(**overrides):
  c = helpers.tiny_config("freematch", **overrides)
  c.data.uratio = 2
  c.data.augment.strong.update(policy="fixmatch", magnitude=4, cutout=4)
  c.data.augment.strong.ops = ("Identity", "TranslateX")
  c.freematch = freematch.default_block()
  c.freematch.ema_p = 0.9     # τ_t moves within a few steps
  c.freematch.fairness_weight = 0.1
  return c


def test_four_devices_equal_one_and_no_recompilation(tmp_path):
  c = stage_config()
  s4 = train.Stage(c, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(c, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  assert 0.0 < float(m1["monitors/mask"]) <= 1.0
  assert float(m1["losses/fairness"]) != 0.0
  assert float(st1.stats["time_p"]) > 0.1 + 1e-3   # moved from 1/C
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_continues_bitwise(tmp_path):
  """Straight to 6 == to 3, stop, rerun the same command to 6 (stats too)."""
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
  assert set(a["stats"]) == {"time_p", "p_model", "label_hist"}
  assert float(a["stats"]["time_p"]) != 0.1


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.freematch.update(dict(ema_m=0.9)),
     r"config\.freematch: unknown key\(s\) ema_m\. FreeMatchHparams has: "),
    (lambda c: c.freematch.update(dict(ema_p=1.0)),
     r"config\.freematch: ema_p=1\.0 is outside \[0\.0, 1\.0\)"),
    (lambda c: c.freematch.update(dict(ema_p=-0.1)),
     r"config\.freematch: ema_p=-0\.1 is outside \[0\.0, 1\.0\)"),
    (lambda c: c.freematch.update(dict(fairness_weight=-1.0)),
     r"config\.freematch: fairness_weight=-1\.0 is outside \[0\.0, inf\]"),
    (lambda c: setattr(c, "freematch", ml_collections.ConfigDict(
        dict(use_quantile="no"))),
     r"config\.freematch: use_quantile='no' must be True or False"),
    (lambda c: c.freematch.update(dict(threshold=0.95)),
     r"config\.freematch\.threshold: FreeMatch has no fixed threshold"),
    (lambda c: c.freematch.update(dict(temperature=0.0)),
     r"config\.freematch: temperature=0\.0 is outside \(0\.0, inf\]"),
    (lambda c: delattr(c, "freematch"), r"config\.freematch is missing"),
])
def test_bad_input_errors(tmp_path, edit, match):
  c = stage_config()
  edit(c)
  with pytest.raises(R2D2Error, match=match):
    train.Stage(c, str(tmp_path))


# ---------------------------------------------------------------------------
# Configs, value by value against USB's
# config/classic_cv/freematch/freematch_cifar10_{40,250,4000}_0.yaml


@pytest.mark.parametrize("labels", [40, 250, 4000])
def test_cifar10_config_matches_usb(labels):
  c = freematch_cifar10.get_config(str(labels))
  # The setup the classic-CV yamls share (network, data, views, optimizer,
  # schedule, EMA, length, evaluation).
  helpers.check_usb_cifar10_setup(
      c, dict(helpers.USB_CIFAR10, algorithm="freematch"), labels)
  hp = freematch.hparams(c)
  # hard_label, T, ema_p, ent_loss_ratio (0.001 for 40, 250 and 4000),
  # use_quantile; clip_thresh unset (False); ulb_loss_ratio 1.
  assert hp == freematch.FreeMatchHparams(
      weight=1.0, hard_labels=True, temperature=0.5, ema_p=0.999,
      fairness_weight=0.001, use_quantile=False, clip_thresh=False)
  assert not hp.alignment.enabled


def test_cifar10_config_variants():
  assert freematch_cifar10.get_config(None).data.num_labels == 4000
  small = freematch_cifar10.get_config("40,runlocal")
  assert small.data.num_labels == 40 and small.total_steps == 4
  assert small.model.name == "cnn_small"
  assert freematch_cifar10.get_config("runlocal").data.num_labels == 4000
  for bad in ("nope", "100", "40,250x"):
    with pytest.raises(ValueError, match="Unknown variant"):
      freematch_cifar10.get_config(bad)


def test_digits_and_mnist_configs_are_fixmatchs_with_freematch():
  """Same network, views, optimizer and schedule as FixMatch's configs."""
  from configs import fixmatch_digits, fixmatch_mnist  # pylint: disable=g-import-not-at-top
  for mod, base in ((freematch_digits, fixmatch_digits),
                    (freematch_mnist, fixmatch_mnist)):
    for arg in (None, "runlocal"):
      c, f = mod.get_config(arg).to_dict(), base.get_config(arg).to_dict()
      assert c.pop("method") == "freematch" and f.pop("method") == "fixmatch"
      assert c.pop("freematch") == freematch.default_block().to_dict()
      f.pop("fixmatch")
      assert c == f
    assert freematch.hparams(mod.get_config()) == freematch.FreeMatchHparams()
    with pytest.raises(ValueError, match="Unknown variant"):
      mod.get_config("nope")


def test_default_block_is_usb():
  block = freematch.default_block()
  assert block.to_dict() == dict(weight=1.0, hard_labels=True,
                                 temperature=0.5, ema_p=0.999,
                                 fairness_weight=0.001, use_quantile=False,
                                 clip_thresh=False)
  assert isinstance(block, ml_collections.ConfigDict)
