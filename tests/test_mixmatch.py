"""MixMatch: the update rule by hand, its pieces, the trainer, configs, errors.

The step test runs the real, jitted `mixmatch.train_step` on a float64
BatchNorm + Dense network and compares every leaf of the new state with a
reference written here from docs/algorithms.md and the reference code
(google-research/mixmatch `mixmatch.py`, `libml/layers.py`): the guesses, the
MixUp draw replayed from the step key with `jax.random`, the reference's
`interleave` translated line by line, BatchNorm by hand per interleaved batch,
the losses written out, `jax.grad`, SGD and the EMA by hand. Library helpers
(`losses`, `mixmatch.*`) are not used by the references.

Break checks (each line was broken in the method, optimizer or config file,
the tests named failed, then the line was restored):

  mixmatch  L2 summed over classes instead of the mean    -> test_step[*]
  mixmatch  guess from the first view only (no mean)       -> test_step[*], test_guess
  mixmatch  sharpened with T = 1 instead of T              -> test_step[*], test_guess
  mixmatch  λ' = λ (no max with 1 − λ)                     -> test_step[*], test_mix_draw
  mixmatch  targets mixed with P instead of P[π]           -> test_step[*]
  mixmatch  interleave without the swap                    -> test_step[interleave], test_interleave_index
  mixmatch  running BN statistics of the last batch        -> test_step[interleave]
  mixmatch  EMA model keeps EMA'd BN statistics            -> test_step[*]
  mixmatch  ramp ignored (full weight from step 0)         -> test_step[*], test_ramp
  mixmatch  MixUp key from a trace-time random number, not the step rng
                                                           -> test_stage_four_devices..., test_stage_resume_bitwise
  mixmatch  EMA BN statistics cast to bfloat16 (state changes type)
                                                           -> test_stage_four_devices... (cache size 2)
  mixmatch  num_views lower bound 0                        -> test_bad_input[num_views]
  mixmatch  uratio check `u <= 0` -> `u < 0`               -> test_bad_unlabeled_batch
  optim     decay of θ instead of θ + u                    -> test_adam_decay_after_update
  optim     decay factor with lr_0 instead of lr_t         -> test_adam_decay_after_update
  optim     coupled L2 also added in 'after_update' mode   -> test_adam_decay_after_update
  config    cifar10 ramp_steps 16000 instead of 16384      -> test_cifar10_config_matches_the_reference
  mixmatch  alignment of the sharpened guess instead of before sharpening
                                                           -> test_step_with_alignment
  mixmatch  aligned average not used (q from `guess_labels`)
                                                           -> test_step_with_alignment
  mixmatch  new alignment estimates not written to the state
                                                           -> test_step_with_alignment
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import mixmatch_cifar10, mixmatch_digits, mixmatch_mnist
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import methods, models, optim, train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import mixmatch
from tests import helpers
from tests.test_train import _stage
from tests.test_update_rules import (EMA, Net, make_ctx, random_train_state,
                                     ref_forward, ref_sgd, run_step, trace_of)

C = 4
TOL = 1e-10


def block(**overrides):
  b = dict(weight=3.0, ramp_steps=4, temperature=0.5, alpha=0.75, num_views=2,
           interleave=True)
  b.update(overrides)
  return ml_collections.ConfigDict(b)


def mm_config(batch_size=4, uratio=1, **overrides):
  c = helpers.tiny_config("mixmatch", ema_decay=EMA)
  del c.data["uratio"]                    # an int field; allow 0.5
  c.data.batch_size, c.data.uratio = batch_size, uratio
  c.mixmatch = block(**overrides)
  return c


# ---------------------------------------------------------------------------
# The reference, by hand


def log_softmax(z):
  z = z - jnp.max(z, -1, keepdims=True)
  return z - jnp.log(jnp.sum(jnp.exp(z), -1, keepdims=True))


def ref_interleave(xy, batch):
  """google-research/mixmatch `libml/layers.py` `interleave`, line by line."""
  nu = len(xy) - 1
  groups = [batch // (nu + 1)] * (nu + 1)
  for x in range(batch - sum(groups)):
    groups[-x - 1] += 1
  offsets = [0]
  for g in groups:
    offsets.append(offsets[-1] + g)
  xy = [[v[offsets[p]:offsets[p + 1]] for p in range(nu + 1)] for v in xy]
  for i in range(1, nu + 1):
    xy[0][i], xy[i][i] = xy[i][i], xy[0][i]
  return [jnp.concatenate(v) for v in xy]


def by_hand(params, model_state, batch, key, cfg, step, align=None):
  """MixMatch's loss as the reference computes it; (loss, aux).

  `align`, if given, maps the K-view average before sharpening (distribution
  alignment)."""
  h = cfg.mixmatch
  lab, unl = batch["labeled"], batch["unlabeled"]
  b = lab["weak"].shape[0]
  us = [unl["weak"], unl["weak_1"]][:h.num_views]
  probs = [jnp.exp(log_softmax(ref_forward(params, model_state, u, True)[0]))
           for u in us]                       # one BN batch per view
  mean = sum(probs) / len(probs)
  if align is not None:
    mean = align(jax.lax.stop_gradient(mean))
  q = mean ** (1 / h.temperature)
  q = jax.lax.stop_gradient(q / jnp.sum(q, -1, keepdims=True))
  x = jnp.concatenate([lab["weak"]] + us)
  p = jnp.concatenate([jnp.eye(C)[lab["label"]]] + [q] * len(us))
  k_lam, k_perm = jax.random.split(jax.random.fold_in(key, 1))
  lam = jax.random.beta(k_lam, h.alpha, h.alpha, (x.shape[0],), jnp.float64)
  lam = jnp.maximum(lam, 1 - lam)[:, None]
  perm = jax.random.permutation(k_perm, x.shape[0])
  xm, pm = lam * x + (1 - lam) * x[perm], lam * p + (1 - lam) * p[perm]
  if h.interleave:
    batches = ref_interleave(jnp.split(xm, xm.shape[0] // b), b)
  else:
    batches = [xm]
  outs = [ref_forward(params, model_state, xb, True) for xb in batches]
  z = [o[0] for o in outs]
  z = jnp.concatenate(ref_interleave(z, b) if h.interleave else z)
  xe = jnp.mean(-jnp.sum(pm[:b] * log_softmax(z[:b]), -1))
  l2u = jnp.mean((jnp.exp(log_softmax(z[b:])) - pm[b:]) ** 2)
  w = h.weight * min(1.0, step / h.ramp_steps)
  return xe + w * l2u, dict(xe=xe, l2u=l2u, q=q, lam=lam, ms=outs[0][1], w=w)


def assert_close(a, e, tol=TOL):
  chex.assert_trees_all_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("interleave", [True, False],
                         ids=["interleave", "one_bn_batch"])
def test_step(interleave):
  """One jitted step vs the reference: params, momentum, BN stats, EMA, metrics."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    cfg = mm_config(interleave=interleave)
    ctx = make_ctx(cfg, Net(bn=True))
    state = random_train_state(rng, ctx.tx, bn=True, scale=2.0, step=1)
    n = lambda k: jnp.asarray(rng.normal(size=(k, 3)))
    batch = {"labeled": {"weak": n(4), "label": jnp.asarray([0, 1, 2, 3],
                                                            jnp.int32),
                         "index": jnp.arange(4, dtype=jnp.int32)},
             "unlabeled": {"weak": n(4), "weak_1": n(4),
                           "label": jnp.asarray([3, 1, 0, 2], jnp.int32),
                           "index": jnp.arange(4, 8, dtype=jnp.int32)}}
    key = 7
    new, metrics = run_step(mixmatch.train_step, state, batch, ctx, key=key)

    (value, aux), grads = jax.jit(jax.value_and_grad(
        lambda p: by_hand(p, state.model_state, batch, jax.random.key(key),
                          cfg, 1), has_aux=True))(state.params)
    trace = jax.tree.unflatten(jax.tree.structure(state.params),
                               trace_of(state.opt_state))
    params, new_trace = ref_sgd(state.params, grads, trace, 0.125, 0.0625)
    assert_close(new.params, params)
    assert_close(trace_of(new.opt_state), jax.tree.leaves(new_trace))
    assert_close(new.model_state, aux["ms"])
    assert_close(new.ema_params, jax.tree.map(
        lambda e, p: EMA * e + (1 - EMA) * p, state.ema_params, params))
    # The EMA model evaluates with the raw running statistics (the reference's
    # EMA covers the trainable variables only).
    assert_close(new.ema_model_state, aux["ms"])
    assert int(new.step) == 2
    for name, want in [("losses/total", value), ("losses/xe", aux["xe"]),
                       ("losses/xeu", aux["l2u"]), ("monitors/weight", aux["w"]),
                       ("monitors/lambda", jnp.mean(aux["lam"])),
                       ("monitors/pseudo_label_accuracy", jnp.mean(
                           jnp.argmax(aux["q"], -1) ==
                           batch["unlabeled"]["label"]))]:
      np.testing.assert_allclose(float(metrics[name]), float(want), rtol=1e-9,
                                 err_msg=name)
    # Not vacuous: both losses matter and the step moved the weights.
    assert float(aux["l2u"]) > 1e-4 and aux["w"] == 0.75
    assert float(jnp.max(jnp.abs(params["Dense_0"]["kernel"] -
                                 state.params["Dense_0"]["kernel"]))) > 1e-3


