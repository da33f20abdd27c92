"""FixMatch (docs/algorithms.md, "FixMatch"), written as the skeleton of its family.

  p_i = align(softmax(f(weak x_u_i)))                  (no gradient)
  w_i = mask(p_i) = [max_c p_i ≥ τ]                    (FixMatch's rule)
  ŷ_i = onehot(argmax p_i)  (hard, the paper)   or  softmax(log p_i / T)  (soft)
  L = CE(y_l, f(weak x_l)) + λu · (1/μB) Σ_i w_i · CE(ŷ_i, f(strong x_u_i))

The mean is over ALL μB unlabeled rows, masked ones counting zero
(google-research/fixmatch `fixmatch.py`: `reduce_mean(loss_xeu * pseudo_mask)`;
USB `consistency_loss`). Labeled, weak and strong batches go through the
network in one train-mode forward pass (`one_network_step`): BatchNorm
normalises with, and its running statistics average, the whole concatenated
batch, as the reference's single `classifier(x, training=True)` call does.

Extension points (the modern variants: FlexMatch, FreeMatch, SoftMatch,
AdaMatch). A `Rule` holds pure functions:
  init_stats(task, hp) -> stats           a pytree kept in `FixMatchState.stats`
                                          (FixMatch's is empty);
  align(probs, stats, signals, hp) -> (probs, stats)
                                          reweights the weak probabilities
                                          (FixMatch: identity);
  mask(probs, stats, signals, hp) -> (weights [μB] in [0, 1], stats)
                                          (FixMatch: the fixed threshold);
  targets(probs, signals, hp) -> [μB, C]  the pseudo-labels (FixMatch: hard
                                          argmax of the aligned probabilities,
                                          or soft, `pseudo_targets`);
  extra_loss(logits_s, weights, stats, hp) -> (loss, metrics)
                                          a term added to the loss as it is
                                          (already weighted), e.g. FreeMatch's
                                          fairness term (FixMatch: 0).
`signals` (`Signals`) is what a rule may read besides the weak probabilities:
the labeled batch's probabilities, the unaligned weak probabilities, the
unlabeled rows' train-split indices and the step. `align` and `mask` return the
updated statistics, so a rule chooses whether its mask reads them before or
after this batch's update. `hp.weight_at(step)` is λu(t) (FixMatch: constant).
A variant is a hyperparameter dataclass (a subclass of `FixMatchHparams`) and a
`Rule`, registered with `family_method`; a rule whose statistics are per
example (FlexMatch) passes its own `state_sharding`.

Two options every member has, outside its rule:
  distribution alignment (`hp.alignment`, `methods/alignment.py`): applied to
    the weak probabilities before the rule's `align`, its running estimates
    in `FixMatchState.alignment`;
  a learned augmentation (`FixMatchState.augment`): the augmentation state a
    stateful strong-view policy reads (CTAugment's bin weights), handed to
    the views by `Method.augment_state` (empty for the stateless policies).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax import losses
from r2d2_jax.data import ctaugment
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods import learned_augment
from r2d2_jax.methods.base import (Method, Network, Task, check_range,
                                   check_uratio, one_network_step, parse_block,
                                   pseudo_label_monitors, register)
from r2d2_jax.state import TrainState

PyTree = Any


class FixMatchState(TrainState):
  """A `TrainState` with the rule's statistics (FixMatch: {}).

  Attributes:
    stats: the rule's statistics (`Rule.init_stats`).
    alignment: distribution alignment's running estimates ({} when off).
    augment: the strong view's learned augmentation state ({} for a
      stateless policy).
  """
  stats: PyTree
  alignment: PyTree = dataclasses.field(default_factory=dict)
  augment: PyTree = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class FixMatchHparams:
  """The `config.fixmatch` block (and the top-level `label_smoothing`).

  Attributes:
    threshold: τ of the confidence mask, in (0, 1].
    weight: λu of the unlabeled loss, ≥ 0.
    hard_labels: argmax pseudo-labels (the paper); False: soft targets.
    temperature: T of the soft targets softmax(log p / T), > 0 (unused when
      hard_labels).
    label_smoothing: of the labeled CE, in [0, 1) (FixMatch: 0).
    alignment: distribution alignment (the block's `alignment` sub-block;
      `methods/alignment.py`), off by default.
    ctaugment: CTAugment's settings when the strong policy is 'ctaugment'
      (from `config.data.augment.strong`, not from the block), else None.
  """
  threshold: float = 0.95
  weight: float = 1.0
  hard_labels: bool = True
  temperature: float = 1.0
  label_smoothing: float = 0.0
  alignment: alignment_lib.AlignmentHparams = alignment_lib.AlignmentHparams()
  ctaugment: ctaugment.CTAugmentHparams | None = None

  def __post_init__(self):
    check_range("threshold", self.threshold, 0.0, 1.0, lo_open=True)
    check_range("weight", self.weight, 0.0)
    if not isinstance(self.hard_labels, bool):
      raise ValueError(f"hard_labels={self.hard_labels!r} must be True or "
                       "False.")
    check_range("temperature", self.temperature, 0.0, lo_open=True)
    check_range("label_smoothing", self.label_smoothing, 0.0, 1.0,
                hi_open=True)

  def weight_at(self, step: jax.Array) -> jax.Array:
    """λu(t); FixMatch's is constant."""
    del step
    return jnp.asarray(self.weight, float)


