"""SoftMatch: two real steps by hand (alignment, Gaussian statistics, weights), the trainer, errors, configs.

The update-rule test runs the real, jitted `train_step` twice on the float64
one-layer model of tests/test_update_rules.py and compares every leaf of both
new states with a reference written here from the formulas (USB
`softmatch.py`, `SoftMatchWeightingHook`, `DistAlignEMAHook`): logits by hand
over the concatenated batch (BatchNorm of labeled + weak + strong), uniform
alignment with the first batch setting p̂, μ_t and the UNBIASED σ²_t updated
with this batch before the weights, pseudo-labels of the unaligned
prediction, the loss from its formula, `jax.grad`, SGD and the EMA by hand.
A momentum of 0.6 (not USB's 0.999) makes every statistic move visibly.

Break checks (each line was broken in r2d2_jax/methods/softmatch.py, the tests
named failed, the line was restored):
  weights from the statistics BEFORE this batch (`stats["mu"]`,
  `stats["var"]`)
                                   test_softmatch_two_steps[hard], [soft]
  biased batch variance (`ddof=0`) test_softmatch_two_steps[hard], [soft]
  `n_sigma ** 2` -> `n_sigma`      test_softmatch_two_steps[hard], [soft]
  truncation dropped (`gap = max_p - mu`)
                                   test_softmatch_two_steps[hard], [soft]
  targets from the aligned probabilities (`fixmatch.aligned_targets`)
                                   test_softmatch_two_steps[hard], [soft]
  alignment default kind 'none' in `hparams`
                                   test_softmatch_two_steps[hard], [soft],
                                   test_hparams_align_by_default,
                                   test_cifar10_config_matches_usb[*]
  alignment momentum not tied to the block's (`momentum=0.999`)
                                   test_softmatch_two_steps[hard], [soft],
                                   test_hparams_align_by_default
  uratio check `0 < u < 2` -> `0 < u < 1`
                                   test_one_unlabeled_row_is_an_error
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import softmatch_cifar10, softmatch_digits, softmatch_mnist
from configs import fixmatch_digits, fixmatch_mnist
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods import fixmatch
from r2d2_jax.methods import softmatch
from tests import helpers
from tests import test_update_rules as ur

C = ur.C
EPS = 1e-6


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def method_config(method, block, **fields):
  cfg = helpers.tiny_config(method, ema_decay=ur.EMA)
  cfg.data.uratio = 2
  cfg[method] = block
  cfg[method].update(fields)
  return cfg


def make_batch(rng, n_l=4, n_u=8):
  return {"labeled": {"weak": ur.x_of(rng, n_l), "label": ur.y_of(rng, n_l),
                      "index": jnp.arange(n_l, dtype=jnp.int32)},
          "unlabeled": {"weak": ur.x_of(rng, n_u),
                        "strong": ur.x_of(rng, n_u),
                        "label": ur.y_of(rng, n_u),
                        "index": jnp.arange(n_l, n_l + n_u, dtype=jnp.int32)}}


def forward(params, model_state, batch):
  """(z_l, z_w, z_s, new model_state) of one forward over [x_l, weak, strong]."""
  lab, unl = batch["labeled"], batch["unlabeled"]
  n_l, n_u = lab["weak"].shape[0], unl["weak"].shape[0]
  x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
  z, ms = ur.ref_forward(params, model_state, x, train=True)
  return z[:n_l], z[n_l:n_l + n_u], z[n_l + n_u:], ms


def softmatch_by_hand(params, model_state, batch, stats, da, *, m, n_sigma,
                      weight, hard, temperature):
  """SoftMatch's loss from its formula; (loss, (w, stats', da', ms))."""
  z_l, z_w, z_s, ms = forward(params, model_state, batch)
  p = ur.softmax(jax.lax.stop_gradient(z_w))
  mean_p = jnp.mean(p, 0)
  p_model = m * da["p_model"] + (1 - m) * mean_p if da["seen"] else mean_p
  q = p * (1 / C + EPS) / (p_model + EPS)
  q = q / jnp.sum(q, -1, keepdims=True)
  max_q = jnp.max(q, -1)
  n = max_q.shape[0]
  mu = m * stats["mu"] + (1 - m) * jnp.mean(max_q)
  var = m * stats["var"] + (1 - m) * jnp.sum(
      (max_q - jnp.mean(max_q)) ** 2) / (n - 1)
  w = jnp.where(max_q < mu,
                jnp.exp(-(max_q - mu) ** 2 / (2 * var / n_sigma ** 2)), 1.0)
  if hard:
    t = ur.onehot(jnp.argmax(p, -1))
  else:
    t = ur.softmax(jax.lax.stop_gradient(z_w) / temperature)
  xe = ur.ce(ur.onehot(batch["labeled"]["label"]), z_l)
  per_row = -jnp.sum(t * ur.log_softmax(z_s), -1)
  loss = xe + weight * jnp.sum(w * per_row) / n
  return loss, (w, {"mu": mu, "var": var},
                {"p_model": p_model, "seen": True, "p_target": 1 / C}, ms)


