"""Π-model and Temporal Ensembling (Laine & Aila 2017; docs/algorithms.md, "Π-model and Temporal Ensembling").

  L = CE(y_l, f(weak x_l)) + w(t) · mean_i m_i · mean_c (p_i − target_i)²_c,
  p_i = softmax(f(weak x_i)) over the labeled and unlabeled rows,
  w(t) = weight · exp(−5 (1 − min(t, T) / T)²)   (T = ramp_steps; 1 if T = 0).

'pi_model': target_i = softmax(f(weak_1 x_i)), a second stochastic pass of an
independently augmented view, the gradient through both passes (s-laine/tempens
`train.py`: `squared_error(train_prediction, train_prediction_b)`); m_i = 1.

'temporal_ensembling': target_i = Z_i / (1 − α^{n_i}) from a per-example table
Z of past predictions (sharded along rows like R2-D2's table), n_i the updates
row i has had, m_i = [n_i > 0]. After the step each row of the batch is updated
once with the step's own (trained, stop-gradient) prediction, the mean of its
occurrences: Z_i ← α Z_i + (1 − α) p_i, n_i ← n_i + 1. The reference updates
the whole table once per epoch (`prediction_decay` α = 0.6); here every visit
is an update, the natural unit of a step-indexed stream.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax import table as table_lib
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import (Method, Network, Task, check_range,
                                   one_network_step, parse_block,
                                   pseudo_label_monitors, register,
                                   replicate_all)
from r2d2_jax.state import TrainState

sigmoid_rampup = meta.sigmoid_rampup  # Laine & Aila; Mean Teacher uses it too


def softmax_mse(logits: jax.Array, targets: jax.Array,
                mask: jax.Array | None = None) -> jax.Array:
  """mean_i m_i · mean_c (softmax(logits_i) − targets_i)²_c (masked rows count 0)."""
  per_row = jnp.mean((jax.nn.softmax(logits) - targets) ** 2, -1)
  return jnp.mean(per_row if mask is None else per_row * mask)


@dataclasses.dataclass(frozen=True)
class PiHparams:
  """`config.pi_model` (docs/algorithms.md, "Π-model and Temporal Ensembling").

  Attributes:
    weight: w_max, the consistency weight after the ramp-up, ≥ 0.
    ramp_steps: steps of the sigmoid ramp-up of the weight, ≥ 0 (0: none).
  """
  weight: float
  ramp_steps: int = 0

  def __post_init__(self):
    check_range("weight", self.weight, 0.0)
    check_range("ramp_steps", self.ramp_steps, 0, integer=True)

  def weight_at(self, step: jax.Array) -> jax.Array:
    return self.weight * sigmoid_rampup(step, self.ramp_steps)


@dataclasses.dataclass(frozen=True)
class TemporalEnsemblingHparams(PiHparams):
  """`config.temporal_ensembling`: PiHparams' fields and `decay`, α in [0, 1)."""
  decay: float = 0.6

  def __post_init__(self):
    super().__post_init__()
    check_range("decay", self.decay, 0.0, 1.0, hi_open=True)


def _parse(cls, name: str):
  def hparams(config):
    if config.get(name) is None:
      raise R2D2Error(f"config.{name} is missing; it needs at least `weight` "
                      f"(see configs/{name}_digits.py).")
    return parse_block(cls, config[name], f"config.{name}")
  return hparams


# ---------------------------------------------------------------------------
# Π-model


def two_views(hp) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak", "weak_1"), "unlabeled": ("weak", "weak_1")}


def pi_train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
                  hp: PiHparams):
  """One step on CE + w(t)·MSE(softmax f(a), softmax f(b)); a, b in one forward."""
  lab, unl = batch["labeled"], batch["unlabeled"]
  weight = hp.weight_at(state.step)

  def loss_fn(logits, params):
    del params
    za_l, za_u, zb_l, zb_u = logits
    xe = losses.cross_entropy(za_l, lab["label"])
    # No stop-gradient: the original Π-model trains both passes.
    cons = softmax_mse(jnp.concatenate([za_l, za_u]),
                       jax.nn.softmax(jnp.concatenate([zb_l, zb_u])))
    aux = {"losses/xe": xe, "losses/xeu": cons}
    aux.update(pseudo_label_monitors(jax.lax.stop_gradient(zb_u),
                                     unl["label"]))
    return xe + weight * cons, aux

  state, metrics = one_network_step(
      state, [lab["weak"], unl["weak"], lab["weak_1"], unl["weak_1"]], loss_fn,
      rng, net, labels=lab["label"])
  metrics["monitors/weight"] = weight
  return state, metrics


