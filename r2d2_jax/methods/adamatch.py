"""AdaMatch, semi-supervised form (docs/algorithms.md, "AdaMatch"), a FixMatch-family member.

  p_l   = softmax(f(weak x_l)),  p_i = softmax(f(weak x_u_i))     (no gradient)
  p̃_i   = Normalize(p_i · (p̄_l + ε) / (p̂ + ε))         distribution alignment:
          p̂  ← m · p̂  + (1 − m) · mean_b p_b      (the first batch sets p̂)
          p̄_l ← m · p̄_l + (1 − m) · mean_b p_l,b  (p̄_l starts at 1/C)
  c     = τ · mean_b max p_l,b                          relative threshold
  w_i   = [max p̃_i ≥ c]
  ŷ_i   = onehot(argmax p̃_i) (hard, USB's default)  or  p̃_i (soft: no
          temperature, USB's `softmax=False`)
  L     = CE(y_l, f(weak x_l)) + λu(t) · (1/μB) Σ_i w_i · CE(ŷ_i, f(strong x_u_i))
  λu(t) = λu (weight_schedule='constant', USB)  or
          λu · (½ − ½ cos(min(π, 2π t / T)))  ('cosine_warmup', the paper;
          T = the stage's total steps)

As USB (`algorithms/adamatch/adamatch.py`, `AdaMatchThresholdingHook`,
`DistAlignEMAHook(p_target_type='model')`): the cutoff reads the UNALIGNED
labeled probabilities of this batch; mask and targets read the aligned
unlabeled ones. The estimates are updated with this batch before it is aligned.
τ = `threshold` = USB's `p_cutoff`, 0.95 in USB's configs (the AdaMatch paper
uses 0.9); one momentum m (USB's `ema_p`, 0.999).

The alignment is the family's (`methods/alignment.py`, applied by the shared
step), ON by default: `hparams` gives `config.adamatch.alignment` the defaults
kind='ema', target='model', momentum=`config.adamatch.momentum`; a sub-block
overrides them field by field (kind='none' turns it off: an ablation).

Config block (`config.adamatch`, `AdaMatchHparams`): threshold, weight,
weight_schedule, hard_labels, momentum, and the `alignment` sub-block.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods import fixmatch
from r2d2_jax.methods import softmatch
from r2d2_jax.methods.base import check_choice, check_range, register

BLOCK = "adamatch"
WEIGHT_SCHEDULES = ("constant", "cosine_warmup")


@dataclasses.dataclass(frozen=True)
class AdaMatchHparams(fixmatch.FixMatchHparams):
  """The `config.adamatch` block (USB's AdaMatch arguments).

  Attributes (besides FixMatch's threshold, weight, hard_labels,
  label_smoothing; `temperature` is not read):
    threshold: τ of the relative threshold τ · mean_b max p_l, in (0, 1]
      (USB's `p_cutoff`).
    momentum: m of the alignment's EMAs, in [0, 1) (USB's `ema_p`).
    weight_schedule: 'constant' (USB) or 'cosine_warmup' (the paper).
    total_steps: T of 'cosine_warmup', the stage's length (from the task,
      not the config).
    alignment: distribution alignment to the labeled prediction, on by
      default (module docstring).
  """
  momentum: float = 0.999
  weight_schedule: str = "constant"
  total_steps: int = 0
  alignment: alignment_lib.AlignmentHparams = alignment_lib.AlignmentHparams(
      kind="ema", target="model", momentum=0.999)

  def __post_init__(self):
    super().__post_init__()
    check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
    check_choice("weight_schedule", self.weight_schedule, WEIGHT_SCHEDULES)
    check_range("total_steps", self.total_steps, 0, integer=True)

  def weight_at(self, step: jax.Array) -> jax.Array:
    """λu(t): constant, or λu · (½ − ½ cos(min(π, 2π t / T)))."""
    if self.weight_schedule == "constant":
      return jnp.asarray(self.weight, float)
    t = jnp.asarray(step, float)
    angle = jnp.minimum(math.pi, 2 * math.pi * t / max(self.total_steps, 1))
    return self.weight * (0.5 - 0.5 * jnp.cos(angle))


def default_block() -> ml_collections.ConfigDict:
  """USB's AdaMatch settings: τ = 0.95, λu = 1 constant, hard labels, m = 0.999.

  The alignment sub-block is left out: `hparams` turns the alignment to the
  labeled prediction on with momentum m.
  """
  return fixmatch.block_of(AdaMatchHparams(), "temperature", "total_steps")


def hparams(config, *, task) -> AdaMatchHparams:
  """`config.adamatch` as `AdaMatchHparams` (errors name the field)."""
  hp = softmatch.parse_with_alignment(
      config, AdaMatchHparams, BLOCK, dict(kind="ema", target="model"),
      {"temperature": "AdaMatch's soft pseudo-labels are the aligned "
                      "probabilities themselves (USB: softmax=False); there "
                      "is no temperature.",
       "total_steps": "T of the weight schedule is the stage's length "
                      "(config.total_steps), not a block key."})
  return dataclasses.replace(hp, total_steps=int(task.total_steps))


def relative_threshold(probs, stats, signals, hp):
  """1 where max p̃ ≥ τ · mean_b max p_l (`>=`, USB's `ge`), else 0."""
  cutoff = hp.threshold * jnp.mean(jnp.max(signals.probs_l, -1))
  return (jnp.max(probs, -1) >= cutoff).astype(probs.dtype), stats


def aligned_targets(probs, signals, hp):
  """One-hot argmax of the aligned probabilities, or those probabilities."""
  del signals
  if hp.hard_labels:
    return jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1],
                          dtype=probs.dtype)
  return probs


ADAMATCH = fixmatch.Rule(mask=relative_threshold, targets=aligned_targets)
train_step = fixmatch.make_train_step(ADAMATCH)
init_state = fixmatch.make_init_state(ADAMATCH, "adamatch")
METHOD = register(fixmatch.family_method(BLOCK, ADAMATCH, hparams))
