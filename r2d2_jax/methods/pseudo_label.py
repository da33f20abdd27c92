"""Pseudo-Label (Lee 2013; docs/algorithms.md, "Pseudo-Label"), one network.

  z_u = f(weak x_u)                        (train mode: dropout on)
  m_i = [max_c softmax(z_u_i) ≥ threshold] (threshold 0: every row, as Lee)
  L = CE(y_l, f(weak x_l)) + α(t) · (1/μB) Σ_i m_i · CE(argmax z_u_i, z_u_i)
  α(t) = 0 for t ≤ T1, α_f (t − T1)/(T2 − T1) between, α_f for t ≥ T2.

The pseudo-label is the argmax of the very logits the loss differentiates
(no gradient flows through the argmax; the gradient through z_u pushes the
prediction towards its own argmax, an entropy minimisation). Lee's schedule
(T1 = 100, T2 = 600 epochs, α_f = 3) covers the later codes' linear warm-up:
T1 = 0, T2 = 0.4 · total steps, α_f = 1 with threshold 0.95 is USB's
`pseudolabel` (`unsup_warm_up` 0.4, `p_cutoff` with `>=`) and, but for `>`
against `>=`, google-research/fixmatch `pseudo_label.py` (`warmup_pos` 0.4).

BatchNorm as both references: two train-mode forward passes; the labeled one
updates the running statistics, the unlabeled one normalises with its own
batch statistics and its running-statistic update is discarded (fixmatch:
`post_ops` taken after the labeled call; USB: `bn_controller.freeze_bn`
around the unlabeled call).

Config block (`config.pseudo_label`, parsed into `PseudoLabelHparams`):
weight, ramp_start_steps, ramp_end_steps, threshold; the labeled CE's label
smoothing is the top-level `config.label_smoothing`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax import losses
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import (Method, Network, check_range,
                                   check_uratio, one_network_step, parse_block,
                                   pseudo_label_monitors, register)
from r2d2_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class PseudoLabelHparams:
  """The `config.pseudo_label` block (and the top-level `label_smoothing`).

  Attributes:
    weight: α_f, the unlabeled weight after the ramp, ≥ 0 (Lee: 3).
    ramp_start_steps: T1, α = 0 until this step, ≥ 0.
    ramp_end_steps: T2 ≥ T1, α = α_f from this step (T1 = T2: a step).
    threshold: confidence a pseudo-label needs, in [0, 1] (0: none, Lee).
    label_smoothing: of the labeled CE, in [0, 1).
  """
  weight: float = 3.0
  ramp_start_steps: int = 0
  ramp_end_steps: int = 0
  threshold: float = 0.0
  label_smoothing: float = 0.0

  def __post_init__(self):
    check_range("weight", self.weight, 0.0)
    check_range("ramp_start_steps", self.ramp_start_steps, 0, integer=True)
    check_range("ramp_end_steps", self.ramp_end_steps, 0, integer=True)
    if self.ramp_end_steps < self.ramp_start_steps:
      raise ValueError(
          f"ramp_end_steps={self.ramp_end_steps} is before ramp_start_steps="
          f"{self.ramp_start_steps}; T1 ≤ T2 is required.")
    check_range("threshold", self.threshold, 0.0, 1.0)
    check_range("label_smoothing", self.label_smoothing, 0.0, 1.0,
                hi_open=True)

  def weight_at(self, step: jax.Array) -> jax.Array:
    """α(t): 0 until T1, linear to α_f at T2, α_f after."""
    t = jnp.asarray(step, float)
    t1, t2 = self.ramp_start_steps, self.ramp_end_steps
    if t2 == t1:
      ramp = (t >= t1).astype(t.dtype)
    else:
      ramp = jnp.clip((t - t1) / (t2 - t1), 0.0, 1.0)
    return self.weight * ramp


def default_block() -> ml_collections.ConfigDict:
  """Lee's α_f = 3, no threshold; the ramp steps are the config's to set."""
  block = dataclasses.asdict(PseudoLabelHparams())
  del block["label_smoothing"]  # the top-level config.label_smoothing
  return ml_collections.ConfigDict(block)


def hparams(config) -> PseudoLabelHparams:
  """`config.pseudo_label` as `PseudoLabelHparams` (errors name the field)."""
  check_uratio(config, "pseudo_label")
  block = config.get("pseudo_label")
  if block is None:
    raise R2D2Error("config.pseudo_label is missing; defaults: "
                    "r2d2_jax.methods.pseudo_label.default_block().")
  if "label_smoothing" in block:
    raise R2D2Error("config.pseudo_label.label_smoothing: set the top-level "
                    "config.label_smoothing instead.")
  return parse_block(PseudoLabelHparams, block, "config.pseudo_label",
                     label_smoothing=config.get("label_smoothing"))


def views(hp) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak",), "unlabeled": ("weak",)}


def train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
               hp: PseudoLabelHparams):
  """One step on the Pseudo-Label objective.

  Args:
    state: the network.
    batch: 'labeled' {'weak', 'label'}, 'unlabeled' {'weak', 'label' (hidden:
      diagnostics only)}.
    rng: this step's key (dropout).
    net: the network.
    hp: `config.pseudo_label`.

  Returns:
    (new state, metrics: losses/xe, losses/xeu, monitors/mask,
    monitors/pseudo_label_accuracy[_masked], monitors/weight, ...).
  """
  lab, unl = batch["labeled"], batch["unlabeled"]
  weight = hp.weight_at(state.step)

  def loss_fn(logits, params):
    # The unlabeled pass: batch statistics, running statistics not kept.
    z_u, _ = net.apply_train({"params": params, **state.model_state},
                             unl["weak"], jax.random.fold_in(rng, 1))
    xe = losses.cross_entropy(logits[0], lab["label"],
                              label_smoothing=hp.label_smoothing)
    probs = jax.nn.softmax(jax.lax.stop_gradient(z_u))
    mask = (jnp.max(probs, -1) >= hp.threshold).astype(z_u.dtype)
    xeu = losses.cross_entropy(z_u, jnp.argmax(probs, -1), mask)
    aux = {"losses/xe": xe, "losses/xeu": xeu}
    aux.update(pseudo_label_monitors(probs, unl["label"], mask))
    return xe + weight * xeu, aux

  state, metrics = one_network_step(state, [lab["weak"]], loss_fn, rng, net,
                                    labels=lab["label"])
  metrics["monitors/weight"] = weight
  return state, metrics


METHOD = register(Method(name="pseudo_label", hparams=hparams, views=views,
                         train_step=train_step))
