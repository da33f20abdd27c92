"""FlexMatch (docs/algorithms.md, "FlexMatch"): FixMatch with curriculum thresholds.

A FixMatch-family member (`methods/fixmatch.py`). Each train-split row n
keeps a record ŷ_n ∈ {−1, 0..C−1}: the last confident argmax of its weak view
(−1: never confident). With σ(c) = #{n in the unlabeled pool : ŷ_n = c}, N the
pool's size and N − Σ_c σ(c) the unused rows, the learning effect of class c is

  β(c) = σ(c) / max(max_c σ, N − Σ_c σ)     (thresh_warmup=True)
  β(c) = σ(c) / max_c σ                     (thresh_warmup=False)

and one step, for the weak probabilities p_i of unlabeled row i, is

  w_i = [max_c p_i ≥ τ · β(ĉ_i) / (2 − β(ĉ_i))],  ĉ_i = argmax p_i
                                                (the convex mapping; β as it
                                                 was before this batch)
  ŷ_{n(i)} ← ĉ_i  where max_c p_i ≥ τ          (then β is recomputed)
  L = CE(y_l, f(weak x_l))
      + λu · (1/μB) Σ_i w_i · CE(onehot(ĉ_i), f(strong x_u_i))

as USB's `FlexMatchThresholdingHook` (semilearn/algorithms/flexmatch): the mask
reads its stored `classwise_acc` (zeros at the start, so the first step keeps
every row), then the records are written, then β is recomputed from all of
them, and only while max(max_c σ, N − Σσ) < N (USB's `max(pseudo_counter) <
ulb_dest_len`; otherwise β keeps its value). The soft targets
(hard_labels=False) are softmax(log p / T); USB passes probabilities with
`softmax=False` and never applies its T, which is T = 1 here (the default).

The records live in the state, one int32 per train-split row (padded to the
device count), sharded along the example axis (`P('data')`) and read and
written with `r2d2_jax.table`; only the batch's rows move. The counts σ are a
replicated [C] int32 vector updated from the old and new record of each row
written, so the step never reads the whole table. A row that appears more than
once among this batch's confident rows takes the value of its last occurrence
(torch's `selected_label[idx] = ...`), and is counted once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding

from r2d2_jax import table as table_lib
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import fixmatch
from r2d2_jax.methods.base import Method, Network, Task, register, replicate_all

PyTree = Any


@dataclasses.dataclass(frozen=True)
class FlexMatchHparams(fixmatch.FixMatchHparams):
  """The `config.flexmatch` block (FixMatch's fields, and one more).

  Attributes:
    thresh_warmup: the unused rows compete in β's denominator (USB's
      `thresh_warmup`, default True); False: β(c) = σ(c) / max_c σ.
  """
  thresh_warmup: bool = True

  def __post_init__(self):
    super().__post_init__()
    if not isinstance(self.thresh_warmup, bool):
      raise ValueError(f"thresh_warmup={self.thresh_warmup!r} must be True or "
                       "False.")


def default_block() -> ml_collections.ConfigDict:
  """USB's FlexMatch: τ = 0.95, λu = 1, hard labels, thresh_warmup."""
  return fixmatch.block_of(FlexMatchHparams())


def hparams(config) -> FlexMatchHparams:
  """`config.flexmatch` (an error names a bad or unknown field)."""
  return fixmatch.hparams(config, cls=FlexMatchHparams, block="flexmatch")


def pool_size(task: Task) -> int:
  """N, the unlabeled pool's size (USB's `ulb_dest_len`)."""
  if task.unlabeled_index is None:
    raise R2D2Error("flexmatch needs the unlabeled pool "
                    "(Task.unlabeled_index).")
  return int(len(task.unlabeled_index))


def init_stats(task: Task, hp: FlexMatchHparams) -> PyTree:
  """Records all −1, counts 0, β = 0 (USB's `classwise_acc` zeros)."""
  del hp
  if task.mesh is None:
    raise R2D2Error("flexmatch keeps a per-example table: Task.mesh is "
                    "required.")
  rows = table_lib.padded_rows(task.num_train, task.mesh)
  return {"records": jnp.full((rows,), -1, jnp.int32),
          "counts": jnp.zeros((task.num_classes,), jnp.int32),
          "beta": jnp.zeros((task.num_classes,))}


