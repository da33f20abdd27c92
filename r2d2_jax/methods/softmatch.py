"""SoftMatch (docs/algorithms.md, "SoftMatch"), a FixMatch-family member.

  p_i   = softmax(f(weak x_u_i))                           (no gradient)
  p̃_i   = Normalize(p_i · (1/C + ε) / (p̂ + ε))             uniform alignment,
          p̂ ← m · p̂ + (1 − m) · mean_b p_b  (the first batch sets p̂)
  μ_t   = m · μ_{t−1} + (1 − m) · mean_b max p̃_b           (μ_0 = 1/C)
  σ²_t  = m · σ²_{t−1} + (1 − m) · var_b max p̃_b           (σ²_0 = 1, the
          unbiased batch variance, divisor μB − 1)
  w_i   = exp(−min(max p̃_i − μ_t, 0)² / (2 σ²_t / n²))     (1 above μ_t)
  ŷ_i   = onehot(argmax p_i) (hard, USB's default)  or  softmax(log p_i / T)
  L     = CE(y_l, f(weak x_l)) + λu · (1/μB) Σ_i w_i · CE(ŷ_i, f(strong x_u_i))

As USB (`algorithms/softmatch/softmatch.py`, `SoftMatchWeightingHook`,
`hooks/dist_align.py` `DistAlignEMAHook(p_target_type='uniform')`): the
weights read the ALIGNED probabilities and the Gaussian statistics after this
batch's update; the pseudo-labels come from the UNALIGNED weak prediction
(USB passes `logits_x_ulb_w` to the pseudo-labelling hook), here
`Signals.probs_u`. One momentum m (USB's `ema_p`, 0.999) drives the alignment
and the Gaussian; n = `n_sigma` = 2.

The uniform alignment is the family's distribution alignment
(`methods/alignment.py`, applied by the shared step before the rule), switched
ON by default: `hparams` gives `config.softmatch.alignment` the defaults
kind='ema', target='uniform', momentum=`config.softmatch.momentum`; a sub-block
overrides them field by field (target='model' is USB's `dist_uniform=False`;
kind='none' turns it off, an ablation that must be written out). USB always
aligns (its `dist_align` flag is stored but never read). Per-class Gaussians
(USB's `per_class=True`) are not implemented: `per_class=True` is an error.

Config block (`config.softmatch`, `SoftMatchHparams`): weight, hard_labels,
temperature, n_sigma, momentum, per_class, and the `alignment` sub-block.
SoftMatch has no confidence threshold: a `threshold` key is an error.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods import fixmatch
from r2d2_jax.methods.base import check_range, register

BLOCK = "softmatch"


@dataclasses.dataclass(frozen=True)
class SoftMatchHparams(fixmatch.FixMatchHparams):
  """The `config.softmatch` block (USB's SoftMatch arguments).

  Attributes (besides FixMatch's weight, hard_labels, label_smoothing;
  `threshold` is not read):
    temperature: T of the soft targets (USB's `T` = 0.5; unused when
      hard_labels, USB's default).
    n_sigma: n of the truncated Gaussian, > 0 (USB: 2).
    momentum: m of the Gaussian's EMAs (and, by default, of the alignment),
      in [0, 1) (USB's `ema_p`: 0.999).
    per_class: per-class Gaussians (USB's option); only False is supported.
    alignment: the uniform alignment (module docstring), on by default.
  """
  temperature: float = 0.5
  n_sigma: float = 2.0
  momentum: float = 0.999
  per_class: bool = False
  alignment: alignment_lib.AlignmentHparams = alignment_lib.AlignmentHparams(
      kind="ema", target="uniform", momentum=0.999)

  def __post_init__(self):
    super().__post_init__()
    check_range("n_sigma", self.n_sigma, 0.0, lo_open=True)
    check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
    if self.per_class is not False:
      raise ValueError(f"per_class={self.per_class!r}: only the global "
                       "Gaussian (False, USB's default) is implemented.")


def default_block() -> ml_collections.ConfigDict:
  """USB's SoftMatch settings: λu = 1, hard labels, T = 0.5, n = 2, m = 0.999.

  The alignment sub-block is left out: `hparams` turns the uniform alignment
  on with momentum m.
  """
  return fixmatch.block_of(SoftMatchHparams(), "threshold")


def check_batch(config, block: str) -> None:
  """The unbiased batch variance needs μB ≥ 2 unlabeled rows."""
  u = round((config.data.get("uratio", 0) or 0) * config.data.batch_size)
  if 0 < u < 2:
    raise R2D2Error(
        f"config.data.uratio={config.data.uratio!r}: {block} needs at least 2 "
        f"unlabeled rows per step (uratio * batch_size = {u}) for its batch "
        "statistics.")


def parse_with_alignment(config, cls: type, block: str,
                         alignment_defaults: dict,
                         not_read: dict[str, str] | None = None):
  """`config.<block>` as `cls`, its alignment sub-block over the defaults.

  Args:
    config: the config.
    cls: the hyperparameter dataclass (a `FixMatchHparams` with `momentum`).
    block: the block's name.
    alignment_defaults: the method's alignment (kind, target); the momentum
      is the block's `momentum`.
    not_read: keys of `cls` the method does not read, each with the reason:
      setting one is an error (rather than silently ignored).
  """
  for key, why in (not_read or {}).items():
    if config.get(block) is not None and key in config[block]:
      raise R2D2Error(f"config.{block}.{key}: {why}")
  hp = fixmatch.hparams(config, cls=cls, block=block)
  al = alignment_lib.parse(config[block].get("alignment"),
                           f"config.{block}.alignment",
                           defaults=dict(alignment_defaults,
                                         momentum=hp.momentum))
  return dataclasses.replace(hp, alignment=al)


def hparams(config) -> SoftMatchHparams:
  """`config.softmatch` as `SoftMatchHparams` (errors name the field)."""
  hp = parse_with_alignment(
      config, SoftMatchHparams, BLOCK, dict(kind="ema", target="uniform"),
      {"threshold": "SoftMatch has no confidence threshold (its weights are "
                    "the truncated Gaussian)."})
  check_batch(config, BLOCK)
  return hp


def init_stats(task, hp):
  """μ_0 = 1/C, σ²_0 = 1 (USB's `prob_max_mu_t`, `prob_max_var_t`)."""
  del hp
  return {"mu": jnp.asarray(1.0 / task.num_classes, jnp.float32),
          "var": jnp.asarray(1.0, jnp.float32)}


def gaussian_weights(probs, stats, signals, hp):
  """The EMAs updated with this batch, then the truncated-Gaussian weights."""
  del signals
  max_p = jnp.max(probs, -1)
  m = hp.momentum
  mu = m * stats["mu"] + (1 - m) * jnp.mean(max_p)
  var = m * stats["var"] + (1 - m) * jnp.var(max_p, ddof=1)
  gap = jnp.minimum(max_p - mu, 0.0)
  weights = jnp.exp(-jnp.square(gap) / (2 * var / hp.n_sigma ** 2))
  return weights, {"mu": mu, "var": var}


def unaligned_targets(probs, signals, hp):
  """Pseudo-labels of the weak prediction before alignment (USB)."""
  del probs
  return fixmatch.pseudo_targets(signals.probs_u, hp)


def monitors(logits_s, weights, stats, hp):
  """No extra loss; logs μ_t and σ²_t."""
  del weights, hp
  return jnp.zeros((), logits_s.dtype), {
      "monitors/softmatch_mu": stats["mu"],
      "monitors/softmatch_var": stats["var"]}


SOFTMATCH = fixmatch.Rule(init_stats=init_stats, mask=gaussian_weights,
                          targets=unaligned_targets, extra_loss=monitors)
train_step = fixmatch.make_train_step(SOFTMATCH)
init_state = fixmatch.make_init_state(SOFTMATCH, "softmatch")
METHOD = register(fixmatch.family_method(BLOCK, SOFTMATCH, hparams))