PI_MODEL = register(Method(name="pi_model", hparams=_parse(PiHparams, "pi_model"),
                           views=two_views, train_step=pi_train_step))


# ---------------------------------------------------------------------------
# Temporal Ensembling


class TemporalEnsemblingState(TrainState):
  """A `TrainState` with the ensemble table.

  Attributes:
    ensemble: [N_pad, C] Z, the EMA of each train row's predictions (rows past
      the train split are padding), sharded along rows.
    visits: [N_pad] int32 n, how many updates each row of Z has had.
  """
  ensemble: jax.Array
  visits: jax.Array


def te_init_state(rng: jax.Array, *, net: Network,
                  task: Task) -> TemporalEnsemblingState:
  """The network as usual; Z = 0 and n = 0 for every row."""
  base = net.init_train_state(rng)
  rows = table_lib.padded_rows(task.num_train, task.mesh)
  return TemporalEnsemblingState.extending(
      base, ensemble=jnp.zeros((rows, task.num_classes), jnp.float32),
      visits=jnp.zeros((rows,), jnp.int32))


def te_state_sharding(abstract_state: TemporalEnsemblingState, mesh):
  """Network replicated; Z and n sharded along rows."""
  return replicate_all(abstract_state, mesh).replace(
      ensemble=table_lib.table_sharding(mesh),
      visits=NamedSharding(mesh, table_lib.ROW_SPEC))


def one_view(hp) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak",), "unlabeled": ("weak",)}


def bias_corrected(z: jax.Array, n: jax.Array, decay: float
                   ) -> tuple[jax.Array, jax.Array]:
  """(Z / (1 − α^n), [n > 0]): the targets of gathered rows and which exist."""
  visited = n > 0
  corr = jnp.where(visited, 1.0 - decay ** n.astype(z.dtype), 1.0)
  return jnp.where(visited[:, None], z / corr[:, None], 0.0), visited


def te_train_step(state: TemporalEnsemblingState, batch, rng: jax.Array, *,
                  net: Network, task: Task, hp: TemporalEnsemblingHparams):
  """One step on CE + w(t)·MSE(softmax(f(x)), Z/(1 − α^n)); then Z, n of the batch."""
  lab, unl = batch["labeled"], batch["unlabeled"]
  n_l, mesh = lab["weak"].shape[0], task.mesh
  idx = jnp.concatenate([lab["index"], unl["index"]])
  z_old = table_lib.gather_rows(state.ensemble, idx, mesh)
  n_old = table_lib.gather_rows(state.visits, idx, mesh)
  targets, visited = bias_corrected(z_old, n_old, hp.decay)
  mask = visited.astype(z_old.dtype)
  weight = hp.weight_at(state.step)

  def loss_fn(logits, params):
    del params
    z_l, z_u = logits
    xe = losses.cross_entropy(z_l, lab["label"])
    z = jnp.concatenate([z_l, z_u])
    cons = softmax_mse(z, targets.astype(z.dtype), mask)
    aux = {"losses/xe": xe, "losses/xeu": cons,
           "predictions": jax.lax.stop_gradient(jax.nn.softmax(z))}
    aux.update(pseudo_label_monitors(targets[n_l:], unl["label"], mask[n_l:]))
    return xe + weight * cons, aux

  new, metrics = one_network_step(state, [lab["weak"], unl["weak"]], loss_fn,
                                  rng, net, labels=lab["label"])
  p = metrics.pop("predictions").astype(z_old.dtype)
  # A row met k times in this batch is updated once, with its k predictions' mean.
  same = idx[:, None] == idx[None, :]
  p_mean = (same.astype(p.dtype) @ p) / jnp.sum(same, 1, keepdims=True)
  first = ~jnp.any(jnp.tril(same, -1), axis=1)
  z_new = hp.decay * z_old + (1.0 - hp.decay) * p_mean
  ensemble = table_lib.set_rows(state.ensemble, idx, z_new, first, mesh)
  visits = table_lib.set_rows(state.visits[:, None], idx, (n_old + 1)[:, None],
                              first, mesh)[:, 0]
  metrics["monitors/weight"] = weight
  metrics["monitors/visited"] = jnp.mean(mask)
  return new.replace(ensemble=ensemble, visits=visits), metrics


TEMPORAL_ENSEMBLING = register(Method(
    name="temporal_ensembling",
    hparams=_parse(TemporalEnsemblingHparams, "temporal_ensembling"),
    views=one_view, init_state=te_init_state, train_step=te_train_step,
    state_sharding=te_state_sharding))
