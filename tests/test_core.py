"""The method core: typed hyperparameters, binding by name, the registry, the shared step."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from r2d2_jax import methods
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import base
from r2d2_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class Hp:
  threshold: float
  views: tuple = ("weak",)
  ramp_steps: int = 0

  def __post_init__(self):
    base.check_range("threshold", self.threshold, 0.0, 1.0, lo_open=True)
    base.check_range("ramp_steps", self.ramp_steps, 0, integer=True)


def test_parse_block_builds_the_dataclass():
  hp = base.parse_block(Hp, {"threshold": 0.9, "views": ["weak", "strong"]},
                        "config.x")
  assert hp == Hp(0.9, ("weak", "strong"), 0)  # lists become tuples
  with pytest.raises(dataclasses.FrozenInstanceError):
    hp.threshold = 0.5  # type: ignore


@pytest.mark.parametrize("block,match", [
    ({"threshold": 0.9, "treshold": 1}, r"config\.x: unknown key\(s\) "
     r"treshold\. Hp has: threshold \(required\), views=\('weak',\), "
     r"ramp_steps=0"),
    ({}, r"config\.x: missing key\(s\) threshold"),
    ({"threshold": 0.0}, r"config\.x: threshold=0\.0 is outside \(0\.0, 1\.0\]"),
    ({"threshold": 1.5}, r"threshold=1\.5 is outside \(0\.0, 1\.0\]"),
    ({"threshold": 0.5, "ramp_steps": 2.5}, r"ramp_steps=2\.5 must be an "
     r"integer in \[0, inf\]"),
    ({"threshold": "high"}, r"threshold='high' must be a number"),
])
def test_parse_block_errors_name_the_field(block, match):
  with pytest.raises(R2D2Error, match=match):
    base.parse_block(Hp, block, "config.x")


def test_parse_block_extra_fields_and_none():
  hp = base.parse_block(Hp, None, "config.x", threshold=0.5, ramp_steps=None)
  assert hp == Hp(0.5)


def test_check_choice():
  with pytest.raises(ValueError, match=r"mode='b'; choose one of 'a', 'c'"):
    base.check_choice("mode", "b", ("a", "c"))


def test_bind_passes_only_what_the_signature_names():
  def step(state, batch, rng, *, net, hp):
    return state, batch, rng, net, hp

  bound = base.bind(step, net="N", task="T", hp="H")
  assert bound(1, 2, 3) == (1, 2, 3, "N", "H")

  def plain(state, batch, rng):
    return state + batch + rng
  assert base.bind(plain, net="N", task="T", hp="H")(1, 2, 3) == 6

  def wants_more(state, *, mesh):
    return state
  with pytest.raises(TypeError, match=r"names keyword argument\(s\) \['mesh'\]"):
    base.bind(wants_more, net="N", task="T", hp="H")


def test_every_module_registers_its_methods():
  # Each file of r2d2_jax/methods is a method module, imported with the package.
  for name in ("supervised", "uda", "r2d2", "r2d2_finetune", "mpl",
               "mpl_finetune", "semimeta"):
    assert methods.get_method(name).name == name
  with pytest.raises(R2D2Error, match="Unknown method 'nope'. Valid methods: "):
    methods.get_method("nope")
  m = methods.get_method("supervised")
  with pytest.raises(ValueError, match="Two methods are called 'supervised'"):
    base.register(dataclasses.replace(m))


class DenseBN(nn.Module):
  """Dense → BatchNorm(momentum 0.5) → Dense; rng streams: none."""
  rng_names = ()

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dense(3, name="hidden")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5,
                     name="norm")(x)
    return nn.Dense(2, name="head")(x)


def test_one_network_step_is_one_forward_over_the_concatenation():
  """Split order, one BN batch (mean over every input), SGD, EMA, metrics."""
  jax.config.update("jax_enable_x64", True)
  try:
    model = DenseBN()
    net = base.Network(model=model, tx=optax.sgd(0.1),
                       schedule=lambda step: jnp.float64(0.1),
                       image_shape=(4,), ema_decay=0.9)
    state = net.init_train_state(jax.random.key(0))
    state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64)
                         if jnp.issubdtype(x.dtype, jnp.floating) else x,
                         state)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(3, 4)))
    b = jnp.asarray(rng.normal(size=(5, 4)) + 2.0)
    labels = jnp.asarray([0, 1, 1])
    seen = {}

    def loss_fn(logits, params):
      seen["shapes"] = [z.shape for z in logits]
      del params
      return jnp.sum(logits[0][:, 0]) - jnp.sum(logits[1][:, 1]), {
          "aux": jnp.float64(7.0)}

    new, metrics = jax.jit(lambda s: base.one_network_step(
        s, [a, b], loss_fn, jax.random.key(1), net, labels=labels))(state)
    assert seen["shapes"] == [(3, 2), (5, 2)]

    # Independent: the same loss on the concatenated forward, by hand.
    x = jnp.concatenate([a, b])

    def by_hand(params):
      logits, ms = model.apply({"params": params, **state.model_state}, x,
                               train=True, mutable=["batch_stats"])
      return jnp.sum(logits[:3, 0]) - jnp.sum(logits[3:, 1]), ms

    (loss, ms), grads = jax.value_and_grad(by_hand, has_aux=True)(
        state.params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, grads)
    # (atol: a bias whose gradient is 0 in exact arithmetic moves by ~1e-17.)
    chex.assert_trees_all_close(new.params, params, rtol=1e-12, atol=1e-15)
    chex.assert_trees_all_close(new.model_state, dict(ms), rtol=1e-12)
    # BN's running mean moved halfway to the mean over ALL 8 rows.
    h = x @ state.params["hidden"]["kernel"] + state.params["hidden"]["bias"]
    np.testing.assert_allclose(
        new.model_state["batch_stats"]["norm"]["mean"],
        0.5 * state.model_state["batch_stats"]["norm"]["mean"] +
        0.5 * np.mean(h, 0), rtol=1e-12)
    chex.assert_trees_all_close(
        new.ema_params,
        jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, state.ema_params, params),
        rtol=1e-12, atol=1e-15)
    assert int(new.step) == 1
    np.testing.assert_allclose(metrics["losses/total"], loss, rtol=1e-12)
    np.testing.assert_allclose(metrics["aux"], 7.0)
    flat = lambda t: np.concatenate([np.ravel(l) for l in jax.tree.leaves(t)])
    np.testing.assert_allclose(metrics["l2_grads"],
                               np.linalg.norm(flat(grads)), rtol=1e-12)
    np.testing.assert_allclose(metrics["l2_params"],
                               np.linalg.norm(flat(state.params)), rtol=1e-12)
    np.testing.assert_allclose(
        metrics["l2_updates"],
        np.linalg.norm(flat(params) - flat(state.params)), rtol=1e-12)
    logits_a = model.apply(
        {"params": state.params, **state.model_state}, x, train=True,
        mutable=["batch_stats"])[0][:3]
    np.testing.assert_allclose(
        metrics["accuracy/train"],
        np.mean(np.argmax(logits_a, -1) == np.asarray(labels)))
  finally:
    jax.config.update("jax_enable_x64", False)


def test_pseudo_label_monitors():
  probs = jnp.asarray([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
  true = jnp.asarray([0, 0, 0, 1])
  out = base.pseudo_label_monitors(probs, true, jnp.asarray([1., 1., 0., 0.]))
  np.testing.assert_allclose(out["monitors/mask"], 0.5)
  np.testing.assert_allclose(out["monitors/pseudo_label_accuracy"], 0.75)
  np.testing.assert_allclose(out["monitors/pseudo_label_accuracy_masked"], 0.5)
  hard = base.pseudo_label_monitors(jnp.asarray([0, 1, 0, 1]), true)
  np.testing.assert_allclose(hard["monitors/mask"], 1.0)
  np.testing.assert_allclose(hard["monitors/pseudo_label_accuracy"], 0.75)


def test_the_train_state_is_what_init_state_makes():
  state = base.default_init_state(
      jax.random.key(0), net=base.Network(
          model=DenseBN(), tx=optax.sgd(0.1), schedule=lambda s: 0.1,
          image_shape=(4,)))
  assert isinstance(state, TrainState)
  assert set(state.model_state) == {"batch_stats"}
