"""UDA's distribution-alignment and CTAugment options through the real step (the rest of UDA: tests/test_update_rules.py, test_uda_step).

The reference is written here from the formula: the teacher's probabilities
p = softmax(f(weak x_u)) aligned, p̃ = Normalize(p · (p̄_l + ε) / (p̂ + ε)),
with the estimates (target 'model': the labeled batch's softmax) updated with
this batch first; targets softmax(log p̃ / τ) = p̃^(1/τ) / Σ, the mask on p̃
(or on the targets with mask_on='sharpened'); the loss, `jax.grad`, SGD and
the EMA by hand.

Break checks (each line was broken in r2d2_jax/methods/uda.py, the tests
named failed, the line was restored):
  `probs_weak` not passed to `uda_loss` (alignment computed, not used)
                                   test_uda_step_with_alignment[*]
  mask on the unaligned softmax (`else jax.nn.softmax(logits_weak)`)
                                   test_uda_step_with_alignment[unsharpened]
  targets not sharpened (`targets = probs_weak`)
                                   test_uda_step_with_alignment[*]
  new estimates not written to the state
                                   test_uda_step_with_alignment[*]
  target 'model' from the weak instead of the labeled probabilities
                                   test_uda_step_with_alignment[*]

CTAugment (r2d2_jax/methods/learned_augment.py and uda.py; test_uda_step_
learns_ctaugment: the bin weights after one step against proximity
1 − ½ Σ|p − onehot(y)| of the EMA network in eval mode on the probe, and the
reference's sequential `update_rates` loop, transcribed here):
  probe classified with the raw instead of the EMA variables     fails
  probe classified in train mode (BatchNorm batch statistics)    fails
  proximity without the ½                                        fails
  new weights not written (`augment=state.augment`)              fails
  'probe' not added to UDA's labeled views                       fails
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import train
from r2d2_jax.data import ctaugment as cta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import uda
from tests import helpers
from tests import test_alignment
from tests import test_update_rules as ur

C = ur.C
EPS = 1e-6


@pytest.mark.parametrize("mask_on", ["unsharpened", "sharpened"])
def test_uda_step_with_alignment(mask_on):
  with jax.enable_x64(True):
    rng = np.random.default_rng(5)
    m, tau = 0.5, 0.5
    cfg = helpers.tiny_config("uda", ema_decay=ur.EMA)
    cfg.uda = common.uda_block(weight=2.0, ramp_steps=4, temperature=tau,
                               threshold=0.5, label_smoothing=0.1)
    cfg.uda.mask_on = mask_on
    cfg.uda.alignment = ml_collections.ConfigDict(
        dict(kind="ema", target="model", momentum=m))
    ctx = ur.make_ctx(cfg, ur.Net())
    init = ctx.bind(uda.init_state)(jax.random.key(0))
    assert isinstance(init, uda.UdaState) and not bool(init.alignment["seen"])
    p_model0 = jnp.asarray([0.4, 0.3, 0.2, 0.1])
    p_target0 = jnp.asarray([0.1, 0.2, 0.3, 0.4])
    state = ur.random_train_state(
        rng, ctx.tx, scale=2.0, cls=uda.UdaState,
        alignment={"p_model": p_model0, "seen": jnp.asarray(True),
                   "p_target": p_target0})
    batch = {"labeled": {"weak": ur.x_of(rng, 8), "label": ur.y_of(rng, 8),
                         "index": jnp.arange(8, dtype=jnp.int32)},
             "unlabeled": {"weak": ur.x_of(rng, 8), "strong": ur.x_of(rng, 8),
                           "label": ur.y_of(rng, 8),
                           "index": jnp.arange(8, 16, dtype=jnp.int32)}}
    lab, unl = batch["labeled"], batch["unlabeled"]
    sharpen = lambda x: x ** (1 / tau) / jnp.sum(x ** (1 / tau), -1,
                                                keepdims=True)

    def aligned(params):
      z_l = ur.ref_forward(params, {}, lab["weak"], True)[0]
      z_w = ur.ref_forward(params, {}, unl["weak"], True)[0]
      p, p_l = ur.softmax(z_w), ur.softmax(z_l)
      p_model = m * p_model0 + (1 - m) * jnp.mean(p, 0)
      p_target = m * p_target0 + (1 - m) * jnp.mean(p_l, 0)
      q = p * (p_target + EPS) / (p_model + EPS)
      return q / jnp.sum(q, -1, keepdims=True), p

    # A threshold that splits the aligned confidences, unlike the unaligned.
    q, p = aligned(state.params)
    conf = (lambda x: sharpen(x) if mask_on == "sharpened" else x)
    thr = test_alignment.splitting_threshold(jnp.max(conf(q), -1),
                                             jnp.max(conf(p), -1))
    cfg.uda.threshold = thr
    ctx = ur.make_ctx(cfg, ur.Net())
    new, metrics = ur.run_step(uda.train_step, state, batch, ctx)

    def loss(params):
      z_l = ur.ref_forward(params, {}, lab["weak"], True)[0]
      z_w = ur.ref_forward(params, {}, unl["weak"], True)[0]
      z_s = ur.ref_forward(params, {}, unl["strong"], True)[0]
      p = ur.softmax(jax.lax.stop_gradient(z_w))
      p_l = ur.softmax(jax.lax.stop_gradient(z_l))
      p_model = m * p_model0 + (1 - m) * jnp.mean(p, 0)
      p_target = m * p_target0 + (1 - m) * jnp.mean(p_l, 0)
      q = p * (p_target + EPS) / (p_model + EPS)
      q = q / jnp.sum(q, -1, keepdims=True)
      t = q ** (1 / tau)
      t = t / jnp.sum(t, -1, keepdims=True)
      conf = t if mask_on == "sharpened" else q
      mask = (jnp.max(conf, -1) >= thr).astype(jnp.float64)
      cons = jnp.mean(mask * -jnp.sum(t * ur.log_softmax(z_s), -1))
      w = 2.0 * min(1.0, int(state.step) / 4)
      xe = ur.ce(ur.smooth(ur.onehot(lab["label"]), 0.1), z_l)
      return xe + w * cons, (mask, p_model, p_target, p)

    (value, (mask, p_model, p_target, p)), grads = jax.value_and_grad(
        loss, has_aux=True)(state.params)
    ur.assert_network_update(new, ur._Old(state), grads, {})  # pylint: disable=protected-access
    ur.assert_close(new.alignment["p_model"], p_model)
    ur.assert_close(new.alignment["p_target"], p_target)
    np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                               rtol=1e-12)
    np.testing.assert_allclose(float(metrics["monitors/mask"]),
                               float(jnp.mean(mask)), rtol=1e-12)
    assert 0 < float(jnp.mean(mask)) < 1
    # Not vacuous: the unaligned mask differs.
    assert bool(jnp.any((jnp.max(conf(p), -1) >= thr) != (mask > 0)))


def test_alignment_is_the_uda_method_only():
  """MPL's teacher reads config.uda through `parse_uda`: the sub-block is an
  error there (not silently ignored); off by default, a plain TrainState."""
  c = helpers.tiny_mpl_config()
  c.uda.alignment = ml_collections.ConfigDict(dict(kind="ema",
                                                   target="uniform"))
  with pytest.raises(R2D2Error, match=r"config\.uda\.alignment: distribution "
                     r"alignment is an option of the uda method only"):
    uda.parse_uda(c)
  c.method = "uda"
  assert uda.hparams(c).alignment.enabled
  del c.uda["alignment"]
  assert not uda.hparams(c).alignment.enabled


def test_labeled_target_without_a_labeled_split_names_the_field():
  cfg = helpers.tiny_config("uda")
  cfg.uda = common.uda_block(weight=1.0, ramp_steps=0, temperature=0.5,
                             threshold=0.5, label_smoothing=0.0)
  cfg.uda.alignment = ml_collections.ConfigDict(dict(kind="ema"))  # 'labeled'
  with jax.enable_x64(True):
    ctx = ur.make_ctx(cfg, ur.Net())      # a Task without a labeled split
    with pytest.raises(R2D2Error, match=r"config\.uda\.alignment\.target="
                       r"'labeled' needs the labeled split"):
      ctx.bind(uda.init_state)(jax.random.key(0))


def test_uda_step_learns_ctaugment():
  """With strong policy 'ctaugment', UDA keeps the bin weights in its state
  and updates them from the labeled probe, as the FixMatch family does."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(11)
    decay = 0.9
    cfg = helpers.tiny_config("uda", ema_decay=ur.EMA)
    cfg.uda = common.uda_block(weight=1.0, ramp_steps=0, temperature=0.5,
                               threshold=0.5, label_smoothing=0.0)
    ops = ("solarize", "invert", "posterize")
    cfg.data.augment.strong.update(policy="ctaugment", num_ops=2,
                                   threshold=0.8, decay=decay, ops=ops)
    ctx = ur.make_ctx(cfg, ur.Net(bn=True))
    assert uda.views(ctx.hp)["labeled"] == ("weak", "probe")
    init = ctx.bind(uda.init_state)(jax.random.key(0))
    assert isinstance(init, uda.UdaState)
    np.testing.assert_array_equal(init.augment["ctaugment"]["rates"], 1.0)
    rates0 = rng.uniform(0.3, 1.0, init.augment["ctaugment"]["rates"].shape)
    state = ur.random_train_state(
        rng, ctx.tx, bn=True, scale=2.0, cls=uda.UdaState,
        augment={"ctaugment": {"rates": jnp.asarray(rates0, jnp.float32)}})
    n = 6
    _, draws = jax.vmap(lambda k, x: cta.probe(k, x, num_ops=2, ops=ops))(
        jax.random.split(jax.random.key(3), n), jnp.zeros((n, 4, 4, 1)))
    labels = ur.y_of(rng, n)
    batch = {"labeled": {"weak": ur.x_of(rng, n), "probe": ur.x_of(rng, n),
                         "probe_aux": draws, "label": labels,
                         "index": jnp.arange(n, dtype=jnp.int32)},
             "unlabeled": {"weak": ur.x_of(rng, 8), "strong": ur.x_of(rng, 8),
                           "label": ur.y_of(rng, 8),
                           "index": jnp.arange(n, n + 8, dtype=jnp.int32)}}
    new, metrics = ur.run_step(uda.train_step, state, batch, ctx)

    # The reference: the EMA network in eval mode on the probe, proximity,
    # then CTAugment's update_rates image by image, layer by layer.
    z, _ = ur.ref_forward(state.ema_params, state.ema_model_state,
                          batch["labeled"]["probe"], False)
    p = np.asarray(ur.softmax(z))
    prox = 1.0 - 0.5 * np.abs(p - np.eye(ur.C)[np.asarray(labels)]).sum(-1)
    expected = np.asarray(rates0, np.float32).copy()
    op, values = np.asarray(draws.op), np.asarray(draws.values)
    for i in range(n):
      for d in range(2):
        name = cta.OPS[op[i, d]]
        for j, nbins in enumerate(cta.BINS[name]):
          b = int(values[i, d, j] * nbins * 0.999)
          expected[op[i, d], j, b] = (expected[op[i, d], j, b] * decay +
                                      prox[i] * (1 - decay))
    got = np.asarray(new.augment["ctaugment"]["rates"])
    assert not np.allclose(expected, rates0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["monitors/ctaugment_proximity"]),
                               prox.mean(), rtol=1e-5)
    # The network update is UDA's, unchanged by the probe.
    cfg.data.augment.strong = ml_collections.ConfigDict(dict(
        policy="fixmatch", num_ops=2, magnitude=4))
    ctx_plain = ur.make_ctx(cfg, ur.Net(bn=True))
    plain = ur.TrainState(**{f: getattr(state, f)
                             for f in ur.TrainState.__dataclass_fields__})
    del batch["labeled"]["probe"], batch["labeled"]["probe_aux"]
    new_plain, _ = ur.run_step(uda.train_step, plain, batch, ctx_plain)
    for f in ("params", "model_state", "ema_params", "opt_state"):
      ur.assert_close(getattr(new, f), getattr(new_plain, f), tol=0.0)


def test_uda_stage_with_ctaugment(tmp_path):
  """Through the trainer: the probe view is built, the weights move, and a
  resumed run is bitwise the straight one (the weights are checkpointed)."""
  c = helpers.tiny_config("uda", total_steps=4, checkpoint_every_steps=2)
  c.data.uratio = 2
  c.uda = common.uda_block(weight=1.0, ramp_steps=0, temperature=0.5,
                           threshold=0.3, label_smoothing=0.0)
  c.data.augment.strong.update(policy="ctaugment", num_ops=2, threshold=0.8,
                               decay=0.9, cutout=4,
                               ops=("invert", "solarize", "translate_x"))
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  stage = train.Stage(c, str(tmp_path / "resumed"))
  stage.total_steps = 2
  stage.run()
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, _ = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == 4
  chex.assert_trees_all_equal(a, b)
  assert np.asarray(a["augment"]["ctaugment"]["rates"]).min() < 1.0
