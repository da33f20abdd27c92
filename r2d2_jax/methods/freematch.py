"""FreeMatch (docs/algorithms.md, "FreeMatch"): self-adaptive thresholds and a fairness term.

A FixMatch-family member (`methods/fixmatch.py`). Three running statistics,
EMAs with momentum λ (`ema_p`) of the weak probabilities p_i of the
unlabeled batch, updated with THIS batch before its mask (USB's
`FreeMatchThresholingHook`, semilearn/algorithms/freematch):

  τ_t  ← λ τ_t + (1 − λ) · mean_i max_c p_i       (time_p; init 1/C; the 0.8
                                                    quantile if use_quantile;
                                                    clipped to [0, 0.95] if
                                                    clip_thresh)
  p̃    ← λ p̃ + (1 − λ) · mean_i p_i               (p_model; init 1/C each)
  h̃    ← λ h̃ + (1 − λ) · hist_i(argmax p_i) / μB  (label_hist; init 1/C each)

  w_i = [max_c p_i ≥ τ_t · p̃(ĉ_i) / max_c p̃(c)],  ĉ_i = argmax p_i

and the loss adds the fairness term (USB's `entropy_loss`) over the kept rows
K = {i : w_i = 1} of the strong view, q_i = softmax(f(strong x_u_i)):

  h̄ = hist_{i∈K}(argmax q_i) / |K|,   q̄ = mean_{i∈K} q_i
  L_f = Σ_c SumNorm(p̃ / h̃)(c) · log(SumNorm(q̄ / h̄)(c) + 1e-12)
  L = CE(y_l, f(weak x_l)) + λu · (1/μB) Σ_i w_i · CE(ŷ_i, f(strong x_u_i))
      + λe · L_f · [|K| > 0]

where 1/h is 0 where h = 0 (USB's `replace_inf_to_zero`), both scalers carry
no gradient (`.detach()`), and the gradient reaches the strong logits through
q̄ (and its normalisation) only. ŷ_i is onehot(ĉ_i) (hard, USB's configs) or
softmax(log p_i / T) (T = 0.5, USB's `T`, applied to the weak logits). The
selection of K is written with the 0/1 weights (static shapes under jit); with
no row kept the term is 0 and its gradient 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import fixmatch
from r2d2_jax.methods.base import Task, check_range, register

CLIP = 0.95        # USB's `torch.clip(self.time_p, 0.0, 0.95)`
QUANTILE = 0.8     # USB's `torch.quantile(max_probs, 0.8)`
EPS = 1e-12        # USB's `log(mod_mean_prob_s + 1e-12)`


@dataclasses.dataclass(frozen=True)
class FreeMatchHparams(fixmatch.FixMatchHparams):
  """The `config.freematch` block.

  FixMatch's fields but `threshold` (FreeMatch's threshold is τ_t, learned;
  the field is unused and the block may not set it), and:

  Attributes:
    temperature: T of the soft targets (USB's `T`, 0.5; unused when
      hard_labels).
    ema_p: λ, the momentum of the EMA statistics, in [0, 1).
    fairness_weight: λe of the fairness term (USB's `ent_loss_ratio`, 0.001 in
      every USB config), ≥ 0.
    use_quantile: τ_t follows the 0.8 quantile of max_c p_i, not its mean.
    clip_thresh: τ_t clipped to [0, 0.95] after each update.
  """
  temperature: float = 0.5
  ema_p: float = 0.999
  fairness_weight: float = 0.001
  use_quantile: bool = False
  clip_thresh: bool = False

  def __post_init__(self):
    super().__post_init__()
    check_range("ema_p", self.ema_p, 0.0, 1.0, hi_open=True)
    check_range("fairness_weight", self.fairness_weight, 0.0)
    for name in ("use_quantile", "clip_thresh"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be True or "
                         "False.")


def default_block() -> ml_collections.ConfigDict:
  """USB's FreeMatch (CIFAR-10 configs): λ = 0.999, λe = 0.001, hard labels."""
  return fixmatch.block_of(FreeMatchHparams(), "threshold")


def hparams(config) -> FreeMatchHparams:
  """`config.freematch` (an error names a bad or unknown field)."""
  if config.get("freematch") is not None and "threshold" in config.freematch:
    raise R2D2Error("config.freematch.threshold: FreeMatch has no fixed "
                    "threshold (its τ_t is learned; see ema_p, use_quantile, "
                    "clip_thresh).")
  return fixmatch.hparams(config, cls=FreeMatchHparams, block="freematch")


