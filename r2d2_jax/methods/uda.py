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

Distribution alignment (off by default; `config.uda.alignment`, parsed by
`methods/alignment.py`; the uda method only, not MPL's teacher loss): the
teacher's probabilities p = softmax(f(weak x_u)) are aligned first,
p̃ = Normalize(p · (p_target + ε) / (p_model + ε)) (target 'model' reads the
labeled batch's softmax), and both the targets softmax(log p̃ / τ) and the mask
(max p̃, or max of the sharpened p̃) read p̃; the running estimates are
`UdaState.alignment` (the state is a plain `TrainState` when neither alignment
nor CTAugment is on).

CTAugment (`config.data.augment.strong.policy = 'ctaugment'`, the uda method
only; docs/algorithms.md, "CTAugment"): the strong view draws from bin weights
kept in `UdaState.augment`, learned each step from a probe of the labeled batch
classified by the eval network (`methods/learned_augment.py`).

Config block (`config.uda`, parsed into `UdaHparams`): weight, ramp_steps,
temperature, threshold, label_smoothing, mask_on, and (uda only) the
`alignment` sub-block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.data import ctaugment
from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods import learned_augment
from r2d2_jax.methods.base import (Method, Network, Task, check_choice,
                                   check_range, one_network_step, parse_block,
                                   pseudo_label_monitors, register)
from r2d2_jax.state import TrainState

PyTree = Any
MASK_ON = ("sharpened", "unsharpened")
ALIGNMENT = "config.uda.alignment"


class UdaState(TrainState):
  """A `TrainState` with distribution alignment's estimates and CTAugment's weights.

  Used only when one of them is on (otherwise the state is a `TrainState`).
  """
  alignment: PyTree = dataclasses.field(default_factory=dict)
  augment: PyTree = dataclasses.field(default_factory=dict)


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
    alignment: distribution alignment of the teacher's probabilities (the
      uda method only; module docstring), off by default.
    ctaugment: CTAugment's settings when the strong policy is 'ctaugment'
      (the uda method only; from `config.data.augment.strong`), else None.
  """
  weight: float
  temperature: float
  threshold: float
  ramp_steps: int = 0
  label_smoothing: float = 0.0
  mask_on: str = "unsharpened"
  alignment: alignment_lib.AlignmentHparams = alignment_lib.AlignmentHparams()
  ctaugment: ctaugment.CTAugmentHparams | None = None

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


def parse_uda(config, *, with_alignment: bool = False) -> UdaHparams:
  """`config.uda` as `UdaHparams` (an error names a bad or unknown field).

  Args:
    config: the config.
    with_alignment: whether the reader applies `config.uda.alignment` (the uda
      method); otherwise (MPL's teacher) the sub-block is an error.
  """
  if config.get("uda") is None:
    raise R2D2Error("config.uda is missing; it needs weight, temperature and "
                    "threshold (configs/common.py `uda_block`).")
  if "ctaugment" in config.uda:
    raise R2D2Error("config.uda.ctaugment: CTAugment is the strong view's "
                    "policy; set config.data.augment.strong.policy="
                    "'ctaugment'.")
  values = {k: v for k, v in config.uda.items() if k != "alignment"}
  block = config.uda.get("alignment")
  if block is not None and not with_alignment:
    raise R2D2Error(f"{ALIGNMENT}: distribution alignment is an option of the "
                    f"uda method only; {config.get('method')!r} does not "
                    "apply it.")
  cta = learned_augment.parse(config) if with_alignment else None
  return parse_block(UdaHparams, values, "config.uda",
                     alignment=alignment_lib.parse(block, ALIGNMENT),
                     ctaugment=cta)


def hparams(config) -> UdaHparams:
  """The uda method's `config.uda`, its `alignment` sub-block included."""
  return parse_uda(config, with_alignment=True)


def init_state(rng: jax.Array, *, net: Network, task: Task, hp: UdaHparams
               ) -> TrainState:
  """The network; with alignment or CTAugment on, a `UdaState`."""
  base = net.init_train_state(rng)
  if not hp.alignment.enabled and hp.ctaugment is None:
    return base
  return UdaState.extending(
      base, alignment=alignment_lib.init_stats(task, hp.alignment, ALIGNMENT),
      augment=learned_augment.init(hp.ctaugment))


def uda_loss(logits_l: jax.Array, labels: jax.Array, logits_weak: jax.Array,
             logits_strong: jax.Array, *, weight: jax.Array | float,
             temperature: float, threshold: float,
             label_smoothing: float = 0.0, mask_on: str = "unsharpened",
             probs_weak: jax.Array | None = None
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
    probs_weak: the weak view's probabilities to use in place of
      softmax(logits_weak) (distribution-aligned): targets softmax(log p / τ),
      mask on p or on the targets. None: from `logits_weak`.

  Returns:
    (total loss, {'losses/xe', 'losses/xeu', 'mask'}): `mask` [B_u] is the
    per-row mask (callers log its mean as monitors/mask).
  """
  xe = losses.cross_entropy(logits_l, labels, label_smoothing=label_smoothing)
  if mask_on not in MASK_ON:
    raise R2D2Error(f"Unknown uda.mask_on {mask_on!r}. Valid values: "
                    f"{', '.join(MASK_ON)}.")
  if probs_weak is None:
    logits_weak = jax.lax.stop_gradient(logits_weak)
    targets = jax.nn.softmax(logits_weak / temperature)
    confidence = targets if mask_on == "sharpened" else jax.nn.softmax(
        logits_weak)
  else:
    probs_weak = jax.lax.stop_gradient(probs_weak)
    targets = jax.nn.softmax(jnp.log(probs_weak) / temperature)
    confidence = targets if mask_on == "sharpened" else probs_weak
  mask = (jnp.max(confidence, -1) >= threshold).astype(logits_strong.dtype)
  consistency = losses.soft_cross_entropy(logits_strong, targets, mask)
  total = xe + weight * consistency
  return total, {"losses/xe": xe, "losses/xeu": consistency, "mask": mask}


def views(hp) -> dict[str, tuple[str, ...]]:
  return {"labeled": learned_augment.labeled_views(("weak",), hp.ctaugment),
          "unlabeled": ("weak", "strong")}


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
    kwargs = hp.loss_kwargs()
    guess = jax.lax.stop_gradient(logits_w)
    if hp.alignment.enabled:
      probs, da_stats = alignment_lib.align(
          jax.nn.softmax(guess),
          jax.nn.softmax(jax.lax.stop_gradient(logits_l)), state.alignment,
          hp.alignment)
      kwargs.update(probs_weak=probs)
      guess = probs
    loss, aux = uda_loss(logits_l, lab["label"], logits_w, logits_s,
                         weight=weight, **kwargs)
    mask = aux.pop("mask")
    aux.update(pseudo_label_monitors(guess, unl["label"], mask))
    if hp.alignment.enabled:
      aux["alignment"] = da_stats
    return loss, aux

  new, metrics = one_network_step(
      state, [lab["weak"], unl["weak"], unl["strong"]], loss_fn, rng, net,
      labels=lab["label"])
  if hp.alignment.enabled:
    new = new.replace(
        alignment=jax.lax.stop_gradient(metrics.pop("alignment")))
  if hp.ctaugment is not None:
    augment, augment_metrics = learned_augment.learn(state, lab, net,
                                                     hp.ctaugment)
    new = new.replace(augment=augment)
    metrics.update(augment_metrics)
  metrics["monitors/weight"] = weight
  return new, metrics


METHOD = register(Method(name="uda", hparams=hparams, views=views,
                         init_state=init_state, train_step=train_step,
                         augment_state=learned_augment.augment_state))
