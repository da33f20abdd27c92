"""UDA: Unsupervised Data Augmentation (docs/algorithms.md, "UDA"), one network.

  L = CE(y_l, f(weak x_l))                                   (label smoothing)
    + w(t) · mean_i mask_i · CE(stop_grad(softmax(f(weak x_u_i) / τ)),
                                f(strong x_u_i))
  mask_i = [max softmax(f(weak x_u_i) / τ_mask) ≥ threshold],
  w(t)   = config.uda.weight · min(1, t / config.uda.ramp_steps).

`config.uda.mask_on` picks the softmax the mask thresholds: 'unsharpened'
(τ_mask = 1, the UDA paper's code: google-research/uda `image/main.py`,
`largest_prob = reduce_max(softmax(ori_logits))`) or 'sharpened' (τ_mask = τ,
the Meta Pseudo Labels code: google-research/google-research
`meta_pseudo_labels/training_utils.py`, `UDA.build_uda_cross_entropy` takes
`reduce_max(labels['u_ori'])` with `labels['u_ori'] = softmax(logits / uda_temp)`).
Missing key: 'unsharpened'. The paper configs set it (docs/algorithms.md, "UDA").

The mean is over every unlabeled row (masked rows count as zero), FixMatch's
convention. The same loss is the auxiliary loss of the Meta Pseudo Labels
teacher (`r2d2_jax.methods.mpl`), so it is exposed as the pure `uda_loss`.

Config block (`config.uda`, parsed into `UdaHparams`): weight, ramp_steps,
temperature, threshold, label_smoothing, mask_on.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import (Method, Network, check_choice, check_range,
                                   one_network_step, parse_block,
                                   pseudo_label_monitors, register)
from r2d2_jax.state import TrainState

MASK_ON = ("sharpened", "unsharpened")


@dataclasses.dataclass(frozen=True)
class UdaHparams:
  """The `config.uda` block (docs/algorithms.md, "UDA").

  Attributes:
    weight: λ of the consistency loss, ≥ 0.
    temperature: τ of the targets' sharpening, > 0.
    threshold: confidence threshold of the mask, in [0, 1].
    ramp_steps: the weight ramps linearly from 0 over this many steps (0: none).
    label_smoothing: on the labeled cross-entropy, in [0, 1).
    mask_on: 'unsharpened' (the UDA code) or 'sharpened' (the MPL code).
  """
  weight: float
  temperature: float
  threshold: float
  ramp_steps: int = 0
  label_smoothing: float = 0.0
  mask_on: str = "unsharpened"

  def __post_init__(self):
    check_range("weight", self.weight, 0.0)
    check_range("temperature", self.temperature, 0.0, lo_open=True)
    check_range("threshold", self.threshold, 0.0, 1.0)
    check_range("ramp_steps", self.ramp_steps, 0, integer=True)
    check_range("label_smoothing", self.label_smoothing, 0.0, 1.0,
                hi_open=True)
    check_choice("mask_on", self.mask_on, MASK_ON)

  def weight_at(self, step: jax.Array) -> jax.Array:
    """w(t): `weight` ramped linearly from 0 over `ramp_steps`."""
    return self.weight * meta.linear_ramp(step, self.ramp_steps)

  def loss_kwargs(self) -> dict:
    """The static keyword arguments of `uda_loss`."""
    return dict(temperature=self.temperature, threshold=self.threshold,
                label_smoothing=self.label_smoothing, mask_on=self.mask_on)


def parse_uda(config) -> UdaHparams:
  """`config.uda` as `UdaHparams` (an error names a bad or unknown field)."""
  if config.get("uda") is None:
    raise R2D2Error("config.uda is missing; it needs weight, temperature and "
                    "threshold (configs/common.py `uda_block`).")
  return parse_block(UdaHparams, config.uda, "config.uda")


def uda_loss(logits_l: jax.Array, labels: jax.Array, logits_weak: jax.Array,
             logits_strong: jax.Array, *, weight: jax.Array | float,
             temperature: float, threshold: float,
             label_smoothing: float = 0.0, mask_on: str = "unsharpened"
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The UDA objective from logits.

  Args:
    logits_l: [B_l, C] logits of the (weakly augmented) labeled batch.
    labels: [B_l] int labels.
    logits_weak: [B_u, C] logits of the weak unlabeled view (targets only: no
      gradient flows through them).
    logits_strong: [B_u, C] logits of the strong unlabeled view.
    weight: w(t), the consistency weight at this step.
    temperature: τ, sharpening of the targets.
    threshold: confidence threshold of the mask.
    label_smoothing: on the labeled CE.
    mask_on: 'unsharpened' (the mask reads softmax(logits_weak), the UDA code)
      or 'sharpened' (softmax(logits_weak / τ), the MPL code).

  Returns:
    (total loss, {'losses/xe', 'losses/xeu', 'mask'}): `mask` [B_u] is the
    per-row mask (callers log its mean as monitors/mask).
  """
  xe = losses.cross_entropy(logits_l, labels, label_smoothing=label_smoothing)
  if mask_on not in MASK_ON:
    raise R2D2Error(f"Unknown uda.mask_on {mask_on!r}. Valid values: "
                    f"{', '.join(MASK_ON)}.")
  logits_weak = jax.lax.stop_gradient(logits_weak)
  targets = jax.nn.softmax(logits_weak / temperature)
  confidence = targets if mask_on == "sharpened" else jax.nn.softmax(
      logits_weak)
  mask = (jnp.max(confidence, -1) >= threshold).astype(logits_strong.dtype)
  consistency = losses.soft_cross_entropy(logits_strong, targets, mask)
  total = xe + weight * consistency
  return total, {"losses/xe": xe, "losses/xeu": consistency, "mask": mask}


def views(hp) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak",), "unlabeled": ("weak", "strong")}


def train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
               hp: UdaHparams):
  """One optimizer step on the UDA objective.

  The labeled, weak and strong batches go through the network in one train-mode
  forward pass, so BatchNorm sees (and its running statistics average) the whole
  mixed batch, as in the reference implementation.

  Args:
    state: the network.
    batch: 'labeled' {'weak', 'label'}, 'unlabeled' {'weak', 'strong'}.
    rng: this step's key (dropout).
    net: the network.
    hp: `config.uda`.

  Returns:
    (new state, metrics).
  """
  lab, unl = batch["labeled"], batch["unlabeled"]
  weight = hp.weight_at(state.step)

  def loss_fn(logits, params):
    del params
    logits_l, logits_w, logits_s = logits
    loss, aux = uda_loss(logits_l, lab["label"], logits_w, logits_s,
                         weight=weight, **hp.loss_kwargs())
    mask = aux.pop("mask")
    aux.update(pseudo_label_monitors(jax.lax.stop_gradient(logits_w),
                                     unl["label"], mask))
    return loss, aux

  state, metrics = one_network_step(
      state, [lab["weak"], unl["weak"], unl["strong"]], loss_fn, rng, net,
      labels=lab["label"])
  metrics["monitors/weight"] = weight
  return state, metrics


METHOD = register(Method(name="uda", hparams=parse_uda, views=views,
                         train_step=train_step))