def test_step_with_alignment():
  """Distribution alignment (ema, target 'labeled') of the K-view average
  before sharpening: the estimate after the batch and the whole update."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    m, eps = 0.5, 1e-6
    cfg = mm_config(interleave=False)
    cfg.mixmatch.alignment = ml_collections.ConfigDict(
        dict(kind="ema", target="labeled", momentum=m))
    labels = np.array([0, 0, 0, 1, 2, 0, 3, 1])
    ctx = make_ctx(cfg, Net(bn=True), labeled_index=np.arange(6),
                   train_labels=labels)
    marginal = jnp.asarray([4, 1, 1, 0]) / 6
    init = ctx.bind(mixmatch.init_state)(jax.random.key(0))
    assert isinstance(init, mixmatch.MixMatchState)
    assert_close(init.alignment["p_target"], marginal, tol=1e-7)
    p_model0 = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    state = random_train_state(
        rng, ctx.tx, bn=True, scale=2.0, step=1, cls=mixmatch.MixMatchState,
        alignment={"p_model": p_model0, "seen": jnp.asarray(True),
                   "p_target": marginal})
    n = lambda k: jnp.asarray(rng.normal(size=(k, 3)))
    batch = {"labeled": {"weak": n(4), "label": jnp.asarray([0, 1, 2, 3],
                                                            jnp.int32),
                         "index": jnp.arange(4, dtype=jnp.int32)},
             "unlabeled": {"weak": n(4), "weak_1": n(4),
                           "label": jnp.asarray([3, 1, 0, 2], jnp.int32),
                           "index": jnp.arange(4, 8, dtype=jnp.int32)}}
    new, _ = run_step(mixmatch.train_step, state, batch, ctx, key=7)

    # The guesses at the state's parameters, by hand: their K-view average.
    mean = sum(jnp.exp(log_softmax(ref_forward(
        state.params, state.model_state, batch["unlabeled"][v], True)[0]))
               for v in ("weak", "weak_1")) / 2
    p_model = m * p_model0 + (1 - m) * jnp.mean(mean, 0)

    def align(pbar):
      out = pbar * (marginal + eps) / (p_model + eps)
      return out / jnp.sum(out, -1, keepdims=True)

    (_, aux), grads = jax.jit(jax.value_and_grad(
        lambda p: by_hand(p, state.model_state, batch, jax.random.key(7),
                          cfg, 1, align=align), has_aux=True))(state.params)
    trace = jax.tree.unflatten(jax.tree.structure(state.params),
                               trace_of(state.opt_state))
    params, new_trace = ref_sgd(state.params, grads, trace, 0.125, 0.0625)
    assert_close(new.params, params)
    assert_close(trace_of(new.opt_state), jax.tree.leaves(new_trace))
    assert_close(new.model_state, aux["ms"])
    assert_close(new.alignment["p_model"], p_model)
    assert_close(new.alignment["p_target"], marginal)
    # Not vacuous: alignment changed the guess.
    plain = mean ** 2 / jnp.sum(mean ** 2, -1, keepdims=True)
    assert float(jnp.max(jnp.abs(aux["q"] - plain))) > 1e-2


def test_alignment_errors():
  """Target 'model' has no unmixed labeled prediction; 'labeled' needs the
  labeled split; an alignment field out of range names it."""
  c = mm_config()
  c.mixmatch.alignment = ml_collections.ConfigDict(dict(kind="ema",
                                                        target="model"))
  with pytest.raises(R2D2Error, match=r"config\.mixmatch\.alignment\.target="
                     r"'model': MixMatch's step has no unmixed"):
    mixmatch.hparams(c)
  c.mixmatch.alignment = ml_collections.ConfigDict(dict(kind="ema",
                                                        momentum=1.0))
  with pytest.raises(R2D2Error, match=r"config\.mixmatch\.alignment: "
                     r"momentum=1\.0 is outside"):
    mixmatch.hparams(c)
  c.mixmatch.alignment = ml_collections.ConfigDict(dict(kind="queue"))
  with jax.enable_x64(True):
    ctx = make_ctx(c, Net())                  # no labeled split in the task
    with pytest.raises(R2D2Error, match=r"config\.mixmatch\.alignment\."
                       r"target='labeled' needs the labeled split"):
      ctx.bind(mixmatch.init_state)(jax.random.key(0))
  del c.mixmatch["alignment"]
  assert not mixmatch.hparams(c).alignment.enabled


# ---------------------------------------------------------------------------
# The pieces


def test_mix_draw():
  """λ' = max(λ, 1 − λ) ≥ 0.5, one λ per row, π a permutation, from the key."""
  def draws(key, alpha):
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha, (64,))
    return (mixmatch.mix_draw(key, 64, alpha),
            (jnp.maximum(lam, 1 - lam), jax.random.permutation(k_perm, 64)))

  alphas = jnp.repeat(jnp.asarray([0.1, 0.75, 5.0]), 4)
  keys = jax.random.split(jax.random.key(0), alphas.shape[0])
  (lams, perms), (want_lams, want_perms) = jax.jit(jax.vmap(draws))(keys,
                                                                    alphas)
  np.testing.assert_array_equal(lams, want_lams)      # replayable from the key
  np.testing.assert_array_equal(perms, want_perms)
  for lam, perm in zip(np.asarray(lams), np.asarray(perms)):
    assert np.all(lam >= 0.5) and np.all(lam <= 1)
    assert len(set(lam.tolist())) > 32                 # per row, not per batch
    assert sorted(perm.tolist()) == list(range(64))