def learning_effect(counts: jax.Array, beta: jax.Array, n_pool: int,
                    warmup: bool) -> jax.Array:
  """β from the counts σ; the old β where USB skips its update.

  Args:
    counts: [C] int σ(c) over the unlabeled pool.
    beta: [C] the current β (kept when max(max σ, N − Σσ) ≥ N).
    n_pool: N.
    warmup: thresh_warmup.

  Returns:
    [C] β, in `beta`'s dtype.
  """
  unused = n_pool - jnp.sum(counts)
  top = jnp.maximum(jnp.max(counts), unused)
  denom = top if warmup else jnp.max(counts)
  new = counts / jnp.maximum(denom, 1)
  return jnp.where(top < n_pool, new, beta).astype(beta.dtype)


def last_occurrence(idx: jax.Array, write: jax.Array) -> jax.Array:
  """`write`, less each row superseded by a later written row with its index."""
  pos = jnp.arange(idx.shape[0])
  later = ((idx[None, :] == idx[:, None]) & write[None, :] &
           (pos[None, :] > pos[:, None]))
  return write & ~jnp.any(later, axis=1)


def write_records(records: jax.Array, counts: jax.Array, idx: jax.Array,
                  labels: jax.Array, write: jax.Array, mesh
                  ) -> tuple[jax.Array, jax.Array]:
  """records[idx] = labels where `write` (last occurrence wins); counts follow.

  Args:
    records: [N_pad] int32, sharded `P('data')`.
    counts: [C] int32 σ, replicated.
    idx: [B] train-split rows, sharded like the batch.
    labels: [B] int the new records.
    write: [B] bool.
    mesh: the mesh.

  Returns:
    (records, counts) after the writes.
  """
  keep = last_occurrence(idx, write)
  old = table_lib.gather_rows(records, idx, mesh)
  num_classes = counts.shape[0]
  change = (jax.nn.one_hot(labels, num_classes, dtype=jnp.int32) -
            jax.nn.one_hot(old, num_classes, dtype=jnp.int32))   # −1: zeros
  counts = counts + jnp.sum(jnp.where(keep[:, None], change, 0), 0)
  labels = labels.astype(jnp.int32)
  records = table_lib.set_rows(records[:, None], idx, labels[:, None], keep,
                               mesh)[:, 0]
  return records, counts


def make_rule(task: Task) -> fixmatch.Rule:
  """FlexMatch's `Rule` over `task`'s mesh and unlabeled pool."""
  mesh, n_pool = task.mesh, pool_size(task)

  def mask(probs, stats, signals, hp):
    max_p, label = jnp.max(probs, -1), jnp.argmax(probs, -1)
    beta = stats["beta"][label]                      # before this batch
    weights = (max_p >= hp.threshold * (beta / (2.0 - beta))).astype(
        probs.dtype)
    records, counts = write_records(stats["records"], stats["counts"],
                                    signals.index_u, label,
                                    max_p >= hp.threshold, mesh)
    beta = learning_effect(counts, stats["beta"], n_pool, hp.thresh_warmup)
    return weights, {"records": records, "counts": counts, "beta": beta}

  def monitors(logits_s, weights, stats, hp):
    del weights, hp
    unused = (n_pool - jnp.sum(stats["counts"])) / n_pool
    return jnp.zeros((), logits_s.dtype), {
        "monitors/unused_records": unused.astype(jnp.float32),
        "monitors/beta_mean": jnp.mean(stats["beta"]).astype(jnp.float32)}

  return fixmatch.Rule(init_stats=init_stats, mask=mask, extra_loss=monitors)


def train_step(state: fixmatch.FixMatchState, batch, rng: jax.Array, *,
               net: Network, task: Task, hp: FlexMatchHparams):
  """The family's step (`fixmatch.make_train_step`) over FlexMatch's rule."""
  return fixmatch.make_train_step(make_rule(task))(state, batch, rng, net=net,
                                                   hp=hp)


init_state = fixmatch.make_init_state(fixmatch.Rule(init_stats=init_stats),
                                       "flexmatch")


def state_sharding(abstract_state: fixmatch.FixMatchState, mesh) -> PyTree:
  """Everything replicated but the records, sharded along the example axis."""
  shardings = replicate_all(abstract_state, mesh)
  stats = dict(shardings.stats,
               records=NamedSharding(mesh, table_lib.ROW_SPEC))
  return shardings.replace(stats=stats)


METHOD = register(Method(
    name="flexmatch", hparams=hparams, views=fixmatch.views,
    init_state=init_state, train_step=train_step,
    state_sharding=state_sharding, augment_state=fixmatch.augment_state))
