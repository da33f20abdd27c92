"""SemiMeta: the meta-gradient on the pseudo-labels, the label step, BN, sharding."""

from typing import ClassVar

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from r2d2_jax import losses
from r2d2_jax import methods
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.methods import semimeta
from r2d2_jax.errors import R2D2Error
from tests import helpers


class TinyMLP(nn.Module):
  """4 → 5 → 3 with tanh: smooth, so finite differences are accurate."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = jnp.tanh(nn.Dense(5)(x.reshape(x.shape[0], -1)))
    return nn.Dense(3)(x)


class TinyBN(nn.Module):
  """Dense → BatchNorm → Dense, no randomness."""
  rng_names: ClassVar[tuple[str, ...]] = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6)(x.reshape(x.shape[0], -1))
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    return nn.Dense(3)(jnp.tanh(x))


def _problem(seed=0, n=4, m=3):
  """A float64 tiny MLP, an unlabeled and a labeled batch, random ỹ."""
  rng = np.random.default_rng(seed)
  model = TinyMLP()
  x_u = jnp.asarray(rng.normal(size=(n, 4)))
  x_l = jnp.asarray(rng.normal(size=(m, 4)))
  y_l = jnp.asarray(rng.integers(0, 3, m))
  y_tilde = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, 3))))
  params = model.init(jax.random.key(seed), x_u)["params"]
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), params)
  unlabeled_fn = lambda p: model.apply({"params": p}, x_u)
  labeled_fn = lambda p: model.apply({"params": p}, x_l)
  return unlabeled_fn, labeled_fn, params, y_tilde, y_l


def _first_order_by_jacobians(unlabeled_fn, labeled_fn, params, y_l, alpha):
  """(2α/n) J_i g from explicit per-example Jacobians (no jvp)."""
  g = jax.grad(lambda p: losses.cross_entropy(labeled_fn(p), y_l))(params)
  jac = jax.jacrev(lambda p: jax.nn.softmax(unlabeled_fn(p)))(params)
  n = jax.eval_shape(unlabeled_fn, params).shape[0]
  j_g = sum(jnp.tensordot(j, gl, axes=gl.ndim)
            for j, gl in zip(jax.tree.leaves(jac), jax.tree.leaves(g)))
  return 2 * alpha / n * j_g


def test_exact_label_gradient_equals_finite_differences():
  with jax.enable_x64(True):
    unl, lab, params, y_tilde, y_l = _problem()
    alpha = 0.5

    def outer(y):
      grads = jax.grad(lambda p: semimeta.consistency_loss(unl(p), y))(params)
      theta = jax.tree.map(lambda p, g: p - alpha * g, params, grads)
      return losses.cross_entropy(lab(theta), y_l)

    exact = semimeta.meta_label_grad_exact(unl, lab, params, y_tilde, y_l,
                                           alpha)
    assert exact.dtype == jnp.float64
    h = 1e-5
    fd = np.zeros(y_tilde.shape)
    for idx in np.ndindex(*y_tilde.shape):
      e = jnp.zeros(y_tilde.shape).at[idx].set(h)
      fd[idx] = (outer(y_tilde + e) - outer(y_tilde - e)) / (2 * h)
    assert np.abs(fd).max() > 1e-4  # not a vacuous comparison
    np.testing.assert_allclose(exact, fd, rtol=1e-6, atol=1e-10)


def test_first_order_equals_the_linearised_formula():
  with jax.enable_x64(True):
    unl, lab, params, _, y_l = _problem(seed=1)
    alpha = 0.3
    g_y, probs = semimeta.meta_label_grad_first_order(unl, lab, params, y_l,
                                                      alpha)
    expected = _first_order_by_jacobians(unl, lab, params, y_l, alpha)
    np.testing.assert_allclose(g_y, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(probs, jax.nn.softmax(unl(params)), rtol=1e-12)
    # Softmax rows sum to 1 for every θ, so J_i g sums to 0 over classes.
    np.testing.assert_allclose(g_y.sum(-1), 0.0, atol=1e-14)


def test_exact_equals_first_order_when_pseudo_labels_are_the_predictions():
  """At ỹ = s(θ) the inner gradient is 0, θ̃ = θ, and the two modes agree."""
  with jax.enable_x64(True):
    unl, lab, params, _, y_l = _problem(seed=2)
    fo, probs = semimeta.meta_label_grad_first_order(unl, lab, params, y_l, 0.7)
    exact = semimeta.meta_label_grad_exact(unl, lab, params, probs, y_l, 0.7)
    np.testing.assert_allclose(exact, fo, rtol=1e-9, atol=1e-14)


def test_exact_tends_to_first_order_as_alpha_vanishes():
  with jax.enable_x64(True):
    unl, lab, params, y_tilde, y_l = _problem(seed=3)
    errors = []
    for alpha in (1e-1, 1e-2, 1e-3):
      exact = semimeta.meta_label_grad_exact(unl, lab, params, y_tilde, y_l,
                                             alpha) / alpha
      fo = semimeta.meta_label_grad_first_order(unl, lab, params, y_l,
                                                alpha)[0] / alpha
      errors.append(float(jnp.linalg.norm(exact - fo) / jnp.linalg.norm(fo)))
    assert errors[0] > 1e-4  # ỹ ≠ s(θ): the modes really differ at α = 0.1
    # O(α): each tenfold smaller α shrinks the relative error about tenfold.
    assert errors[1] < errors[0] / 5 and errors[2] < errors[1] / 5, errors
    assert errors[2] < 1e-3, errors


def test_updated_labels_are_distributions():
  rng = np.random.default_rng(0)
  y = jax.nn.softmax(jnp.asarray(rng.normal(size=(6, 5)) * 2, jnp.float32))
  g = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  # Row 0: a step that zeroes every entry keeps ỹ instead of dividing by 0.
  g = g.at[0].set(10.0)
  for beta in (0.0, 0.1, 1.0, 100.0):
    y_hat = semimeta.update_labels(y, g, beta)
    assert bool(jnp.all(y_hat >= 0))
    np.testing.assert_allclose(y_hat.sum(-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(semimeta.update_labels(y, g, 0.0), y, rtol=1e-6)
  np.testing.assert_allclose(semimeta.update_labels(y, g, 100.0)[0], y[0])
  # A small step moves against the gradient (before renormalisation).
  step = semimeta.update_labels(y, g, 1e-3)[1:] - y[1:]
  assert float(jnp.sum(step * g[1:])) < 0


def _bn_context(mode, meta_bn):
  cfg = helpers.tiny_config("semimeta")
  cfg.semimeta = semimeta.default_block()
  cfg.semimeta.update(mode=mode, ramp_steps=0, label_lr=5.0, meta_bn=meta_bn)
  cfg.ema_decay = 0.0
  cfg.data.uratio = 1
  return helpers.StepContext(cfg, TinyBN(), optax.sgd(0.1),
                             optax.constant_schedule(0.1), (2, 2, 1),
                             num_classes=3, total_steps=1, steps_per_epoch=1)


@pytest.mark.parametrize("meta_bn", ["eval", "train"])
def test_meta_step_leaves_batch_norm_statistics_alone(meta_bn):
  rng = np.random.default_rng(0)
  x_l = jnp.asarray(rng.normal(size=(4, 2, 2, 1)), jnp.float32)
  x_u = jnp.asarray(rng.normal(size=(4, 2, 2, 1)) + 1.0, jnp.float32)
  batch = {"labeled": {"weak": x_l, "label": jnp.asarray([0, 1, 2, 0])},
           "unlabeled": {"weak": x_u, "label": jnp.asarray([1, 1, 2, 0])}}
  key = jax.random.key(1)
  results = {}
  for mode in ("exact", "first_order"):
    ctx = _bn_context(mode, meta_bn)
    state = ctx.net.init_train_state(jax.random.key(0))
    step = jax.jit(ctx.bind(semimeta.train_step))
    new, m = step(state, batch, key)
    # The final loss's forwards alone: mixed images (their mix does not depend
    # on the targets), then the unlabeled images.
    keys = semimeta.step_keys(key)
    dummy = jnp.zeros((4, 3))
    x_mix, _ = semimeta.mixup(keys["mix"], x_l, dummy, x_u, dummy, 1.0)
    _, ms = ctx.net.apply_train(state.variables(), x_mix,
                                keys["forward_mix"])
    _, ms = ctx.net.apply_train({"params": state.params, **ms}, x_u,
                            keys["forward_unlabeled"])
    chex.assert_trees_all_close(new.model_state, ms, rtol=1e-6, atol=1e-7)
    # The statistics did move, so the comparison is not vacuous.
    before = jax.tree.leaves(state.model_state)
    assert any(float(jnp.max(jnp.abs(a - b))) > 1e-3
               for a, b in zip(before, jax.tree.leaves(new.model_state)))
    assert float(m["semimeta/label_change"]) > 0
    assert np.isfinite(float(m["losses/total"]))
    results[mode] = (new.params, m)
  # In the step ỹ = s(θ) from the same forward, so θ̃ = θ and the modes agree.
  chex.assert_trees_all_close(results["exact"][0], results["first_order"][0],
                              rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(results["exact"][1]["semimeta/label_change"],
                             results["first_order"][1]["semimeta/label_change"],
                             rtol=1e-4)


def test_cifar10_config_matches_the_paper():
  from configs import semimeta_cifar10_4k  # pylint: disable=g-import-not-at-top
  from r2d2_jax import optim  # pylint: disable=g-import-not-at-top
  c = semimeta_cifar10_4k.get_config()
  assert (c.method, c.model.name, c.data.dataset) == ("semimeta", "cnn13",
                                                      "cifar10")
  assert c.data.num_labels == 4000
  assert c.data.batch_size == 128 and c.data.batch_size * c.data.uratio == 128
  o = c.optimizer
  assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == (
      "sgd", 0.1, 0.9, False, 1e-4)
  assert c.total_steps == 400_000
  sched = optim.make_schedule(o.lr, o.schedule, c.total_steps)
  lrs = [float(sched(s)) for s in (1999, 3999, 299_999, 300_000, 349_999,
                                   350_000, 399_999)]
  np.testing.assert_allclose(lrs, [0.05, 0.1, 0.1, 0.01, 0.01, 0.001, 0.001],
                             rtol=1e-5)
  s = c.semimeta
  assert (s.weight, s.ramp_steps, s.mixup_alpha) == (1.0, 4000, 1.0)
  assert (s.label_lr, s.inner_lr) == (1.0, None)  # the reference's label step


def _semimeta_config(mode="first_order"):
  c = helpers.tiny_config("semimeta", **{"data.uratio": 1,
                                         "data.batch_size": 16})
  c.semimeta = semimeta.default_block()
  c.semimeta.update(mode=mode, ramp_steps=2)
  return c


def test_sharded_step_equals_single_device_without_recompiling(tmp_path):
  assert methods.get_method("semimeta") is semimeta.METHOD
  results = []
  for name, n_dev in (("four", 4), ("one", 1)):
    devices = jax.devices()[:n_dev]
    stage = train.Stage(_semimeta_config("exact"), str(tmp_path / name),
                        mesh=sharding.make_mesh(devices))
    state = stage.init_state()
    batches = stage.pipeline.iterate(0, stage.streams)
    ms = []
    for _ in range(3):
      state, m = stage.train_step(state, next(batches))
      ms.append(jax.device_get(m))
    # One compilation for all three steps.
    assert stage.train_step._cache_size() == 1  # pylint: disable=protected-access
    results.append((jax.device_get(state.params),
                    jax.device_get(state.model_state), ms))
  (p4, s4, m4), (p1, s1, m1) = results
  chex.assert_trees_all_close(p4, p1, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(s4, s1, rtol=1e-5, atol=1e-6)
  for a, b in zip(m4, m1):
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=1e-6)
  # The consistency weight ramps 0, 1/2, 1 over ramp_steps = 2.
  np.testing.assert_allclose([m["monitors/consistency_weight"] for m in m4],
                             [0.0, 0.5, 1.0])
  for m in m4:
    assert float(m["semimeta/label_change"]) > 0
    assert 0 <= float(m["pseudo_labels/accuracy"]) <= 1
    assert m["monitors/pseudo_label_accuracy"] == m["pseudo_labels/accuracy"]
    assert m["losses/xeu"] == m["losses/consistency"]
    for k in ("losses/xe", "losses/consistency", "losses/total", "lr",
              "l2_grads", "l2_params", "l2_updates"):
      assert np.isfinite(m[k]), k


# ---------------------------------------------------------------------------
# Hyperparameters: config.semimeta, parsed once


FIELDS = ("mode", "inner_lr", "label_lr", "mixup_alpha", "weight",
          "ramp_steps", "meta_bn")


def test_hparams_defaults_are_the_reference_block():
  c = _semimeta_config()
  c.semimeta = semimeta.default_block()
  hp = semimeta.hparams(c)
  assert hp == semimeta.SemiMetaHparams()
  assert (hp.mode, hp.inner_lr, hp.label_lr, hp.mixup_alpha, hp.weight,
          hp.ramp_steps, hp.meta_bn) == ("first_order", None, 1.0, 1.0, 1.0,
                                         4000, "eval")
  # No block, or a partial one: the defaults fill in.
  del c.semimeta
  assert semimeta.hparams(c) == hp
  c.semimeta = ml_collections.ConfigDict(dict(mode="exact", inner_lr=0.5))
  assert semimeta.hparams(c) == semimeta.SemiMetaHparams(mode="exact",
                                                         inner_lr=0.5)
  # inner_lr is a float field of the block holding None: a config may set a
  # number (cast to float), not a string.
  c.semimeta = semimeta.default_block()
  c.semimeta.inner_lr = 1
  inner_lr = semimeta.hparams(c).inner_lr
  assert inner_lr == 1.0 and isinstance(inner_lr, float)
  with pytest.raises(TypeError, match="inner_lr"):
    c.semimeta.inner_lr = "fast"


def test_unknown_key_is_an_error_naming_it_and_the_fields():
  c = _semimeta_config()
  c.semimeta.beta = 1.0
  with pytest.raises(R2D2Error,
                     match="config.semimeta: unknown key.* beta") as e:
    semimeta.hparams(c)
  for field in FIELDS:
    assert field in str(e.value), (field, str(e.value))


@pytest.mark.parametrize("key,value,message", [
    ("label_lr", -1.0, r"label_lr=-1.0 is outside \[0.0, inf\]"),
    ("inner_lr", -0.1, r"inner_lr=-0.1 is outside \[0.0, inf\]"),
    ("mixup_alpha", -1.0, r"mixup_alpha=-1.0 is outside"),
    ("weight", -1.0, r"weight=-1.0 is outside"),
    ("ramp_steps", -1, r"ramp_steps=-1 is outside"),
    ("ramp_steps", 2.5, r"ramp_steps=2.5 must be an integer"),
    ("mode", "second_order", "mode='second_order'; choose one of 'exact', "
                             "'first_order'"),
    ("meta_bn", "frozen", "meta_bn='frozen'; choose one of 'eval', 'train'"),
])
def test_bad_value_is_an_error_naming_the_field(key, value, message):
  c = _semimeta_config()
  # A fresh block: ConfigDict would refuse a value of another type.
  c.semimeta = ml_collections.ConfigDict({**c.semimeta.to_dict(), key: value})
  with pytest.raises(R2D2Error, match=message):
    semimeta.hparams(c)


@pytest.mark.parametrize("uratio", [0, None])
def test_no_unlabeled_data_is_an_error(uratio):
  c = _semimeta_config()
  c.data.uratio = uratio
  with pytest.raises(R2D2Error, match="uratio >= 1"):
    semimeta.hparams(c)
