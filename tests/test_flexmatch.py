"""FlexMatch: thresholds from known records, the record table, the trainer, errors, configs.

The update-rule tests run the real, jitted `train_step` (bound as the trainer
binds it, the records sharded over 8 devices) on the float64 one-layer model
of tests/test_update_rules.py. The dense layer is set by hand to
z = (x_1, x_2, x_3, 0), so each weak row's probabilities are chosen exactly.
The reference is written here: the mask from the stored β with the convex
mapping, the records written in batch order (a repeated row keeps its last
confident value), the learning effects recomputed the way USB's
`FlexMatchThresholdingHook.update` does it (a `Counter` over the pool's
records), the loss from its formula, its gradient by `jax.grad`, and the
optimizer and EMA by hand (`ur.assert_network_update`).

Break checks (each line was broken in r2d2_jax/methods/flexmatch.py, the tests
named failed, the line was restored; `..._step` is test_flexmatch_step):
  mask from the recomputed β (β after this batch's records)
                                 ..._step[warmup], [no_warmup], [soft]
  linear mapping τ·β instead of the convex τ·β/(2 − β)
                                 ..._step[warmup], [no_warmup], [soft]
  records written where the mask is 1 instead of where max p ≥ τ
                                 ..._step[*]
  last occurrence not kept (`keep = write`: both writes of a repeated row)
                                 ..._step[warmup], [no_warmup], [soft], [fresh]
  the unused count dropped from the denominator (never warm-up)
                                 ..._step[warmup], [soft], [fresh]
  thresh_warmup ignored (always warm-up)
                                 ..._step[no_warmup]
  USB's `max < N` condition dropped (β always recomputed)
                                 ..._step[kept]
  old record not subtracted from the counts
                                 ..._step[warmup], [no_warmup], [soft]
  default temperature 0.5 (USB's unread T applied to the soft targets)
                                 ..._step[soft], test_default_block_is_usb
  records replicated (`state_sharding` without the records' sharding)
                                 test_four_devices_equal_one_and_no_recompilation
"""

import collections

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import flexmatch_cifar10, flexmatch_digits, flexmatch_mnist
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import fixmatch, flexmatch
from tests import helpers
from tests import test_update_rules as ur

C = ur.C
N_TRAIN = 20                     # rows 0..3 labeled, 4..19 the pool
POOL = np.arange(4, N_TRAIN)     # N = 16; rows 20..23 padding (8 devices)
N_ROWS = 24


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def flex_config(**block):
  cfg = helpers.tiny_config("flexmatch", ema_decay=ur.EMA)
  cfg.data.uratio = 2
  cfg.flexmatch = flexmatch.default_block()
  cfg.flexmatch.update(block)
  return cfg


def flex_ctx(cfg):
  return ur.make_ctx(cfg, ur.Net(), mesh=ur.mesh8(), num_train=N_TRAIN,
                     labeled_index=np.arange(4), unlabeled_index=POOL)


# The weak rows' logits z = (x_1, x_2, x_3, 0), and their rows. Row 9 comes
# twice: class 1 (p 0.980) then class 2 (p 0.993), both above τ = 0.9; row 4
# (recorded 0) becomes class 1 (p 0.968); the fifth row (class 0, p 0.769)
# lies between τ·β/(2 − β) and τ·β for the stored β(0) = 0.9.
WEAK = np.array([[4.0, 0, 0], [0, 5, 0], [0, 0, 1], [0, 0, 6],
                 [-3, -3, -3], [2.3, 0, 0], [0, 4.5, 0], [0.5, 0, 0]])
INDEX_U = np.array([8, 9, 10, 9, 11, 12, 4, 13])
# The stored state: rows 4, 5, 6 recorded as class 0, row 7 as class 1.
OLD_RECORDS = {4: 0, 5: 0, 6: 0, 7: 1}
OLD_BETA = np.array([0.9, 0.6, 1.0, 0.3])


