"""AdaMatch: two real steps by hand (alignment to the labeled prediction, relative threshold), the weight schedule, the trainer, errors, configs.

The update-rule test runs the real, jitted `train_step` twice on the float64
one-layer model of tests/test_update_rules.py and compares every leaf of both
new states with a reference written here from the formulas (USB
`adamatch.py`, `AdaMatchThresholdingHook`, `DistAlignEMAHook(p_target_type=
'model')`): p̂ set by the first batch, the labeled EMA p̄_l from 1/C, both
updated with this batch before aligning; the cutoff τ · mean max p_l of the
UNALIGNED labeled probabilities; mask and targets of the ALIGNED unlabeled
ones (soft: the aligned probabilities, no temperature); λu(t) constant or
½ − ½ cos(min(π, 2πt/T)); `jax.grad`, SGD and the EMA by hand (helpers of
tests/test_softmatch.py).

Break checks (each line was broken in r2d2_jax/methods/adamatch.py, the tests
named failed, the line was restored):
  cutoff from the aligned unlabeled probabilities instead of p_l
                                   test_adamatch_two_steps[*]
  cutoff without the mean (`τ` alone)
                                   test_adamatch_two_steps[*]
  mask `>=` -> `>`                 test_relative_threshold_at_the_boundary
  targets from the unaligned probabilities (`signals.probs_u`)
                                   test_adamatch_two_steps[soft-constant]
  cosine warm-up `2π t/T` -> `π t/T`
                                   test_weight_schedule,
                                   test_adamatch_two_steps[hard-cosine_warmup]
  alignment default target 'uniform' in `hparams`
                                   test_adamatch_two_steps[*],
                                   test_cifar10_config_matches_usb[*]
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import adamatch_cifar10, adamatch_digits, adamatch_mnist
from configs import fixmatch_digits, fixmatch_mnist
from r2d2_jax import methods
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import adamatch
from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods import fixmatch
from tests import helpers
from tests import test_softmatch as tsm
from tests import test_update_rules as ur

C = ur.C
EPS = 1e-6
T_TOTAL = 100     # the task's total steps (tests/test_update_rules make_ctx)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def cosine_warmup(t, total):
  return 0.5 - 0.5 * np.cos(min(np.pi, 2 * np.pi * t / total))


def adamatch_by_hand(params, model_state, batch, stats, da, *, m, tau,
                     weight, hard):
  """AdaMatch's loss from its formula; (loss, (w, stats, da', ms))."""
  z_l, z_w, z_s, ms = tsm.forward(params, model_state, batch)
  p_l = ur.softmax(jax.lax.stop_gradient(z_l))
  p = ur.softmax(jax.lax.stop_gradient(z_w))
  mean_p = jnp.mean(p, 0)
  p_model = m * da["p_model"] + (1 - m) * mean_p if da["seen"] else mean_p
  p_target = m * da["p_target"] + (1 - m) * jnp.mean(p_l, 0)
  q = p * (p_target + EPS) / (p_model + EPS)
  q = q / jnp.sum(q, -1, keepdims=True)
  cutoff = tau * jnp.mean(jnp.max(p_l, -1))
  w = (jnp.max(q, -1) >= cutoff).astype(q.dtype)
  t = ur.onehot(jnp.argmax(q, -1)) if hard else q
  xe = ur.ce(ur.onehot(batch["labeled"]["label"]), z_l)
  per_row = -jnp.sum(t * ur.log_softmax(z_s), -1)
  loss = xe + weight * jnp.sum(w * per_row) / q.shape[0]
  return loss, (w, stats, {"p_model": p_model, "seen": True,
                           "p_target": p_target}, ms)


# ---------------------------------------------------------------------------
# The update rule


@pytest.mark.parametrize("hard, schedule", [
    (True, "constant"), (False, "constant"), (True, "cosine_warmup")],
                         ids=["hard-constant", "soft-constant",
                              "hard-cosine_warmup"])
def test_adamatch_two_steps(x64, hard, schedule):
  """Two steps from the initial estimates (p̂ unset, p̄_l = 1/C)."""
  rng = np.random.default_rng(4)
  tau = 0.9
  cfg = tsm.method_config("adamatch", adamatch.default_block(),
                          threshold=tau, weight=2.0, hard_labels=hard,
                          momentum=0.6, weight_schedule=schedule)
  ctx = ur.make_ctx(cfg, ur.Net(bn=True))
  assert ctx.hp.alignment == alignment_lib.AlignmentHparams(
      kind="ema", target="model", momentum=0.6)
  assert ctx.hp.total_steps == T_TOTAL
  step0 = 10
  state = ur.random_train_state(
      rng, ctx.tx, bn=True, scale=2.0, cls=fixmatch.FixMatchState, stats={},
      step=step0,
      alignment={"p_model": jnp.full((C,), 1 / C), "seen": jnp.asarray(False),
                 "p_target": jnp.full((C,), 1 / C)})
  batches = [tsm.make_batch(rng), tsm.make_batch(rng)]
  lam = [2.0 * (1.0 if schedule == "constant" else
                cosine_warmup(step0 + i, T_TOTAL)) for i in range(2)]

  def by_hand(q, ms, b, s, d, t):
    return adamatch_by_hand(q, ms, b, s, d, m=0.6, tau=tau,
                            weight=lam[t - step0], hard=hard)

  out = tsm.two_steps(adamatch.train_step, by_hand, state, batches, ctx)
  for (w, _, _, metrics, *_), want in zip(out, lam):
    assert 0.0 < float(jnp.mean(w)) < 1.0, w       # the cutoff splits rows
    np.testing.assert_allclose(float(metrics["monitors/weight"]), want,
                               rtol=1e-6)
  if schedule == "cosine_warmup":
    assert 0.1 < lam[0] < lam[1] < 0.3


def test_relative_threshold_at_the_boundary():
  """A row exactly at τ · mean max p_l is kept, one ulp below is dropped."""
  with jax.enable_x64(True):
    probs_l = jnp.asarray([[0.8, 0.2, 0, 0], [0.4, 0.6, 0, 0]])  # mean max 0.7
    hp = adamatch.AdaMatchHparams(threshold=0.5)
    cut = 0.5 * 0.7
    below = np.nextafter(cut, 0.0)
    probs = jnp.asarray([[cut, 0.3, 0.2, 0.15],
                         [below, 0.3, 0.2, 0.15],
                         [0.9, 0.1, 0, 0]])
    assert float(hp.threshold * jnp.mean(jnp.max(probs_l, -1))) == cut
    signals = fixmatch.Signals(probs_l=probs_l, probs_u=probs, index_u=None,
                               step=0)
    mask, stats = adamatch.relative_threshold(probs, {}, signals, hp)
    np.testing.assert_array_equal(np.asarray(mask), [1.0, 0.0, 1.0])
    assert stats == {}


def test_weight_schedule():
  """λu(t): constant (USB), or ½ − ½ cos(min(π, 2πt/T)) (the paper)."""
  const = adamatch.AdaMatchHparams(weight=3.0, total_steps=1000)
  cos = adamatch.AdaMatchHparams(weight=3.0, total_steps=1000,
                                 weight_schedule="cosine_warmup")
  for t in (0, 100, 250, 499, 500, 501, 999, 1000):
    assert float(const.weight_at(jnp.asarray(t))) == 3.0
    np.testing.assert_allclose(float(cos.weight_at(jnp.asarray(t))),
                               3.0 * cosine_warmup(t, 1000), rtol=1e-6,
                               atol=1e-7)
  assert float(cos.weight_at(0)) == 0.0 and float(cos.weight_at(500)) == 3.0
  assert float(cos.weight_at(900)) == 3.0


# ---------------------------------------------------------------------------
# Through the trainer


def test_four_devices_equal_one_and_no_recompilation(tmp_path):
  c = tsm.stage_config("adamatch", total_steps=8)   # λu(2) = λu / 2
  c.adamatch = adamatch.default_block()
  # Soft targets: with hard ones, an unlabeled image whose two largest aligned
  # probabilities tie to float32 round-off takes either argmax depending on
  # the summation order (seen on one CPU at step 3: the loss equal to 1e-7, a
  # momentum leaf 1.5 % apart). Hard labels are checked by hand in
  # test_adamatch_two_steps; here it is the cross-device statistics (the
  # cutoff's batch mean, the alignment EMAs) that must not depend on the mesh.
  c.adamatch.update(momentum=0.5, weight_schedule="cosine_warmup",
                    hard_labels=False)
  s4 = train.Stage(c, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(c, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  assert 0.0 < float(m1["monitors/mask"]) < 1.0
  np.testing.assert_allclose(float(m1["monitors/weight"]), 0.5, rtol=1e-6)
  assert bool(st1.alignment["seen"]) and st1.stats == {}
  assert float(jnp.max(jnp.abs(st1.alignment["p_target"] - 0.1))) > 1e-4
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.adamatch.update(dict(p_cutoff=0.9)),
     r"config\.adamatch: unknown key\(s\) p_cutoff\. AdaMatchHparams has:"),
    (lambda c: c.adamatch.update(dict(threshold=0.0)),
     r"config\.adamatch: threshold=0\.0 is outside \(0\.0, 1\.0\]"),
    (lambda c: c.adamatch.update(dict(threshold=1.01)),
     r"config\.adamatch: threshold=1\.01 is outside \(0\.0, 1\.0\]"),
    (lambda c: c.adamatch.update(dict(momentum=1.0)),
     r"config\.adamatch: momentum=1\.0 is outside \[0\.0, 1\.0\)"),
    (lambda c: c.adamatch.update(dict(weight_schedule="cosine")),
     r"config\.adamatch: weight_schedule='cosine'; choose one of "
     r"'constant', 'cosine_warmup'"),
    (lambda c: c.adamatch.update(dict(temperature=0.5)),
     r"config\.adamatch\.temperature: AdaMatch's soft pseudo-labels are"),
    (lambda c: c.adamatch.update(dict(total_steps=10)),
     r"config\.adamatch\.total_steps: T of the weight schedule"),
    (lambda c: setattr(c.adamatch, "alignment", ml_collections.ConfigDict(
        dict(queue=3))),
     r"config\.adamatch\.alignment: unknown key\(s\) queue"),
    (lambda c: delattr(c, "adamatch"), r"config\.adamatch is missing"),
], ids=["unknown key", "threshold 0", "threshold >1", "momentum 1",
        "schedule", "temperature", "total_steps", "alignment key", "missing"])
def test_bad_input_errors(tmp_path, edit, match):
  c = tsm.stage_config("adamatch")
  c.adamatch = adamatch.default_block()
  edit(c)
  with pytest.raises(R2D2Error, match=match):
    train.Stage(c, str(tmp_path))


# ---------------------------------------------------------------------------
# Configs, value by value against USB

# config/classic_cv/adamatch/adamatch_cifar10_{40,250,4000}_0.yaml.
USB_ADAMATCH = dict(
    helpers.USB_CIFAR10, algorithm="adamatch", hard_label=True, T=0.5,
    p_cutoff=0.95, ulb_loss_ratio=1.0, ema_p=0.999)


@pytest.mark.parametrize("labels", [40, 250, 4000])
def test_cifar10_config_matches_usb(labels):
  usb = USB_ADAMATCH
  c = adamatch_cifar10.get_config(str(labels))
  helpers.check_usb_cifar10_setup(c, usb, labels)
  task = methods.Task(num_classes=10, num_train=50000,
                              total_steps=c.total_steps, steps_per_epoch=1)
  hp = adamatch.hparams(c, task=task)
  # T = 0.5 is not read (USB: softmax=False for the soft labels).
  assert hp == adamatch.AdaMatchHparams(
      threshold=usb["p_cutoff"], weight=usb["ulb_loss_ratio"],
      hard_labels=usb["hard_label"], momentum=usb["ema_p"],
      weight_schedule="constant", total_steps=2 ** 20,
      alignment=alignment_lib.AlignmentHparams(
          kind="ema", target="model", momentum=usb["ema_p"], eps=1e-6))


def test_cifar10_config_variants():
  small = adamatch_cifar10.get_config("250,runlocal")
  assert small.data.num_labels == 250 and small.total_steps == 4
  for bad in ("nope", "100"):
    with pytest.raises(ValueError, match="Unknown variant"):
      adamatch_cifar10.get_config(bad)


def test_digits_and_mnist_configs_differ_from_fixmatch_in_the_method_only():
  for mine, theirs in ((adamatch_digits, fixmatch_digits),
                       (adamatch_mnist, fixmatch_mnist)):
    for arg in (None, "runlocal"):
      a, b = mine.get_config(arg), theirs.get_config(arg)
      assert a.method == "adamatch" and a.adamatch == (
          adamatch.default_block())
      a, b = a.to_dict(), b.to_dict()
      del a["adamatch"], b["fixmatch"]
      del a["method"], b["method"]
      assert a == b
    with pytest.raises(ValueError, match="Unknown variant"):
      mine.get_config("nope")