# Fields of every member that a config block does not hold: the top-level
# config.label_smoothing, the `alignment` sub-block (absent: off) and
# CTAugment's settings (config.data.augment.strong).
NOT_IN_BLOCK = ("label_smoothing", "alignment", "ctaugment")


def block_of(hp, *also: str) -> ml_collections.ConfigDict:
  """`hp`'s fields as a config block, less `NOT_IN_BLOCK` and `also`."""
  block = dataclasses.asdict(hp)
  for key in NOT_IN_BLOCK + also:
    del block[key]
  return ml_collections.ConfigDict(block)


def default_block() -> ml_collections.ConfigDict:
  """FixMatch's settings (fixmatch.py flags): τ = 0.95, λu = 1, hard labels."""
  return block_of(FixMatchHparams())


def parse_alignment(config, block: str) -> alignment_lib.AlignmentHparams:
  """`config.<block>.alignment` (absent: off)."""
  return alignment_lib.parse(config[block].get("alignment"),
                             f"config.{block}.alignment")


def hparams(config, cls: type = FixMatchHparams, block: str = "fixmatch"):
  """`config.<block>` as `cls` (an error names a bad or unknown field).

  With the strong policy 'ctaugment' its `ctaugment` field holds CTAugment's
  settings (else None).
  """
  check_uratio(config, block)
  if config.get(block) is None:
    raise R2D2Error(f"config.{block} is missing; FixMatch's settings: "
                    "r2d2_jax.methods.fixmatch.default_block().")
  if "label_smoothing" in config[block]:
    raise R2D2Error(f"config.{block}.label_smoothing: set the top-level "
                    "config.label_smoothing instead.")
  if "ctaugment" in config[block]:
    raise R2D2Error(f"config.{block}.ctaugment: CTAugment is the strong "
                    "view's policy; set config.data.augment.strong.policy="
                    "'ctaugment'.")
  values = {k: v for k, v in config[block].items() if k != "alignment"}
  return parse_block(cls, values, f"config.{block}",
                     label_smoothing=config.get("label_smoothing"),
                     alignment=parse_alignment(config, block),
                     ctaugment=parse_ctaugment(config))


# --- CTAugment (a learned strong augmentation; docs/algorithms.md,
# "CTAugment", "Stateful augmentations") -----------------------------------
# With config.data.augment.strong.policy = 'ctaugment', every family member
# keeps CTAugment's bin weights in `FixMatchState.augment['ctaugment']`, reads
# a probe view of the labeled batch, and after the network update classifies
# the probe with the EVAL variables of the state before the update (EMA
# weights, BatchNorm in eval mode: the reference's `classify_op`), then
# updates the weights (`ctaugment.update`, sequential over the batch).


parse_ctaugment = learned_augment.parse   # the shared method side of CTAugment


def ctaugment_of(hp) -> ctaugment.CTAugmentHparams | None:
  """CTAugment's settings when the strong policy is 'ctaugment', else None."""
  return hp.ctaugment


def init_augment(hp) -> PyTree:
  """`FixMatchState.augment`: {'ctaugment': bin weights} or {}."""
  return learned_augment.init(ctaugment_of(hp))


def learn_augment(state: FixMatchState, lab: PyTree, net: Network, hp
                  ) -> tuple[PyTree, dict]:
  """CTAugment's update from the labeled probe (state: before the update)."""
  return learned_augment.learn(state, lab, net, ctaugment_of(hp))
# --- end CTAugment ---------------------------------------------------------


class Signals(NamedTuple):
  """What a rule may read besides the weak probabilities (all without gradient).

  Attributes:
    probs_l: [B, C] softmax of the labeled logits.
    probs_u: [μB, C] softmax of the weak logits, before any alignment.
    index_u: [μB] train-split rows of the unlabeled batch.
    step: the step before this update.
  """
  probs_l: jax.Array
  probs_u: jax.Array
  index_u: jax.Array
  step: jax.Array


def no_stats(task: Task, hp: Any) -> PyTree:
  del task, hp
  return {}


def no_alignment(probs, stats, signals, hp):
  del signals, hp
  return probs, stats


def fixed_threshold(probs, stats, signals, hp):
  """FixMatch's mask: 1 where max_c p ≥ τ (`>=`, as the reference), else 0."""
  del signals
  return (jnp.max(probs, -1) >= hp.threshold).astype(probs.dtype), stats


def pseudo_targets(probs: jax.Array, hp: FixMatchHparams) -> jax.Array:
  """One-hot argmax (hard) or softmax(log p / T) (soft) targets, [μB, C]."""
  if hp.hard_labels:
    return jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1],
                          dtype=probs.dtype)
  return jax.nn.softmax(jnp.log(probs) / hp.temperature)


