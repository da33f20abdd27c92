"""UDA's distribution-alignment option through the real step (the rest of UDA: tests/test_update_rules.py, test_uda_step).

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
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
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