def test_guess():
  """q = normalise((mean_k p_k)^(1/T)): the K views are averaged, then sharpened."""
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(5), size=(3, 6))        # K = 3 views, U = 6
  for t in (0.5, 1.0, 0.25):
    mean = probs.mean(0)
    want = mean ** (1 / t) / np.sum(mean ** (1 / t), -1, keepdims=True)
    np.testing.assert_allclose(mixmatch.guess_labels(jnp.asarray(probs), t),
                               want, rtol=1e-5)
  one_hot_views = np.eye(5)[[[0, 1], [2, 1]]]            # disagreeing views
  np.testing.assert_allclose(
      mixmatch.guess_labels(jnp.asarray(one_hot_views), 1.0),
      [[0.5, 0, 0.5, 0, 0], [0, 1, 0, 0, 0]], atol=1e-7)


def test_ramp():
  hp = mixmatch.MixMatchHparams(weight=75.0, ramp_steps=16384)
  for step, want in [(0, 0.0), (4096, 18.75), (16384, 75.0), (10**6, 75.0)]:
    assert float(hp.weight_at(step)) == pytest.approx(want)
  assert float(mixmatch.MixMatchHparams(weight=2.0).weight_at(0)) == 2.0


def test_interleave_index():
  """3 batches of 4 (slices 1, 1, 2): batch 0 swaps slice p with batch p's."""
  order = mixmatch.interleave_index(3, 4)
  np.testing.assert_array_equal(order, [0, 5, 10, 11, 4, 1, 6, 7, 8, 9, 2, 3])
  for g, s in [(3, 4), (3, 64), (7, 16), (1, 5)]:
    o = mixmatch.interleave_index(g, s)
    np.testing.assert_array_equal(o[o], np.arange(g * s))   # its own inverse
    ref = np.concatenate(ref_interleave(list(np.arange(g * s).reshape(g, s)), s))
    np.testing.assert_array_equal(o, ref)


