"""VAT: virtual adversarial training, optionally + EntMin (docs/algorithms.md, "VAT").

  L = CE(y_l, f(x_l)) + w(t) · KL(p̂(x_u) ‖ p(x_u + r_adv)) + β · H(p(x_u))
  r_adv = ε · n(g_K),  g_k = ∇_r KL(p̂(x_u) ‖ p(x_u + r)) at r = ξ · n(g_{k−1}),
  g_0 ~ N(0, I);  p̂ = stop_gradient(p);  w(t) = weight · min(1, t / ramp_steps),

with n(·) the per-example normalisation of the reference, takerum/vat_tf
`vat.py` `get_normalized_vector` (d / (1e-12 + max|d|), then / sqrt(1e-6 + Σ d²)),
K = `num_iters` power iterations and r_adv held constant (no gradient through
its search). As in vat_tf `train_semisup.py`, the labeled batch has its own
train-mode forward, the only one that updates the BatchNorm running statistics;
the unlabeled forwards (clean, x_u + ξd, x_u + r_adv) are train-mode too (each
normalised by its own batch statistics) but leave the running statistics alone
(`update_batch_stats=False`), and share one dropout / noise draw (the
reference's random ops reuse their seeds in every forward of a step). The
entropy term (β = `entmin_weight`; 1 in vat_tf's `vatent`) reads the clean
unlabeled forward, with its gradient.

Config block (`config.vat`, parsed into `VatHparams`): epsilon, xi, num_iters,
weight, ramp_steps, entmin_weight; the top-level `label_smoothing`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import (Method, Network, check_range,
                                   check_uratio, one_network_step, parse_block,
                                   pseudo_label_monitors, register)
from r2d2_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class VatHparams:
  """The `config.vat` block (docs/algorithms.md, "VAT").

  Attributes:
    epsilon: ε, the L2 norm of r_adv per example (in normalised input units), > 0.
    xi: ξ, the finite-difference length of the power iteration, > 0.
    num_iters: K, power iterations, ≥ 1.
    weight: the VAT loss's weight, ≥ 0.
    ramp_steps: the weight ramps linearly from 0 over this many steps (0: none).
    entmin_weight: β of the entropy of p(x_u) (0: plain VAT), ≥ 0.
    label_smoothing: of the labeled cross-entropy, in [0, 1).
  """
  epsilon: float
  xi: float = 1e-6
  num_iters: int = 1
  weight: float = 1.0
  ramp_steps: int = 0
  entmin_weight: float = 0.0
  label_smoothing: float = 0.0

  def __post_init__(self):
    check_range("epsilon", self.epsilon, 0.0, lo_open=True)
    check_range("xi", self.xi, 0.0, lo_open=True)
    check_range("num_iters", self.num_iters, 1, integer=True)
    check_range("weight", self.weight, 0.0)
    check_range("ramp_steps", self.ramp_steps, 0, integer=True)
    check_range("entmin_weight", self.entmin_weight, 0.0)
    check_range("label_smoothing", self.label_smoothing, 0.0, 1.0,
                hi_open=True)

  def weight_at(self, step: jax.Array) -> jax.Array:
    """w(t): `weight` ramped linearly from 0 over `ramp_steps`."""
    return self.weight * meta.linear_ramp(step, self.ramp_steps)


def hparams(config) -> VatHparams:
  """`config.vat` as `VatHparams`; VAT needs an unlabeled batch (data.uratio > 0)."""
  if config.get("vat") is None:
    raise R2D2Error("config.vat is missing; it needs at least epsilon "
                    "(configs/vat_digits.py).")
  check_uratio(config, "VAT")
  return parse_block(VatHparams, config.vat, "config.vat",
                     label_smoothing=config.get("label_smoothing"))


# ---------------------------------------------------------------------------
# The perturbation


def normalize(d: jax.Array) -> jax.Array:
  """Per-example unit L2 norm over all but the batch axis, as vat_tf does it.

  Dividing by the largest |d_i| first keeps the tiny gradients of the power
  iteration (of order ξ) out of underflow.
  """
  axes = tuple(range(1, d.ndim))
  d = d / (1e-12 + jnp.max(jnp.abs(d), axis=axes, keepdims=True))
  return d / jnp.sqrt(1e-6 + jnp.sum(d * d, axis=axes, keepdims=True))


def random_direction(key: jax.Array, x: jax.Array) -> jax.Array:
  """The power iteration's start g_0 ~ N(0, I), shaped like x (a pure function of key)."""
  return jax.random.normal(key, x.shape, x.dtype)