def two_steps(step_fn, by_hand, state, batches, ctx):
  """Runs the real step on each batch and checks it against `by_hand`.

  `by_hand(params, model_state, batch, stats, da, step) -> (loss, (w, stats',
  da', ms))` is the reference (`step`: the state's step before the update);
  its statistics are chained from the reference's own (not the library's)
  outputs. Returns the per-step (w, stats', da', metrics, the state before,
  the statistics before).
  """
  stats, da = state.stats, dict(state.alignment, seen=False)
  out = []
  for batch in batches:
    before = (state, stats, da)
    new, metrics = ur.run_step(step_fn, state, batch, ctx)
    (value, (w, stats, da, ms)), grads = jax.value_and_grad(
        lambda q: by_hand(q, state.model_state, batch, stats, da,
                          int(state.step)),
        has_aux=True)(state.params)
    ur.assert_network_update(new, ur._Old(state), grads, ms)  # pylint: disable=protected-access
    np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                               rtol=1e-12)
    np.testing.assert_allclose(float(metrics["monitors/mask"]),
                               float(jnp.mean(w)), rtol=1e-6)
    ur.assert_close(new.stats, stats)
    ur.assert_close(new.alignment["p_model"], da["p_model"])
    ur.assert_close(new.alignment["p_target"],
                    jnp.broadcast_to(jnp.asarray(da["p_target"]), (C,)))
    assert bool(new.alignment["seen"])
    out.append((w, stats, da, metrics) + before)
    state = new
  return out


# ---------------------------------------------------------------------------
# The update rule


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_softmatch_two_steps(x64, hard):
  """Two steps: alignment (the first batch sets p̂), μ, σ² (unbiased) after
  this batch, weights, unaligned targets. The Gaussian starts mid-training
  (μ = 0.55, σ² = 0.04: from 1/C and 1 every row would weigh 1)."""
  rng = np.random.default_rng(2)
  cfg = method_config("softmatch", softmatch.default_block(), weight=2.0,
                      hard_labels=hard, temperature=0.5, momentum=0.6,
                      n_sigma=1.5)
  ctx = ur.make_ctx(cfg, ur.Net(bn=True))
  assert ctx.hp.alignment == alignment_lib.AlignmentHparams(
      kind="ema", target="uniform", momentum=0.6)
  state = ur.random_train_state(
      rng, ctx.tx, bn=True, scale=2.0, cls=fixmatch.FixMatchState,
      stats={"mu": jnp.asarray(0.55), "var": jnp.asarray(0.04)},
      alignment={"p_model": jnp.full((C,), 1 / C), "seen": jnp.asarray(False),
                 "p_target": jnp.full((C,), 1 / C)})
  batches = [make_batch(rng), make_batch(rng)]
  by_hand = lambda q, ms, b, s, d, t: softmatch_by_hand(
      q, ms, b, s, d, m=0.6, n_sigma=1.5, weight=2.0, hard=hard,
      temperature=0.5)
  out = two_steps(softmatch.train_step, by_hand, state, batches, ctx)
  for w, stats, _, metrics, *_ in out:
    # Not vacuous: some rows are down-weighted, some kept whole.
    assert 0.05 < float(jnp.min(w)) < 0.95 and float(jnp.max(w)) == 1.0
    np.testing.assert_allclose(float(metrics["monitors/softmatch_mu"]),
                               float(stats["mu"]), rtol=1e-6)
  # The statistics moved from their initial values in both steps.
  assert abs(float(out[1][1]["mu"]) - float(out[0][1]["mu"])) > 1e-3