def init_stats(task: Task, hp: FreeMatchHparams):
  """τ_t = 1/C, p̃ = h̃ = 1/C each (USB's initial values)."""
  del hp
  c = task.num_classes
  # dtype=float: the default float, not weakly typed (as the updates).
  full = lambda shape: jnp.full(shape, 1.0 / c, dtype=float)
  return {"time_p": full(()), "p_model": full((c,)), "label_hist": full((c,))}


def update_stats(probs: jax.Array, stats, hp: FreeMatchHparams):
  """USB's `update`: the EMAs with this batch's weak probabilities [μB, C]."""
  m = hp.ema_p
  max_p, label = jnp.max(probs, -1), jnp.argmax(probs, -1)
  level = (jnp.quantile(max_p, QUANTILE) if hp.use_quantile
           else jnp.mean(max_p))
  time_p = stats["time_p"] * m + (1 - m) * level
  if hp.clip_thresh:
    time_p = jnp.clip(time_p, 0.0, CLIP)
  p_model = stats["p_model"] * m + (1 - m) * jnp.mean(probs, 0)
  hist = jnp.sum(jax.nn.one_hot(label, probs.shape[-1], dtype=probs.dtype), 0)
  label_hist = stats["label_hist"] * m + (1 - m) * (hist / jnp.sum(hist))
  new = {"time_p": time_p, "p_model": p_model, "label_hist": label_hist}
  return {k: v.astype(stats[k].dtype) for k, v in new.items()}


def self_adaptive_mask(probs, stats, signals, hp):
  """The statistics updated with this batch, then [max p ≥ τ_t · p̃(ĉ)/max p̃]."""
  del signals
  stats = update_stats(probs, stats, hp)
  max_p, label = jnp.max(probs, -1), jnp.argmax(probs, -1)
  mod = stats["p_model"] / jnp.max(stats["p_model"])
  weights = (max_p >= stats["time_p"] * mod[label]).astype(probs.dtype)
  return weights, stats


def _inverse_or_zero(x: jax.Array) -> jax.Array:
  """1/x, 0 where x = 0 (USB's `replace_inf_to_zero(1 / x)`), no gradient."""
  x = jax.lax.stop_gradient(x)
  return jnp.where(x == 0, 0.0, 1.0 / jnp.where(x == 0, 1.0, x)).astype(x.dtype)


def fairness_loss(logits_s: jax.Array, weights: jax.Array, p_model: jax.Array,
                  label_hist: jax.Array) -> jax.Array:
  """USB's `entropy_loss` over the rows with weight 1 (0 if there are none).

  Args:
    logits_s: [μB, C] strong-view logits (the gradient flows through them).
    weights: [μB] 0/1 mask.
    p_model: [C] p̃ (after this batch's update).
    label_hist: [C] h̃ (after this batch's update).

  Returns:
    L_f, a scalar.
  """
  w = jax.lax.stop_gradient(weights).astype(logits_s.dtype)
  kept = jnp.sum(w)
  n = jnp.maximum(kept, 1.0)
  q = jax.nn.softmax(logits_s)
  pred = jnp.argmax(jax.lax.stop_gradient(q), -1)
  hist = jnp.sum(w[:, None] * jax.nn.one_hot(pred, q.shape[-1],
                                             dtype=q.dtype), 0) / n
  mod_model = p_model * _inverse_or_zero(label_hist)
  mod_model = mod_model / jnp.sum(mod_model)
  mean_q = jnp.sum(w[:, None] * q, 0) / n
  mod_mean = mean_q * _inverse_or_zero(hist)
  # With no row kept every entry is 0: divide by 1, the term is dropped below.
  total = jnp.sum(mod_mean)
  mod_mean = mod_mean / jnp.where(kept > 0, total, 1.0)
  loss = jnp.sum(jax.lax.stop_gradient(mod_model) * jnp.log(mod_mean + EPS))
  return jnp.where(kept > 0, loss, 0.0)


def fairness_term(logits_s, weights, stats, hp):
  """λe · L_f (`Rule.extra_loss`), with L_f and τ_t logged."""
  loss = fairness_loss(logits_s, weights, stats["p_model"],
                       stats["label_hist"])
  return hp.fairness_weight * loss, {
      "losses/fairness": loss,
      "monitors/time_p": stats["time_p"].astype(jnp.float32)}


FREEMATCH = fixmatch.Rule(init_stats=init_stats, mask=self_adaptive_mask,
                          extra_loss=fairness_term)
train_step = fixmatch.make_train_step(FREEMATCH)
init_state = fixmatch.make_init_state(FREEMATCH, "freematch")
METHOD = register(fixmatch.family_method("freematch", FREEMATCH, hparams))