def adversarial_perturbation(logits_fn: Callable[[jax.Array], jax.Array],
                             x: jax.Array, logits: jax.Array, key: jax.Array,
                             *, epsilon: float, xi: float, num_iters: int
                             ) -> jax.Array:
  """r_adv = ε · n(g_K) by `num_iters` power iterations on the KL's Hessian.

  Args:
    logits_fn: x -> logits, the network's forward on perturbed inputs.
    x: [B, ...] the unlabeled inputs.
    logits: [B, C] logits of the clean x (the target; no gradient).
    key: draws g_0 (`random_direction`).
    epsilon, xi, num_iters: ε, ξ, K.

  Returns:
    r_adv shaped like x, held constant (stop_gradient).
  """
  target = jax.lax.stop_gradient(logits)
  kl = lambda r: losses.kl_divergence(target, logits_fn(x + r))
  d = random_direction(key, x)
  for _ in range(num_iters):
    d = jax.lax.stop_gradient(jax.grad(kl)(xi * normalize(d)))
  return epsilon * normalize(d)


# ---------------------------------------------------------------------------
# The method


def views(hp) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak",), "unlabeled": ("weak",)}


def step_keys(rng: jax.Array) -> dict[str, jax.Array]:
  """The step's random streams (named: tests reproduce them)."""
  names = ("labeled", "unlabeled", "direction")
  return {n: jax.random.fold_in(rng, i) for i, n in enumerate(names)}


def train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
               hp: VatHparams):
  """One optimizer step on CE + w(t)·VAT (+ β·entropy).

  Args:
    state: the network.
    batch: 'labeled' {'weak', 'label'}, 'unlabeled' {'weak', 'label' (hidden)}.
    rng: this step's key.
    net: the network.
    hp: `config.vat`.

  Returns:
    (new state, metrics: losses/xe, losses/xeu (the VAT loss), losses/entmin,
    monitors/weight, monitors/r_adv_norm, the targets' pseudo-label monitors
    and `one_network_step`'s).
  """
  lab, unl = batch["labeled"], batch["unlabeled"]
  keys = step_keys(rng)
  weight = hp.weight_at(state.step)
  x_u = unl["weak"]

  def loss_fn(logits, params):
    # Train mode, this batch's statistics; the updated running statistics are
    # dropped. One key: the same dropout / noise in every unlabeled forward.
    forward = lambda x: net.apply_train(
        {"params": params, **state.model_state}, x, keys["unlabeled"])[0]
    logits_u = forward(x_u)
    r_adv = adversarial_perturbation(forward, x_u, logits_u, keys["direction"],
                                     epsilon=hp.epsilon, xi=hp.xi,
                                     num_iters=hp.num_iters)
    vat = losses.kl_divergence(jax.lax.stop_gradient(logits_u),
                               forward(x_u + r_adv))
    xe = losses.cross_entropy(logits[0], lab["label"],
                              label_smoothing=hp.label_smoothing)
    total = xe + weight * vat
    if hp.entmin_weight > 0:
      ent = losses.entropy(logits_u)
      total = total + hp.entmin_weight * ent
    else:  # logged only: no backward pass through the clean forward (β = 0)
      ent = losses.entropy(jax.lax.stop_gradient(logits_u))
    aux = {"losses/xe": xe, "losses/xeu": vat, "losses/entmin": ent,
           "monitors/r_adv_norm": jnp.mean(jnp.sqrt(jnp.sum(
               jnp.reshape(r_adv, (r_adv.shape[0], -1)) ** 2, -1)))}
    aux.update(pseudo_label_monitors(jax.lax.stop_gradient(logits_u),
                                     unl["label"]))
    return total, aux

  # Only the labeled batch goes through the shared forward: its statistics are
  # the ones the running averages see (vat_tf's `update_batch_stats=True`).
  state, metrics = one_network_step(state, [lab["weak"]], loss_fn,
                                    keys["labeled"], net, labels=lab["label"])
  metrics["monitors/weight"] = weight
  return state, metrics


METHOD = register(Method(name="vat", hparams=hparams, views=views,
                         train_step=train_step))