def flex_state(rng, ctx, records, beta):
  hist = np.bincount(records[records >= 0], minlength=C)
  stats = {"records": jnp.asarray(records, jnp.int32),
           "counts": jnp.asarray(hist, jnp.int32),
           "beta": jnp.asarray(beta, jnp.float64)}
  state = ur.random_train_state(rng, ctx.tx, cls=fixmatch.FixMatchState,
                                stats=stats)
  params = {"Dense_0": {"kernel": jnp.eye(3, C, dtype=jnp.float64),
                        "bias": jnp.zeros((C,), jnp.float64)}}
  return state.replace(params=params)


def make_batch(rng):
  return {"labeled": {"weak": ur.x_of(rng, 4), "label": ur.y_of(rng, 4),
                      "index": jnp.arange(4, dtype=jnp.int32)},
          "unlabeled": {"weak": jnp.asarray(WEAK), "strong": ur.x_of(rng, 8),
                        "label": ur.y_of(rng, 8),
                        "index": jnp.asarray(INDEX_U, jnp.int32)}}


def usb_update(records, beta, warmup):
  """USB's `FlexMatchThresholdingHook.update` over the pool's records."""
  counter = collections.Counter(records[POOL].tolist())
  beta = np.array(beta, float)
  if max(counter.values()) < len(POOL):
    if warmup:
      top = max(counter.values())
    else:
      top = max(v for k, v in counter.items() if k != -1)
    beta = np.array([counter[i] / top for i in range(C)])
  return beta


CASES = {
    # name: (τ, thresh_warmup, hard labels, stored records / β)
    "warmup": (0.9, True, True, "old"),
    "no_warmup": (0.9, False, True, "old"),
    "soft": (0.9, True, False, "old"),
    "fresh": (0.9, True, True, "fresh"),      # the first step: β = 0
    "kept": (0.999, True, True, "full"),      # every pool row class 0
}


@pytest.mark.parametrize("case", list(CASES))
def test_flexmatch_step(x64, case):
  """Mask from the stored β (convex mapping), records where max p ≥ τ, β anew."""
  tau, warmup, hard, start = CASES[case]
  rng = np.random.default_rng(7)
  cfg = flex_config(threshold=tau, thresh_warmup=warmup, hard_labels=hard,
                    weight=2.0)
  ctx = flex_ctx(cfg)
  records = np.full(N_ROWS, -1)
  beta = OLD_BETA
  if start == "old":
    for row, label in OLD_RECORDS.items():
      records[row] = label
  elif start == "fresh":
    beta = np.zeros(C)
  else:
    records[POOL] = 0
  state = flex_state(rng, ctx, records, beta)
  if start == "fresh":   # what init_state gives
    fresh = flexmatch.init_stats(ctx.task, ctx.hp)
    np.testing.assert_array_equal(fresh["records"], records)
    np.testing.assert_array_equal(fresh["beta"], beta)
    np.testing.assert_array_equal(fresh["counts"], np.zeros(C))
  batch = make_batch(rng)
  new, metrics = ur.run_step(flexmatch.train_step, state, batch, ctx)

  # The reference. Weak probabilities: the dense layer is z = (x, 0).
  z_w = np.concatenate([WEAK, np.zeros((8, 1))], 1)
  p = np.exp(z_w) / np.exp(z_w).sum(1, keepdims=True)
  max_p, label = p.max(1), p.argmax(1)
  b = beta[label]
  weights = (max_p >= tau * b / (2 - b)).astype(float)
  expected_records = records.copy()
  for i in range(8):                      # in batch order: the last write wins
    if max_p[i] >= tau:
      expected_records[INDEX_U[i]] = label[i]
  expected_beta = usb_update(expected_records, beta, warmup)
  targets = np.eye(C)[label] if hard else p
  lab, unl = batch["labeled"], batch["unlabeled"]

  def loss(params):
    x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
    z, ms = ur.ref_forward(params, state.model_state, x, train=True)
    z_l, z_s = z[:4], z[12:]
    per_row = -jnp.sum(targets * ur.log_softmax(z_s), -1)
    return (ur.ce(ur.onehot(lab["label"]), z_l) +
            2.0 * jnp.sum(weights * per_row) / 8), ms

  (value, ms), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)  # pylint: disable=protected-access
  np.testing.assert_array_equal(new.stats["records"], expected_records)
  np.testing.assert_array_equal(
      new.stats["counts"],
      np.bincount(expected_records[expected_records >= 0], minlength=C))
  ur.assert_close(new.stats["beta"], jnp.asarray(expected_beta))
  np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                             rtol=1e-12)
  np.testing.assert_allclose(float(metrics["monitors/mask"]), weights.mean(),
                             rtol=1e-6)
  # Not vacuous: the case does what it says.
  assert (records[:4] == -1).all() and (records[20:] == -1).all()
  assert 0 < weights.mean() <= 1
  if start == "fresh":
    assert weights.mean() == 1.0
  else:
    assert weights.mean() < 1.0
  if start == "full":
    assert (max_p < tau).all()
    np.testing.assert_array_equal(expected_beta, beta)
  else:
    assert not np.array_equal(expected_beta, beta)
    # row 9 ends as class 2, the last of its two confident occurrences;
    # row 4 moves from class 0 to class 1
    assert expected_records[9] == 2 and expected_records[4] == 1
  if start == "old":
    # the recomputed β would have given another mask
    b_new = expected_beta[label]
    assert not np.array_equal(weights, max_p >= tau * b_new / (2 - b_new))
    # the linear mapping τ·β would have given another mask
    assert not np.array_equal(weights, max_p >= tau * b)
    # most records unused: warm-up changes β
    assert (len(POOL) - (expected_records[POOL] >= 0).sum() >
            np.bincount(expected_records[POOL][expected_records[POOL] >= 0]
                        ).max())


