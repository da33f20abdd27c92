"""R2-D2: Deep Decipher (D2) and Repetitive Reprediction (R2).

The network θ and a table Y of pseudo-label logits (one row per training image)
are trained together by back-propagation. On a mixed batch of labeled and
unlabeled images with rows I:

  p = softmax(f(x_I; θ))     (train mode, weak augmentation)
  q = softmax(Y[I])
  L = α · mean_i KL(p_i ‖ q_i) + β · mean_i H(p_i)

θ takes an optimizer step on ∇θ L. The unlabeled rows take a plain SGD step
(no momentum, no weight decay) whose closed form is

  ∂L/∂Y_i = (α / n) (q_i − p_i),   n = rows in the mixed batch.

The label step is written `Y_i ← Y_i − label_lr · n · ∂L/∂Y_i =
Y_i − label_lr · α · (q_i − p_i)`: a row's change per visit does not depend on the
batch size or the device count. The paper's λ = 4000 at batch 512 (λ/n with
n = 512) is `label_lr = 4000 / 512 = 7.8125`, a per-visit step λα/n ≈ 0.78.

Labeled rows hold logit 10 at the true class and never change. Reprediction (R2)
overwrites the unlabeled rows with the network's logits (eval mode, no
augmentation) at the epochs in `config.r2d2.repredict_epochs` (epoch 0 of the D2
stage is the "initialise Y by prediction" of the paper).

The table lives in the state pytree, sharded along its example axis over the
mesh (`r2d2_jax.table`); the step gathers and scatters only its batch's rows.

Method 'r2d2_finetune' is the last stage: cross-entropy on every training image
with the hard label argmax Y (the table frozen). Which Y, by
`config.r2d2.finetune_labels`:
  'repredict' (the reference, DoctorKey/R2D2.pytorch
      `finetune_all_by_pseudo_label.py` with `'prediction': True`: it loads the
      R2 checkpoint and overwrites the unlabeled rows with the network's
      eval-mode predictions, `pre_pseudo_label`, before training): before step
      0 the unlabeled rows are repredicted by the network the stage starts from
      (the R2 stage's raw weights, BatchNorm running statistics, no
      augmentation); labeled rows keep logit 10 at their true class.
  'table' the table as the R2 stage left it (its last D2 updates included).
Missing key: 'repredict'. The repredicted table is checkpointed with the state,
so a resumed finetune trains on the same labels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from r2d2_jax import losses
from r2d2_jax import table as table_lib
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import supervised
from r2d2_jax.methods.base import (Context, Method, copy_network,
                                   replicate_all, step_metrics)
from r2d2_jax.state import TrainState

LABELED_LOGIT = 10.0
FINETUNE_LABELS = ("repredict", "table")


class R2D2State(TrainState):
  """A `TrainState` with the pseudo-label table.

  Attributes:
    table: [N_pad, C] float32 logits, one row per train example (rows past the
      train split are padding), sharded along rows.
    learnable: [N_pad] float32, 1 for rows the label step may change (the
      unlabeled pool minus the labeled examples), 0 otherwise.
  """
  table: jax.Array
  learnable: jax.Array


# ---------------------------------------------------------------------------
# The loss and its label gradient


def d2_loss(logits: jax.Array, rows: jax.Array, alpha: float,
            beta: float) -> jax.Array:
  """α·mean KL(softmax(logits) ‖ softmax(rows)) + β·mean H(softmax(logits))."""
  return (alpha * losses.kl_divergence(logits, rows) +
          beta * losses.entropy(logits))


def label_grad_closed_form(logits: jax.Array, rows: jax.Array,
                           alpha: float) -> jax.Array:
  """∂L/∂Y_i = (α / n)(q_i − p_i) for the n rows of the batch."""
  n = logits.shape[0]
  p = jax.nn.softmax(logits)
  q = jax.nn.softmax(rows)
  return (alpha / n) * (q - p)


def label_grad_autodiff(logits: jax.Array, rows: jax.Array, alpha: float,
                        beta: float) -> jax.Array:
  """The same gradient by `jax.grad` of `d2_loss` w.r.t. the gathered rows."""
  return jax.grad(lambda r: d2_loss(logits, r, alpha, beta))(rows)


# ---------------------------------------------------------------------------
# State


def _table_rows(ctx: Context) -> int:
  return table_lib.padded_rows(ctx.num_train, ctx.mesh)


def init_state(rng: jax.Array, ctx: Context) -> R2D2State:
  """Network as usual; table zeros with the labeled rows fixed at logit 10."""
  base = ctx.init_train_state(rng)
  n_rows = _table_rows(ctx)
  labeled = np.asarray(ctx.labeled_index)
  learn = np.zeros(n_rows, np.float32)
  learn[np.asarray(ctx.unlabeled_index)] = 1.0
  learn[labeled] = 0.0
  table = jnp.zeros((n_rows, ctx.num_classes), jnp.float32)
  labels = jnp.asarray(ctx.train_labels[labeled])
  table = table.at[jnp.asarray(labeled), labels].set(LABELED_LOGIT)
  return R2D2State(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                   table=table, learnable=jnp.asarray(learn))


def state_sharding(abstract_state: R2D2State, mesh) -> Any:
  """Network replicated; table and its mask sharded along rows."""
  shardings = replicate_all(abstract_state, mesh)
  return shardings.replace(
      table=table_lib.table_sharding(mesh),
      learnable=NamedSharding(mesh, table_lib.ROW_SPEC))


def init_from(state: R2D2State, previous: dict, ctx: Context) -> R2D2State:
  """Network from the previous stage; its table too if it had one (D2 → R2)."""
  state = copy_network(state, previous, ctx)
  if "table" in previous:
    prev = np.asarray(previous["table"])
    if prev.shape != state.table.shape:
      raise R2D2Error(
          f"init_from table has shape {prev.shape}, this stage's is "
          f"{state.table.shape} (different dataset or device count padding).")
    state = state.replace(table=jnp.asarray(prev))
  return state


# ---------------------------------------------------------------------------
# D2 step


def views(config) -> dict[str, tuple[str, ...]]:
  del config
  return {"labeled": ("weak",), "unlabeled": ("weak",)}


def train_step(state: R2D2State, batch, rng: jax.Array, ctx: Context):
  """One D2 step: the network by its optimizer, the batch's table rows by SGD."""
  cfg = ctx.config.r2d2
  alpha, beta = cfg.alpha, cfg.beta
  lab, unl = batch["labeled"], batch["unlabeled"]
  x = jnp.concatenate([lab["weak"], unl["weak"]])
  idx = jnp.concatenate([lab["index"], unl["index"]])
  rows = table_lib.gather_rows(state.table, idx, ctx.mesh)

  def loss_fn(params):
    logits, model_state = ctx.apply_train(
        {"params": params, **state.model_state}, x, rng)
    return d2_loss(logits, rows, alpha, beta), (logits, model_state)

  (loss, (logits, model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  logits = jax.lax.stop_gradient(logits)
  if cfg.get("label_grad", "closed_form") == "autodiff":
    g_rows = label_grad_autodiff(logits, rows, alpha, beta)
  else:
    g_rows = label_grad_closed_form(logits, rows, alpha)
  n = x.shape[0]
  learn = table_lib.gather_rows(state.learnable, idx, ctx.mesh)
  delta = -cfg.label_lr * n * g_rows * learn[:, None]
  metrics = step_metrics(state, grads, ctx)
  new_state = state.apply_gradients(grads, ctx.tx, model_state, ctx.ema_decay)
  new_state = new_state.replace(
      table=table_lib.scatter_add_rows(state.table, idx, delta, ctx.mesh))

  n_lab = lab["weak"].shape[0]
  p = jax.nn.softmax(logits)
  q_u = jax.nn.softmax(rows[n_lab:])
  metrics.update({
      "losses/total": loss,
      "losses/kl": losses.kl_divergence(logits, rows),
      "losses/entropy": losses.entropy(logits),
      "accuracy/train": losses.accuracy(logits[:n_lab], lab["label"]),
      "pseudo_labels/batch_accuracy": losses.accuracy(rows[n_lab:],
                                                      unl["label"]),
      "pseudo_labels/batch_max_prob": jnp.mean(jnp.max(q_u, -1)),
      "pseudo_labels/l2_step": jnp.sqrt(jnp.mean(jnp.sum(delta ** 2, -1))),
      "monitors/prediction_max_prob": jnp.mean(jnp.max(p, -1)),
  })
  return new_state, metrics


# ---------------------------------------------------------------------------
# Hooks: reprediction and whole-table diagnostics


def repredict_steps(config, steps_per_epoch: int) -> set[int]:
  """Steps (before which) the table is repredicted, from epochs in the config."""
  return {int(round(e * steps_per_epoch))
          for e in config.r2d2.get("repredict_epochs", ())}


def _compiled(stage, name: str, build):
  if name not in stage.cache:
    stage.cache[name] = build()
  return stage.cache[name]


def repredict(stage, state: R2D2State) -> R2D2State:
  """Overwrites the learnable rows with the network's logits (eval mode).

  Uses the raw weights (not the EMA), with BatchNorm running statistics and no
  augmentation, over the whole train split.
  """
  ctx, mesh = stage.ctx, stage.mesh
  from r2d2_jax import train as train_lib  # pylint: disable=g-import-not-at-top

  def build():
    def write(state, batch):
      x = train_lib.normalize(batch["image"], stage.info)
      logits = ctx.apply_eval(state.variables(), x)
      learn = table_lib.gather_rows(state.learnable, batch["index"], mesh)
      ok = batch["mask"] & (learn > 0)
      return state.replace(table=table_lib.set_rows(
          state.table, batch["index"], logits, ok, mesh))
    return jax.jit(write, donate_argnums=(0,),
                   out_shardings=stage.state_shardings)

  write = _compiled(stage, "r2d2/repredict", build)
  for batch in stage.pipeline.eval_batches(
      "train", stage.config.data.get("eval_batch_size", 500)):
    state = write(state, batch)
  return state


def table_stats(stage, state: R2D2State) -> dict[str, float]:
  """Accuracy, mean entropy and mean max probability of softmax(Y) on learnable rows."""
  mesh = stage.mesh

  def build():
    labels = np.zeros(state.table.shape[0], np.int32)
    labels[:stage.ctx.num_train] = stage.ctx.train_labels
    labels = jax.device_put(labels, NamedSharding(mesh, table_lib.ROW_SPEC))

    # The labels are an argument, not a constant: a jitted function may not
    # close over an array that spans several processes.
    def stats(table, learnable, labels):
      logq = jax.nn.log_softmax(table)
      q = jnp.exp(logq)
      w = learnable / jnp.maximum(jnp.sum(learnable), 1.0)
      correct = (jnp.argmax(table, -1) == labels).astype(jnp.float32)
      return {"pseudo_labels/accuracy": jnp.sum(w * correct),
              "pseudo_labels/entropy": jnp.sum(w * -jnp.sum(q * logq, -1)),
              "pseudo_labels/max_prob": jnp.sum(w * jnp.max(q, -1))}
    fn = jax.jit(stats, out_shardings=NamedSharding(mesh, P()))
    return lambda table, learnable: fn(table, learnable, labels)

  fn = _compiled(stage, "r2d2/stats", build)
  return {k: float(v) for k, v in
          jax.device_get(fn(state.table, state.learnable)).items()}


def r2d2_hook(stage, state: R2D2State, step: int):
  """Before step `step`: repredict if scheduled; log table statistics."""
  metrics = {}
  every = int(stage.config.get("log_every_steps", 0) or stage.total_steps)
  if step in repredict_steps(stage.config, stage.ctx.steps_per_epoch):
    before = table_stats(stage, state)
    state = repredict(stage, state)
    after = table_stats(stage, state)
    metrics.update({f"{k}_before_repredict": v for k, v in before.items()})
    metrics.update(after)
    metrics["r2d2/repredicted"] = 1.0
  elif step % every == 0:
    metrics.update(table_stats(stage, state))
  return state, metrics


METHOD = Method(name="r2d2", views=views, init_state=init_state,
                train_step=train_step, state_sharding=state_sharding,
                init_from=init_from, hooks=(r2d2_hook,))


# ---------------------------------------------------------------------------
# Finetune on argmax Y


def finetune_views(config) -> dict[str, tuple[str, ...]]:
  del config
  return {"unlabeled": ("weak",)}


def finetune_step(state: R2D2State, batch, rng: jax.Array, ctx: Context):
  """CE on every training image with label argmax Y[i] (Y frozen)."""
  b = batch["unlabeled"]
  target = jnp.argmax(table_lib.gather_rows(state.table, b["index"], ctx.mesh),
                      -1)
  state, metrics = supervised.cross_entropy_step(state, b["weak"], target, rng,
                                                 ctx)
  metrics["pseudo_labels/batch_accuracy"] = jnp.mean(
      (target == b["label"]).astype(jnp.float32))
  return state, metrics


def finetune_labels(config) -> str:
  """`config.r2d2.finetune_labels`, validated ('repredict' if missing)."""
  block = config.get("r2d2") or {}
  name = block.get("finetune_labels", "repredict") or "repredict"
  if name not in FINETUNE_LABELS:
    raise R2D2Error(f"Unknown r2d2.finetune_labels {name!r}. Valid values: "
                    f"{', '.join(FINETUNE_LABELS)}.")
  return name


def finetune_hook(stage, state: R2D2State, step: int):
  """Before finetune step 0: repredict the table if `finetune_labels` says so."""
  if step != 0 or finetune_labels(stage.config) != "repredict":
    return state, None
  before = table_stats(stage, state)
  state = repredict(stage, state)
  metrics = {f"{k}_before_repredict": v for k, v in before.items()}
  metrics.update(table_stats(stage, state))
  metrics["r2d2/repredicted"] = 1.0
  return state, metrics


def _finetune_init_from(state: R2D2State, previous: dict,
                        ctx: Context) -> R2D2State:
  finetune_labels(ctx.config)
  if "table" not in previous:
    raise R2D2Error(
        "r2d2_finetune starts from an R2-D2 stage (it needs the pseudo-label "
        "table); init_from points at a checkpoint without one.")
  return init_from(state, previous, ctx)


FINETUNE = Method(name="r2d2_finetune", views=finetune_views,
                  init_state=init_state, train_step=finetune_step,
                  state_sharding=state_sharding, init_from=_finetune_init_from,
                  hooks=(finetune_hook,))
