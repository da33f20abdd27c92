"""Distribution alignment (docs/algorithms.md, "Distribution alignment").

ReMixMatch's rule, as USB writes it (`hooks/dist_align.py`):

  p̃_u = Normalize(p_u · (p_target + ε) / (p_model + ε))

where p_model is a running estimate of the mean prediction on unlabeled data
and p_target the class distribution the predictions should follow. The running
estimates are updated with THIS batch before the batch is aligned (USB:
`update_p` then align).

  kind = 'ema'    p_model ← m · p_model + (1 − m) · mean_b p_u
                  (the first batch sets it: USB starts from None);
  kind = 'queue'  p_model = mean of a ring of the last `queue_length` batch
                  means, zero-initialised (USB's DistAlignQueueHook, ReMixMatch's
                  128 batches);
  target = 'uniform'  1/C (SoftMatch's "uniform alignment");
  target = 'labeled'  the class frequencies of the labeled set (ReMixMatch's
                      p(y); USB's 'gt');
  target = 'model'    a running estimate (EMA or ring) of the mean prediction
                      on the LABELED batch, uniform-initialised for the EMA,
                      zero for the ring (AdaMatch; USB's 'model').

The statistics are a small replicated pytree kept in the method's state, so
they are checkpointed and resumed with it; every mean is over the global batch
(equal on 1 and on N devices).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import Task, check_choice, check_range, parse_block

PyTree = Any

KINDS = ("none", "ema", "queue")
TARGETS = ("uniform", "labeled", "model")


@dataclasses.dataclass(frozen=True)
class AlignmentHparams:
  """The `alignment` sub-block of a method's config block.

  Attributes:
    kind: 'none' (off), 'ema' or 'queue' (module docstring).
    target: 'uniform', 'labeled' or 'model'.
    momentum: m of the EMA estimates, in [0, 1).
    queue_length: batches in the ring of kind 'queue', ≥ 1.
    eps: ε added to target and model before dividing, > 0 (USB: 1e-6).
  """
  kind: str = "none"
  target: str = "labeled"
  momentum: float = 0.999
  queue_length: int = 128
  eps: float = 1e-6

  def __post_init__(self):
    check_choice("kind", self.kind, KINDS)
    check_choice("target", self.target, TARGETS)
    check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
    check_range("queue_length", self.queue_length, 1, integer=True)
    check_range("eps", self.eps, 0.0, lo_open=True)

  @property
  def enabled(self) -> bool:
    return self.kind != "none"


def labeled_marginal(task: Task, where: str = "config.<block>.alignment"
                     ) -> np.ndarray:
  """The class frequencies of the labeled set, [C] float32.

  Raises:
    R2D2Error: naming `<where>.target` when the task has no labeled split (or
      an empty one), so the frequencies cannot be computed.
  """
  if (task.labeled_index is None or task.train_labels is None or
      len(task.labeled_index) == 0):
    raise R2D2Error(
        f"{where}.target='labeled' needs the labeled split's labels "
        "(Task.labeled_index, Task.train_labels), and this stage has no "
        "labeled examples; use target 'uniform' or 'model'.")
  labels = np.asarray(task.train_labels)[np.asarray(task.labeled_index)]
  counts = np.bincount(labels, minlength=task.num_classes).astype(np.float64)
  return (counts / counts.sum()).astype(np.float32)


def init_stats(task: Task, hp: AlignmentHparams,
               where: str = "config.<block>.alignment") -> PyTree:
  """The running estimates before the first batch ({} when alignment is off).

  `where` (the sub-block's path in the config) names the field in errors.
  """
  if not hp.enabled:
    return {}
  c = task.num_classes
  uniform = np.full((c,), 1.0 / c, np.float32)
  if hp.kind == "ema":
    stats = {"p_model": jnp.asarray(uniform),
             "seen": jnp.asarray(False)}
  else:
    stats = {"p_model": jnp.zeros((hp.queue_length, c), jnp.float32),
             "ptr": jnp.asarray(0, jnp.int32)}
  if hp.target == "uniform":
    stats["p_target"] = jnp.asarray(uniform)
  elif hp.target == "labeled":
    stats["p_target"] = jnp.asarray(labeled_marginal(task, where))
  elif hp.kind == "ema":
    stats["p_target"] = jnp.asarray(uniform)
  else:
    stats["p_target"] = jnp.zeros((hp.queue_length, c), jnp.float32)
  return stats


def update(stats: PyTree, probs_u: jax.Array, probs_l: jax.Array | None,
           hp: AlignmentHparams) -> PyTree:
  """The estimates after this batch (module docstring)."""
  mean_u = jnp.mean(probs_u, 0)
  new = dict(stats)
  if hp.kind == "ema":
    m = hp.momentum
    new["p_model"] = jnp.where(stats["seen"],
                               m * stats["p_model"] + (1 - m) * mean_u, mean_u)
    new["seen"] = jnp.asarray(True)
    if hp.target == "model":
      new["p_target"] = m * stats["p_target"] + (1 - m) * jnp.mean(probs_l, 0)
  else:
    ptr = stats["ptr"]
    # The ring keeps its dtype (a wider batch mean is rounded into it).
    ring = stats["p_model"]
    new["p_model"] = ring.at[ptr].set(mean_u.astype(ring.dtype))
    if hp.target == "model":
      ring = stats["p_target"]
      new["p_target"] = ring.at[ptr].set(
          jnp.mean(probs_l, 0).astype(ring.dtype))
    new["ptr"] = (ptr + 1) % hp.queue_length
  return new


def estimates(stats: PyTree, hp: AlignmentHparams
              ) -> tuple[jax.Array, jax.Array]:
  """(p_target, p_model), each [C]: the ring's rows averaged for 'queue'."""
  p_model, p_target = stats["p_model"], stats["p_target"]
  if p_model.ndim == 2:
    p_model = jnp.mean(p_model, 0)
  if p_target.ndim == 2:
    p_target = jnp.mean(p_target, 0)
  return p_target, p_model


def apply(probs_u: jax.Array, stats: PyTree, hp: AlignmentHparams
          ) -> jax.Array:
  """Normalize(p_u · (p_target + ε) / (p_model + ε)) with the given estimates."""
  p_target, p_model = estimates(stats, hp)
  out = probs_u * (p_target + hp.eps) / (p_model + hp.eps)
  return out / jnp.sum(out, -1, keepdims=True)


def align(probs_u: jax.Array, probs_l: jax.Array | None, stats: PyTree,
          hp: AlignmentHparams) -> tuple[jax.Array, PyTree]:
  """Updates the estimates with this batch, then aligns it (USB's order).

  Args:
    probs_u: [μB, C] predictions on the unlabeled batch (no gradient).
    probs_l: [B, C] predictions on the labeled batch (read by target 'model').
    stats: from `init_stats` / the previous step.
    hp: the settings.

  Returns:
    (aligned probabilities, rows summing to 1; the updated statistics). With
    kind 'none', `probs_u` and `stats` unchanged.
  """
  if not hp.enabled:
    return probs_u, stats
  stats = update(stats, probs_u, probs_l, hp)
  return apply(probs_u, stats, hp), stats


def parse(block: Any, where: str, defaults: dict[str, Any] | None = None
          ) -> AlignmentHparams:
  """`block` (a ConfigDict / dict / None) as `AlignmentHparams`.

  Args:
    block: the sub-block; None: every field its default.
    where: its path in the config, e.g. 'config.fixmatch.alignment', for
      errors.
    defaults: a method's own defaults for the fields `block` leaves out
      (SoftMatch and AdaMatch align by default); None: the dataclass's.
  """
  values = dict(defaults or {})
  if block is not None:
    values.update(dict(block.items()))
  return parse_block(AlignmentHparams, values, where)