# ---------------------------------------------------------------------------
# Through the trainer


def stage_config(**overrides):
  c = helpers.tiny_config("flexmatch", **overrides)
  c.data.uratio = 2
  c.data.augment.strong.update(policy="fixmatch", magnitude=4, cutout=4)
  c.data.augment.strong.ops = ("Identity", "TranslateX")
  c.flexmatch = flexmatch.default_block()
  c.flexmatch.threshold = 0.3   # some rows are recorded within a few steps
  return c


def _check_records(stats, num_train):
  records = np.asarray(stats["records"])
  assert (records[num_train:] == -1).all()
  np.testing.assert_array_equal(
      stats["counts"], np.bincount(records[records >= 0], minlength=10))
  return records[:num_train]


def test_four_devices_equal_one_and_no_recompilation(tmp_path):
  c = stage_config()
  s4 = train.Stage(c, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(c, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  assert st4.stats["records"].sharding.spec == P("data")
  assert len(st4.stats["records"].sharding.device_set) == 4
  n = s1.task.num_train
  st4, st1 = jax.device_get(st4), jax.device_get(st1)
  r4, r1 = _check_records(st4.stats, n), _check_records(st1.stats, n)
  np.testing.assert_array_equal(r4, r1)
  assert (r1 >= 0).sum() > 0 and float(m1["monitors/beta_mean"]) > 0
  assert 0.0 < float(m1["monitors/mask"]) <= 1.0
  strip = lambda s: s.replace(stats=dict(s.stats, records=None))
  chex.assert_trees_all_close(strip(st4), strip(st1), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_continues_bitwise(tmp_path):
  """Straight to 6 == to 3, stop, rerun the same command to 6 (records too)."""
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
  assert (np.asarray(a["stats"]["records"]) >= 0).sum() > 0


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("edit, match", [
    (lambda c: c.flexmatch.update(dict(tau=0.9)),
     r"config\.flexmatch: unknown key\(s\) tau\. FlexMatchHparams has: "
     r"threshold=0\.95"),
    (lambda c: c.flexmatch.update(dict(threshold=0.0)),
     r"config\.flexmatch: threshold=0\.0 is outside \(0\.0, 1\.0\]"),
    (lambda c: c.flexmatch.update(dict(threshold=1.5)),
     r"config\.flexmatch: threshold=1\.5 is outside \(0\.0, 1\.0\]"),
    (lambda c: setattr(c, "flexmatch", ml_collections.ConfigDict(
        dict(thresh_warmup="yes"))),
     r"config\.flexmatch: thresh_warmup='yes' must be True or False"),
    (lambda c: setattr(c.data, "uratio", 0),
     r"config\.data\.uratio=0: flexmatch trains on an unlabeled batch"),
    (lambda c: delattr(c, "flexmatch"), r"config\.flexmatch is missing"),
])
def test_bad_input_errors(tmp_path, edit, match):
  c = stage_config()
  edit(c)
  with pytest.raises(R2D2Error, match=match):
    train.Stage(c, str(tmp_path))


# ---------------------------------------------------------------------------
# Configs, value by value against USB's
# config/classic_cv/flexmatch/flexmatch_cifar10_{40,250,4000}_0.yaml


@pytest.mark.parametrize("labels", [40, 250, 4000])
def test_cifar10_config_matches_usb(labels):
  c = flexmatch_cifar10.get_config(str(labels))
  # The setup the classic-CV yamls share (network, data, views, optimizer,
  # schedule, EMA, length, evaluation).
  helpers.check_usb_cifar10_setup(
      c, dict(helpers.USB_CIFAR10, algorithm="flexmatch"), labels)
  hp = flexmatch.hparams(c)
  # p_cutoff, ulb_loss_ratio, hard_label, thresh_warmup; T unused (= 1).
  assert hp == flexmatch.FlexMatchHparams(threshold=0.95, weight=1.0,
                                          hard_labels=True, temperature=1.0,
                                          thresh_warmup=True)
  assert not hp.alignment.enabled


def test_cifar10_config_variants():
  assert flexmatch_cifar10.get_config(None).data.num_labels == 4000
  small = flexmatch_cifar10.get_config("40,runlocal")
  assert small.data.num_labels == 40 and small.total_steps == 4
  assert small.model.name == "cnn_small"
  assert small.data.augment.strong.policy == "usb"
  assert flexmatch_cifar10.get_config("runlocal").data.num_labels == 4000
  for bad in ("nope", "100", "40,250x"):
    with pytest.raises(ValueError, match="Unknown variant"):
      flexmatch_cifar10.get_config(bad)


def test_digits_and_mnist_configs_are_fixmatchs_with_flexmatch():
  """Same network, views, optimizer and schedule as FixMatch's configs."""
  from configs import fixmatch_digits, fixmatch_mnist  # pylint: disable=g-import-not-at-top
  for mod, base in ((flexmatch_digits, fixmatch_digits),
                    (flexmatch_mnist, fixmatch_mnist)):
    for arg in (None, "runlocal"):
      c, f = mod.get_config(arg).to_dict(), base.get_config(arg).to_dict()
      assert c.pop("method") == "flexmatch" and f.pop("method") == "fixmatch"
      assert c.pop("flexmatch") == flexmatch.default_block().to_dict()
      f.pop("fixmatch")
      assert c == f
    assert flexmatch.hparams(mod.get_config()) == flexmatch.FlexMatchHparams()
    with pytest.raises(ValueError, match="Unknown variant"):
      mod.get_config("nope")
  d = flexmatch_digits.get_config()
  assert (d.data.dataset, d.data.num_labels, d.total_steps) == ("digits", 50,
                                                                2000)
  assert flexmatch_mnist.get_config().data.num_labels == 100


def test_default_block_is_usb():
  block = flexmatch.default_block()
  assert block.to_dict() == dict(threshold=0.95, weight=1.0, hard_labels=True,
                                 temperature=1.0, thresh_warmup=True)
  assert isinstance(block, ml_collections.ConfigDict)