# ---------------------------------------------------------------------------
# Through the trainer (SoftMatch's state holds both the rule's and the
# alignment's statistics)


def stage_config(method="softmatch", **overrides):
  c = helpers.tiny_config(method, **overrides)
  c.data.uratio = 2
  c.data.augment.strong.update(policy="fixmatch", magnitude=4, cutout=4)
  c.data.augment.strong.ops = ("Identity", "TranslateX")
  if method == "softmatch":
    c.softmatch = softmatch.default_block()
    c.softmatch.momentum = 0.5          # the statistics move within 3 steps
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
  assert float(st1.stats["mu"]) != 0.1 and bool(st1.alignment["seen"])
  assert len(jax.tree.leaves(st4.params)[0].sharding.device_set) == 4
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_continues_bitwise(tmp_path):
  """Straight to 6 == to 3, stop, rerun the same command to 6 (stats included)."""
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
  flat = {jax.tree_util.keystr(k): v
          for k, v in jax.tree_util.tree_leaves_with_path(a)}
  assert any("mu" in k for k in flat) and any("p_model" in k for k in flat)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.softmatch.update(dict(nsigma=2)),
     r"config\.softmatch: unknown key\(s\) nsigma\. SoftMatchHparams has:"),
    (lambda c: c.softmatch.update(dict(momentum=1.0)),
     r"config\.softmatch: momentum=1\.0 is outside \[0\.0, 1\.0\)"),
    (lambda c: c.softmatch.update(dict(momentum=-0.1)),
     r"config\.softmatch: momentum=-0\.1 is outside \[0\.0, 1\.0\)"),
    (lambda c: c.softmatch.update(dict(n_sigma=0.0)),
     r"config\.softmatch: n_sigma=0\.0 is outside \(0\.0, inf\]"),
    (lambda c: c.softmatch.update(dict(n_sigma=-2)),
     r"config\.softmatch: n_sigma=-2\.0 is outside \(0\.0, inf\]"),
    (lambda c: c.softmatch.update(dict(per_class=True)),
     r"config\.softmatch: per_class=True: only the global"),
    (lambda c: c.softmatch.update(dict(threshold=0.9)),
     r"config\.softmatch\.threshold: SoftMatch has no confidence threshold"),
    (lambda c: c.softmatch.update(dict(temperature=0.0)),
     r"config\.softmatch: temperature=0\.0 is outside"),
    (lambda c: setattr(c.softmatch, "alignment", ml_collections.ConfigDict(
        dict(momentum=1.5))),
     r"config\.softmatch\.alignment: momentum=1\.5 is outside \[0\.0, 1\.0\)"),
    (lambda c: setattr(c.softmatch, "alignment", ml_collections.ConfigDict(
        dict(kind="ring"))),
     r"config\.softmatch\.alignment: kind='ring'; choose one of"),
    (lambda c: delattr(c, "softmatch"), r"config\.softmatch is missing"),
], ids=["unknown key", "momentum 1", "momentum <0", "n_sigma 0",
        "n_sigma <0", "per_class", "threshold", "temperature",
        "alignment momentum", "alignment kind", "missing"])
def test_bad_input_errors(tmp_path, edit, match):
  c = stage_config()
  edit(c)
  with pytest.raises(R2D2Error, match=match):
    train.Stage(c, str(tmp_path))


