"""R2-D2: Deep Decipher (D2) and Repetitive Reprediction (R2).

docs/algorithms.md, "R2-D2". The network θ and a table Y of pseudo-label
logits (one row per training image) are trained together by back-propagation.
On a mixed batch of labeled and unlabeled images with rows I:

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

Config block (`config.r2d2`, parsed into `R2D2Hparams` by every R2-D2 stage):
alpha, beta, label_lr, label_grad, repredict_epochs, finetune_labels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from r2d2_jax import losses
from r2d2_jax import table as table_lib
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import supervised
from r2d2_jax.methods.base import (HookContext, Method, Network, Task,
                                   check_choice, check_range, copy_network,
                                   one_network_step, parse_block,
                                   predict_into_table,
                                   pseudo_label_monitors, register,
                                   replicate_all)
from r2d2_jax.state import TrainState

LABELED_LOGIT = 10.0
FINETUNE_LABELS = ("repredict", "table")
LABEL_GRADS = ("closed_form", "autodiff")


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
# Hyperparameters


@dataclasses.dataclass(frozen=True)
class R2D2Hparams:
  """The `config.r2d2` block (docs/algorithms.md, "R2-D2").

  Attributes:
    alpha: α, weight of KL(p ‖ q), ≥ 0.
    beta: β, weight of the entropy H(p), ≥ 0 (the paper: β/α < 1).
    label_lr: the label step per visit is label_lr·α·(q − p) (λ/n of the
      paper), ≥ 0.
    label_grad: 'closed_form' (α/n)(q − p), or 'autodiff' (jax.grad of the
      loss w.r.t. the gathered rows; the same gradient).
    repredict_epochs: epochs of the stage (≥ 0) before which the learnable rows
      are repredicted.
    finetune_labels: 'repredict' or 'table', the finetune stage's labels.
  """
  alpha: float
  beta: float
  label_lr: float
  label_grad: str = "closed_form"
  repredict_epochs: tuple[float, ...] = ()
  finetune_labels: str = "repredict"

  def __post_init__(self):
    check_range("alpha", self.alpha, 0.0)
    check_range("beta", self.beta, 0.0)
    check_range("label_lr", self.label_lr, 0.0)
    check_choice("label_grad", self.label_grad, LABEL_GRADS)
    check_choice("finetune_labels", self.finetune_labels, FINETUNE_LABELS)
    epochs = self.repredict_epochs
    if not isinstance(epochs, (tuple, list)):
      raise ValueError(f"repredict_epochs={epochs!r} must be a sequence of "
                       "epochs ≥ 0, e.g. (0,).")
    for e in epochs:
      check_range("repredict_epochs entry", e, 0.0)
    object.__setattr__(self, "repredict_epochs", tuple(epochs))


def hparams(config) -> R2D2Hparams:
  """`config.r2d2` as `R2D2Hparams` (an error names a bad or unknown field)."""
  if config.get("r2d2") is None:
    raise R2D2Error("config.r2d2 is missing; it needs alpha, beta and "
                    "label_lr (configs/common.py `r2d2_block`).")
  return parse_block(R2D2Hparams, config.r2d2, "config.r2d2")


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


def init_state(rng: jax.Array, *, net: Network, task: Task) -> R2D2State:
  """Network as usual; table zeros with the labeled rows fixed at logit 10."""
  base = net.init_train_state(rng)
  n_rows = table_lib.padded_rows(task.num_train, task.mesh)
  labeled = np.asarray(task.labeled_index)
  learn = np.zeros(n_rows, np.float32)
  learn[np.asarray(task.unlabeled_index)] = 1.0
  learn[labeled] = 0.0
  table = jnp.zeros((n_rows, task.num_classes), jnp.float32)
  labels = jnp.asarray(task.train_labels[labeled])
  table = table.at[jnp.asarray(labeled), labels].set(LABELED_LOGIT)
  return R2D2State.extending(
      base, table=table, learnable=jnp.asarray(learn))


def state_sharding(abstract_state: R2D2State, mesh) -> Any:
  """Network replicated; table and its mask sharded along rows."""
  shardings = replicate_all(abstract_state, mesh)
  return shardings.replace(
      table=table_lib.table_sharding(mesh),
      learnable=NamedSharding(mesh, table_lib.ROW_SPEC))


def init_from(state: R2D2State, previous: dict) -> R2D2State:
  """Network from the previous stage; its table too if it had one (D2 → R2)."""
  state = copy_network(state, previous)
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


def views(hp: R2D2Hparams) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak",), "unlabeled": ("weak",)}


def train_step(state: R2D2State, batch, rng: jax.Array, *, net: Network,
               task: Task, hp: R2D2Hparams):
  """One D2 step: the network by its optimizer, the batch's table rows by SGD.

  The labeled and unlabeled images go through the network in one train-mode
  forward pass (`one_network_step`); the label step reads its stop-gradient
  logits.

  Args:
    state: the network and the table.
    batch: 'labeled' and 'unlabeled' {'weak', 'label', 'index'}.
    rng: this step's key (dropout).
    net: the network.
    task: its mesh shards the table.
    hp: `config.r2d2`.

  Returns:
    (new state, metrics).
  """
  alpha, beta = hp.alpha, hp.beta
  lab, unl = batch["labeled"], batch["unlabeled"]
  idx = jnp.concatenate([lab["index"], unl["index"]])
  rows = table_lib.gather_rows(state.table, idx, task.mesh)

  def loss_fn(logits, params):
    del params
    logits = jnp.concatenate(logits)
    aux = {"losses/kl": losses.kl_divergence(logits, rows),
           "losses/entropy": losses.entropy(logits),
           "_logits": jax.lax.stop_gradient(logits)}
    return d2_loss(logits, rows, alpha, beta), aux

  new_state, metrics = one_network_step(
      state, [lab["weak"], unl["weak"]], loss_fn, rng, net,
      labels=lab["label"])
  logits = metrics.pop("_logits")
  if hp.label_grad == "autodiff":
    g_rows = label_grad_autodiff(logits, rows, alpha, beta)
  else:
    g_rows = label_grad_closed_form(logits, rows, alpha)
  n = logits.shape[0]
  learn = table_lib.gather_rows(state.learnable, idx, task.mesh)
  delta = -hp.label_lr * n * g_rows * learn[:, None]
  new_state = new_state.replace(
      table=table_lib.scatter_add_rows(state.table, idx, delta, task.mesh))

  n_lab = lab["weak"].shape[0]
  p = jax.nn.softmax(logits)
  q_u = jax.nn.softmax(rows[n_lab:])
  # Diagnostics only: the unlabeled labels never enter the loss.
  monitors = pseudo_label_monitors(rows[n_lab:], unl["label"])
  metrics.update(monitors)
  metrics.update({
      "pseudo_labels/batch_accuracy":
          monitors["monitors/pseudo_label_accuracy"],
      "pseudo_labels/batch_max_prob": jnp.mean(jnp.max(q_u, -1)),
      "pseudo_labels/l2_step": jnp.sqrt(jnp.mean(jnp.sum(delta ** 2, -1))),
      "monitors/prediction_max_prob": jnp.mean(jnp.max(p, -1)),
  })
  return new_state, metrics


# ---------------------------------------------------------------------------
# Hooks: reprediction and whole-table diagnostics


def repredict_steps(hp: R2D2Hparams, steps_per_epoch: int) -> set[int]:
  """Steps before which the table is repredicted (`hp.repredict_epochs`)."""
  return {int(round(e * steps_per_epoch)) for e in hp.repredict_epochs}


def repredict(hooks: HookContext, state: R2D2State) -> R2D2State:
  """Overwrites the learnable rows with the network's logits (eval mode).

  Uses the raw weights (not the EMA), with BatchNorm running statistics and no
  augmentation, over the whole train split.
  """
  net = hooks.net
  return predict_into_table(
      hooks, state, "r2d2/repredict",
      lambda s, x: net.apply_eval(s.variables(), x), lambda s: s.learnable)


def table_stats(hooks: HookContext, state: R2D2State) -> dict[str, float]:
  """Accuracy, mean entropy and mean max probability of softmax(Y) on learnable rows."""
  mesh, task = hooks.mesh, hooks.task

  def build():
    labels = np.zeros(state.table.shape[0], np.int32)
    labels[:task.num_train] = task.train_labels
    labels = jax.device_put(labels, NamedSharding(mesh, table_lib.ROW_SPEC))

    # The labels are an argument, not a constant: a jitted function may not
    # close over an array that spans several processes.
    def stats(table, learnable, labels):
      logq = jax.nn.log_softmax(table)
      q = jnp.exp(logq)
      w = learnable / jnp.maximum(jnp.sum(learnable), 1.0)
      # Rows without a hidden label (-1) are left out of the accuracy.
      known = learnable * (labels >= 0)
      correct = (jnp.argmax(table, -1) == labels).astype(jnp.float32)
      return {"pseudo_labels/accuracy":
                  jnp.sum(known * correct) / jnp.maximum(jnp.sum(known), 1.0),
              "pseudo_labels/entropy": jnp.sum(w * -jnp.sum(q * logq, -1)),
              "pseudo_labels/max_prob": jnp.sum(w * jnp.max(q, -1))}
    fn = jax.jit(stats, out_shardings=NamedSharding(mesh, P()))
    return lambda table, learnable: fn(table, learnable, labels)

  fn = hooks.compiled("r2d2/stats", build)
  return {k: float(v) for k, v in
          jax.device_get(fn(state.table, state.learnable)).items()}


def _repredict_logged(hooks: HookContext, state: R2D2State
                      ) -> tuple[R2D2State, dict[str, float]]:
  before = table_stats(hooks, state)
  state = repredict(hooks, state)
  metrics = {f"{k}_before_repredict": v for k, v in before.items()}
  metrics.update(table_stats(hooks, state))
  metrics["r2d2/repredicted"] = 1.0
  return state, metrics


def r2d2_hook(hooks: HookContext, state: R2D2State, step: int):
  """Before step `step`: repredict if scheduled; log table statistics."""
  if step in repredict_steps(hooks.hp, hooks.task.steps_per_epoch):
    return _repredict_logged(hooks, state)
  if step % hooks.log_every == 0:
    return state, table_stats(hooks, state)
  return state, {}


METHOD = register(Method(
    name="r2d2", hparams=hparams, views=views, init_state=init_state,
    train_step=train_step, state_sharding=state_sharding, init_from=init_from,
    hooks=(r2d2_hook,)))


# ---------------------------------------------------------------------------
# Finetune on argmax Y


def finetune_views(hp: R2D2Hparams) -> dict[str, tuple[str, ...]]:
  del hp
  return {"unlabeled": ("weak",)}


def finetune_step(state: R2D2State, batch, rng: jax.Array, *, net: Network,
                  task: Task):
  """CE on every training image with label argmax Y[i] (Y frozen)."""
  b = batch["unlabeled"]
  target = jnp.argmax(table_lib.gather_rows(state.table, b["index"], task.mesh),
                      -1)
  state, metrics = supervised.cross_entropy_step(state, b["weak"], target, rng,
                                                 net)
  # Diagnostics only: how often argmax Y is the hidden true label.
  monitors = pseudo_label_monitors(target, b["label"])
  metrics.update(monitors)
  metrics["pseudo_labels/batch_accuracy"] = monitors[
      "monitors/pseudo_label_accuracy"]
  return state, metrics


def finetune_hook(hooks: HookContext, state: R2D2State, step: int):
  """Before finetune step 0: repredict the table if `finetune_labels` asks."""
  if step != 0 or hooks.hp.finetune_labels != "repredict":
    return state, None
  return _repredict_logged(hooks, state)


def finetune_init_from(state: R2D2State, previous: dict) -> R2D2State:
  """The R2 stage's network and table (an error if it has no table)."""
  if "table" not in previous:
    raise R2D2Error(
        "r2d2_finetune starts from an R2-D2 stage (it needs the pseudo-label "
        "table); init_from points at a checkpoint without one.")
  return init_from(state, previous)


FINETUNE = register(Method(
    name="r2d2_finetune", hparams=hparams, views=finetune_views,
    init_state=init_state, train_step=finetune_step,
    state_sharding=state_sharding, init_from=finetune_init_from,
    hooks=(finetune_hook,)))
