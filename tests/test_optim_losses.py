"""Schedules, optimizers and losses against hand-computed values."""

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r2d2_jax import losses, optim
from r2d2_jax.errors import R2D2Error


def _sched(lr, total, **kw):
  return optim.make_schedule(lr, ml_collections.ConfigDict(kw), total)


def test_fixmatch_cosine():
  s = _sched(0.03, 1000, name="fixmatch_cosine")
  np.testing.assert_allclose(s(0), 0.03, rtol=1e-6)
  np.testing.assert_allclose(s(500), 0.03 * math.cos(7 * math.pi * 500 / 16000),
                             rtol=1e-6)
  np.testing.assert_allclose(s(1000), 0.03 * math.cos(7 * math.pi / 16),
                             rtol=1e-5)


def test_cosine_with_wait_warmup_and_longer_horizon():
  s = _sched(0.05, 300, name="cosine", wait_steps=10, warmup_steps=10,
             decay_steps=350)
  assert float(s(0)) == 0.0 and float(s(9)) == 0.0  # waiting
  np.testing.assert_allclose(s(10), 0.05 / 10, rtol=1e-6)  # warmup starts
  np.testing.assert_allclose(s(19), 0.05, rtol=1e-6)
  # Cosine over 350 - 20 steps: at step 300 it has not reached 0.
  k = 300 - 20
  np.testing.assert_allclose(s(300), 0.05 * 0.5 * (1 + math.cos(math.pi * k /
                                                                330)),
                             rtol=1e-5)
  assert float(s(300)) > 0.001


def test_piecewise():
  s = _sched(0.1, 400, name="piecewise", boundaries=(300, 350),
             scales=(0.1, 0.1))
  np.testing.assert_allclose([s(0), s(299), s(300), s(351)],
                             [0.1, 0.1, 0.01, 0.001], rtol=1e-5)


def test_unknown_names():
  with pytest.raises(R2D2Error, match="Valid schedules"):
    _sched(0.1, 10, name="linear_warmup")
  with pytest.raises(R2D2Error, match="Valid optimizers: adam, adamw, sgd"):
    optim.make_optimizer(ml_collections.ConfigDict(
        dict(name="lamb", lr=0.1)), 10)


def test_sgd_weight_decay_is_coupled_l2():
  tx, _ = optim.make_optimizer(ml_collections.ConfigDict(dict(
      name="sgd", lr=0.1, momentum=0.0, weight_decay=0.01)), 10)
  p = {"w": jnp.array([2.0])}
  g = {"w": jnp.array([1.0])}
  u, _ = tx.update(g, tx.init(p), p)
  np.testing.assert_allclose(u["w"], -0.1 * (1.0 + 0.01 * 2.0), rtol=1e-6)


def _numpy_adam(grads, lr, betas1, b2=0.999, eps=1e-8):
  """Adam written out: m, v, bias correction with the step's own β1."""
  m = v = 0.0
  out = []
  for t, (g, b1) in enumerate(zip(grads, betas1), start=1):
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    out.append(-lr * m_hat / (np.sqrt(v_hat) + eps))
  return np.array(out)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_adam_b1_schedule_switches_beta1_at_the_boundary(name):
  # vat_tf feeds β1 = 0.9 before the decay and 0.5 from its first step on.
  cfg = ml_collections.ConfigDict(dict(
      name=name, lr=0.1, b1=0.9, b2=0.999, weight_decay=0.0,
      b1_schedule=dict(boundaries=(3, 5), values=(0.5, 0.2))))
  tx, _ = optim.make_optimizer(cfg, 10)
  grads = [1.0, -2.0, 0.5, 3.0, -1.0, 2.0, 0.25]
  p = {"w": jnp.array([0.0])}
  state = tx.init(p)
  got = []
  for g in grads:
    u, state = tx.update({"w": jnp.array([g])}, state, p)
    got.append(float(u["w"][0]))
  betas = [0.9, 0.9, 0.9, 0.5, 0.5, 0.2, 0.2]
  np.testing.assert_allclose(got, _numpy_adam(grads, 0.1, betas), rtol=1e-5)
  # ... and differs from a constant β1 from the switch on.
  const = _numpy_adam(grads, 0.1, [0.9] * 7)
  np.testing.assert_allclose(got[:3], const[:3], rtol=1e-5)
  assert np.all(np.abs(np.array(got[3:]) - const[3:]) > 1e-3)


def test_adam_b1_schedule_bad_input():
  def make(name="adam", **block):
    return optim.make_optimizer(ml_collections.ConfigDict(dict(
        name=name, lr=0.1, b1_schedule=block)), 10)
  with pytest.raises(R2D2Error, match="one length"):
    make(boundaries=(3, 5), values=(0.5,))
  with pytest.raises(R2D2Error, match="strictly increasing"):
    make(boundaries=(5, 3), values=(0.5, 0.2))
  with pytest.raises(R2D2Error, match=r"\[0, 1\)"):
    make(boundaries=(3,), values=(1.0,))
  with pytest.raises(R2D2Error, match="has none"):
    make(name="sgd", boundaries=(3,), values=(0.5,))


def test_losses_match_numpy():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
  p = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
  q = np.exp(b) / np.exp(b).sum(-1, keepdims=True)
  np.testing.assert_allclose(losses.kl_divergence(a, b),
                             np.mean(np.sum(p * np.log(p / q), -1)), rtol=1e-5)
  np.testing.assert_allclose(losses.entropy(a),
                             np.mean(-np.sum(p * np.log(p), -1)), rtol=1e-5)
  y = np.array([0, 1, 2, 3])
  np.testing.assert_allclose(losses.cross_entropy(a, y),
                             np.mean(-np.log(p[np.arange(4), y])), rtol=1e-5)
  mask = np.array([1.0, 0.0, 1.0, 0.0])
  np.testing.assert_allclose(
      losses.cross_entropy(a, y, mask),
      np.sum(-np.log(p[np.arange(4), y]) * mask) / 4, rtol=1e-5)
  np.testing.assert_allclose(
      losses.cross_entropy(a, y, label_smoothing=0.1),
      np.mean(-np.sum((0.9 * np.eye(5)[y] + 0.02) * np.log(p), -1)), rtol=1e-5)
  np.testing.assert_allclose(losses.sharpen(jnp.asarray(p), 0.5).sum(-1), 1.0,
                             rtol=1e-6)