def test_one_unlabeled_row_is_an_error():
  """The unbiased batch variance needs μB ≥ 2."""
  c = stage_config()
  c.data.batch_size, c.data.uratio = 1, 1
  with pytest.raises(R2D2Error, match=r"config\.data\.uratio=1: softmatch "
                     r"needs at least 2 unlabeled rows"):
    softmatch.hparams(c)
  c.data.uratio = 2
  softmatch.hparams(c)


def test_hparams_align_by_default():
  """The uniform alignment is on unless the sub-block says otherwise; its
  momentum follows the block's; a sub-block overrides field by field."""
  c = stage_config()
  c.softmatch.momentum = 0.9
  assert softmatch.hparams(c).alignment == alignment_lib.AlignmentHparams(
      kind="ema", target="uniform", momentum=0.9)
  c.softmatch.alignment = ml_collections.ConfigDict(dict(target="model"))
  assert softmatch.hparams(c).alignment == alignment_lib.AlignmentHparams(
      kind="ema", target="model", momentum=0.9)
  c.softmatch.alignment = ml_collections.ConfigDict(dict(kind="none"))
  assert not softmatch.hparams(c).alignment.enabled
  assert softmatch.SoftMatchHparams().alignment.enabled


# ---------------------------------------------------------------------------
# Configs, value by value against USB

# config/classic_cv/softmatch/softmatch_cifar10_{40,250,4000}_0.yaml (the
# entries that set the algorithm and its training; paths and logging left out).
USB_SOFTMATCH = dict(
    helpers.USB_CIFAR10, algorithm="softmatch", hard_label=True, T=0.5,
    dist_align=True, dist_uniform=True, per_class=False, ema_p=0.999,
    ulb_loss_ratio=1.0, n_sigma=2)


@pytest.mark.parametrize("labels", [40, 250, 4000])
def test_cifar10_config_matches_usb(labels):
  usb = USB_SOFTMATCH
  c = softmatch_cifar10.get_config(str(labels))
  helpers.check_usb_cifar10_setup(c, usb, labels)
  hp = softmatch.hparams(c)
  assert hp == softmatch.SoftMatchHparams(
      weight=usb["ulb_loss_ratio"], hard_labels=usb["hard_label"],
      temperature=usb["T"], n_sigma=usb["n_sigma"], momentum=usb["ema_p"],
      per_class=usb["per_class"],
      # dist_align (always on in USB), dist_uniform: p_target 'uniform'.
      alignment=alignment_lib.AlignmentHparams(
          kind="ema", target="uniform", momentum=usb["ema_p"], eps=1e-6))
  assert usb["dist_align"] and usb["dist_uniform"]


def test_cifar10_config_variants():
  assert softmatch_cifar10.get_config(None).data.num_labels == 4000
  small = softmatch_cifar10.get_config("40,runlocal")
  assert small.data.num_labels == 40 and small.total_steps == 4
  assert small.model.name == "cnn_small"
  for bad in ("nope", "100", "40,250x"):
    with pytest.raises(ValueError, match="Unknown variant"):
      softmatch_cifar10.get_config(bad)


def test_digits_and_mnist_configs_differ_from_fixmatch_in_the_method_only():
  for mine, theirs in ((softmatch_digits, fixmatch_digits),
                       (softmatch_mnist, fixmatch_mnist)):
    for arg in (None, "runlocal"):
      a, b = mine.get_config(arg), theirs.get_config(arg)
      assert a.method == "softmatch" and a.softmatch == (
          softmatch.default_block())
      a, b = a.to_dict(), b.to_dict()
      del a["softmatch"], b["fixmatch"]
      del a["method"], b["method"]
      assert a == b
    with pytest.raises(ValueError, match="Unknown variant"):
      mine.get_config("nope")
  assert softmatch.hparams(softmatch_digits.get_config()) == (
      softmatch.SoftMatchHparams())