def aligned_targets(probs, signals, hp):
  """FixMatch's targets: `pseudo_targets` of the (aligned) probabilities."""
  del signals
  return pseudo_targets(probs, hp)


def no_extra_loss(logits_s, weights, stats, hp):
  del weights, stats, hp
  return jnp.zeros((), logits_s.dtype), {}


class Rule(NamedTuple):
  """The pluggable parts of a FixMatch-family step (module docstring)."""
  init_stats: Callable[[Task, Any], PyTree] = no_stats
  align: Callable[..., tuple[jax.Array, PyTree]] = no_alignment
  mask: Callable[..., tuple[jax.Array, PyTree]] = fixed_threshold
  targets: Callable[..., jax.Array] = aligned_targets
  extra_loss: Callable[..., tuple[jax.Array, dict]] = no_extra_loss


def views(hp) -> dict[str, tuple[str, ...]]:
  labeled = learned_augment.labeled_views(("weak",), ctaugment_of(hp))
  return {"labeled": labeled, "unlabeled": ("weak", "strong")}


def make_init_state(rule: Rule, block: str = "fixmatch"
                    ) -> Callable[..., FixMatchState]:
  """The family's `init_state` over `rule`; `block` names errors' config path."""
  def init_state(rng: jax.Array, *, net: Network, task: Task, hp
                 ) -> FixMatchState:
    base = net.init_train_state(rng)
    return FixMatchState.extending(
        base, stats=rule.init_stats(task, hp),
        alignment=alignment_lib.init_stats(task, hp.alignment,
                                           f"config.{block}.alignment"),
        augment=init_augment(hp))

  return init_state


def make_train_step(rule: Rule) -> Callable[..., tuple[FixMatchState, dict]]:
  """The family's step over `rule`."""

  def train_step(state: FixMatchState, batch, rng: jax.Array, *,
                 net: Network, hp: FixMatchHparams):
    """One step: batch 'labeled' {'weak', 'label'}, 'unlabeled' {'weak', 'strong'}.

    With CTAugment the labeled stream also has 'probe' and 'probe_aux'.
    """
    lab, unl = batch["labeled"], batch["unlabeled"]
    weight = hp.weight_at(state.step)

    def loss_fn(logits, params):
      del params
      z_l, z_w, z_s = logits
      xe = losses.cross_entropy(z_l, lab["label"],
                                label_smoothing=hp.label_smoothing)
      probs_u = jax.nn.softmax(jax.lax.stop_gradient(z_w))
      signals = Signals(probs_l=jax.nn.softmax(jax.lax.stop_gradient(z_l)),
                        probs_u=probs_u, index_u=unl["index"], step=state.step)
      probs, da_stats = alignment_lib.align(probs_u, signals.probs_l,
                                            state.alignment, hp.alignment)
      probs, stats = rule.align(probs, state.stats, signals, hp)
      mask, stats = rule.mask(probs, stats, signals, hp)
      mask = jax.lax.stop_gradient(mask)
      targets = jax.lax.stop_gradient(rule.targets(probs, signals, hp))
      xeu = losses.soft_cross_entropy(z_s, targets, mask)
      extra, extra_metrics = rule.extra_loss(z_s, mask, stats, hp)
      aux = {"losses/xe": xe, "losses/xeu": xeu, "stats": stats,
             "alignment": da_stats, **extra_metrics}
      # The monitors describe the labels trained on (SoftMatch's targets are
      # the unaligned argmax, the mask reads the aligned probabilities).
      aux.update(pseudo_label_monitors(targets, unl["label"], mask))
      return xe + weight * xeu + extra, aux

    new, metrics = one_network_step(
        state, [lab["weak"], unl["weak"], unl["strong"]], loss_fn, rng, net,
        labels=lab["label"])
    augment, augment_metrics = learn_augment(state, lab, net, hp)  # CTAugment
    new = new.replace(
        stats=jax.lax.stop_gradient(metrics.pop("stats")),
        alignment=jax.lax.stop_gradient(metrics.pop("alignment")),
        augment=augment)
    metrics.update(augment_metrics)
    metrics["monitors/weight"] = weight
    return new, metrics

  return train_step


def family_method(name: str, rule: Rule, hparams_fn: Callable[..., Any],
                  **method_kwargs: Any) -> Method:
  """A FixMatch-family `Method` (not registered: pass it to `register`)."""
  method_kwargs.setdefault("augment_state", augment_state)
  return Method(name=name, hparams=hparams_fn, views=views,
                init_state=make_init_state(rule, name),
                train_step=make_train_step(rule), **method_kwargs)


augment_state = learned_augment.augment_state


FIXMATCH = Rule()
train_step = make_train_step(FIXMATCH)
init_state = make_init_state(FIXMATCH)
METHOD = register(family_method("fixmatch", FIXMATCH, hparams))