def test_views():
  hp = mixmatch.MixMatchHparams(weight=1.0, num_views=3)
  assert mixmatch.views(hp) == {"labeled": ("weak",),
                                "unlabeled": ("weak", "weak_1", "weak_2")}


def _adam_config(mode, **kw):
  return ml_collections.ConfigDict(dict(
      name="adam", lr=0.002, weight_decay=0.02, weight_decay_mode=mode,
      decay_mask="kernels", schedule=dict(name="constant", warmup_steps=2),
      **kw))


def test_adam_decay_after_update():
  """Adam, then kernels ← kernels·(1 − wd·lr_t); biases and BN untouched."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    t = lambda *s: jnp.asarray(rng.normal(size=s))
    params = {"Dense_0": {"kernel": t(3, 4), "bias": t(4)},
              "BatchNorm_0": {"scale": t(3), "bias": t(3)}}
    tx, schedule = optim.make_optimizer(_adam_config("after_update"), 10)
    opt = tx.init(params)
    p, m, v = params, jax.tree.map(jnp.zeros_like, params), jax.tree.map(
        jnp.zeros_like, params)
    got = params
    for step in range(3):
      g = jax.tree.map(lambda x: x * 0 + t(*x.shape), params)
      upd, opt = tx.update(g, opt, got)
      got = optax.apply_updates(got, upd)
      lr = float(schedule(step))            # warmup: lr/2, then lr
      m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
      v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g * g, v, g)
      adam = lambda p, m, v: p - lr * (m / (1 - 0.9 ** (step + 1))) / (
          jnp.sqrt(v / (1 - 0.999 ** (step + 1))) + 1e-8)
      p = jax.tree.map(adam, p, m, v)
      p["Dense_0"]["kernel"] = p["Dense_0"]["kernel"] * (1 - 0.02 * lr)
      assert_close(got, p, tol=1e-9)
    assert float(schedule(0)) == pytest.approx(0.001)
    # The default ('coupled') is unchanged: L2 added to the gradient.
    tx_c, _ = optim.make_optimizer(_adam_config("coupled"), 10)
    tx_ref = optax.chain(optax.add_decayed_weights(
        0.02, mask=optim.decay_mask("kernels")), optax.adam(schedule))
    g = jax.tree.map(jnp.ones_like, params)
    assert_close(tx_c.update(g, tx_c.init(params), params)[0],
                 tx_ref.update(g, tx_ref.init(params), params)[0])


def test_optimizer_mode_errors():
  with pytest.raises(R2D2Error, match="weight_decay_mode 'nope'.*coupled, "
                     "after_update"):
    optim.make_optimizer(_adam_config("nope"), 10)
  adamw = _adam_config("after_update")
  adamw.name = "adamw"
  with pytest.raises(R2D2Error, match="applies to 'sgd' and 'adam'"):
    optim.make_optimizer(adamw, 10)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("field,value,match", [
    ("num_views", 0, r"config.mixmatch: num_views=0 is outside \[1, inf\]"),
    ("temperature", 0.0, r"temperature=0.0 is outside \(0.0, inf\]"),
    ("alpha", 0.0, r"alpha=0.0 is outside \(0.0, inf\]"),
    ("weight", -1.0, r"weight=-1.0 is outside \[0.0, inf\]"),
    ("ramp_steps", -1, r"ramp_steps=-1 is outside \[0, inf\]"),
    ("num_views", 1.5, r"num_views=1.5 must be an integer"),
    ("interleave", 1, r"interleave=1 must be True or False"),
    ("bogus", 1, r"unknown key\(s\) bogus.*MixMatchHparams has: weight"),
])
def test_bad_input(field, value, match):
  c = mm_config(**{field: value})
  with pytest.raises(R2D2Error, match=match):
    mixmatch.hparams(c)


def test_bad_unlabeled_batch():
  with pytest.raises(R2D2Error, match=r"config.data.uratio=0: MixMatch needs"):
    mixmatch.hparams(mm_config(uratio=0))
  with pytest.raises(R2D2Error, match=r"config.data.uratio=0.5: with "
                     r"config.mixmatch.interleave"):
    mixmatch.hparams(mm_config(batch_size=4, uratio=0.5, num_views=1))
  mixmatch.hparams(mm_config(batch_size=4, uratio=0.5, num_views=1,
                             interleave=False))
  c = mm_config()
  del c["mixmatch"]
  with pytest.raises(R2D2Error, match=r"config.mixmatch: missing key\(s\) "
                     "weight"):
    mixmatch.hparams(c)


# ---------------------------------------------------------------------------
# Through the trainer


def stage_config(**overrides):
  c = helpers.tiny_config("mixmatch", **overrides)
  # A one-hidden-layer BatchNorm MLP: compiles in seconds (helpers.tiny_mpl_config).
  c.model.name = "mlp_mnist"
  c.model.kwargs = ml_collections.ConfigDict(dict(widths=(16,)))
  c.data.uratio = 1
  c.mixmatch = block(weight=10.0, ramp_steps=2)
  return c


def test_stage_four_devices_equal_one_without_recompiling(tmp_path):
  c = stage_config()
  s4 = _stage(tmp_path, "four", c, jax.devices()[:4])
  s1 = _stage(tmp_path, "one", c, jax.devices()[:1])
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  assert len(jax.tree.leaves(st4.params)[0].sharding.device_set) == 4
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert float(m1["losses/xeu"]) > 0 and float(m1["monitors/weight"]) == 10.0
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_stage_resume_bitwise(tmp_path):
  c = stage_config(total_steps=6, checkpoint_every_steps=3)
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  stage = train.Stage(c, str(tmp_path / "resumed"))
  stage.total_steps = 3  # as if killed after the step-3 save
  stage.run()
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 6
  chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------------------------
# Configs against the reference


@pytest.mark.parametrize("labels", [250, 4000])
def test_cifar10_config_matches_the_reference(labels):
  c = mixmatch_cifar10.get_config(str(labels))
  assert c.method == "mixmatch" and c.data.dataset == "cifar10"
  assert c.data.num_labels == labels and c.data.num_val == 0
  assert c.data.unlabeled == "rest"
  assert c.model.name == "wrn28_2" and c.model.kwargs.bn_momentum == 0.999
  wrn = models.MODELS["wrn28_2"]
  assert (wrn.keywords["depth"], wrn.keywords["width"]) == (28, 2)
  assert (c.data.batch_size, c.data.uratio) == (64, 1)
  w = c.data.augment.weak
  assert (w.flip, w.translate, w.pad_mode) == (True, 4, "reflect")
  o = c.optimizer
  assert (o.name, o.lr, o.b1, o.b2) == ("adam", 0.002, 0.9, 0.999)
  assert (o.weight_decay, o.weight_decay_mode, o.decay_mask) == (
      0.02, "after_update", "kernels")
  assert o.schedule.name == "constant" and o.schedule.warmup_steps == 0
  assert c.ema_decay == 0.999
  assert c.total_steps == (1 << 16) * 1024 // 64          # train_kimg 2^16
  hp = mixmatch.hparams(c)
  assert hp == mixmatch.MixMatchHparams(
      weight=75.0, ramp_steps=1024 * 1024 // 64, temperature=0.5, alpha=0.75,
      num_views=2, interleave=True)
  assert c.eval_every_steps == 64 * 1024 // 64            # report_kimg 64
  assert mixmatch_cifar10.get_config().data.num_labels == 4000
  small = mixmatch_cifar10.get_config("250,runlocal")
  assert small.data.num_labels == 250 and small.total_steps == 4
  for bad in ("1000", "nope", "250,x"):
    with pytest.raises(ValueError, match="Unknown variant"):
      mixmatch_cifar10.get_config(bad)


def test_digits_and_mnist_configs():
  c = mixmatch_digits.get_config()
  assert (c.model.name, c.data.num_labels, c.data.num_val) == (
      "cnn_small", 50, 200)
  assert (c.total_steps, c.eval_every_steps, c.log_every_steps) == (
      2000, 80, 100)
  m = mixmatch_mnist.get_config()
  assert (m.data.dataset, m.data.num_labels, m.data.num_val) == (
      "mnist", 100, 1000)
  for cfg in (c, m, mixmatch_digits.get_config("runlocal"),
              mixmatch_mnist.get_config("runlocal")):
    hp = methods.get_method(cfg.method).hparams(cfg)
    assert (hp.temperature, hp.alpha, hp.num_views) == (0.5, 0.75, 2)
    assert cfg.optimizer.weight_decay_mode == "after_update"
