"""Meta Pseudo Labels (MPL, docs/algorithms.md, "Meta Pseudo Labels"): a teacher taught by its student.

Teacher T(θT) and student S(θS), the same architecture, each with its own
optimizer and schedule (the student's is `config.optimizer`, the teacher's
`config.mpl.teacher_optimizer`). One jitted step:

1. The teacher runs once (train mode) on [x_l, weak x_u, strong x_u]; its
   logits on the strong view give the pseudo-labels ŷ.
2. The student takes its real optimizer step on CE(ŷ, S(strong x_u))
   (label smoothing `config.label_smoothing`).
3. The teacher's gradient is its UDA loss (`uda.uda_loss`, `config.uda`) plus
   an MPL term that depends on `config.mpl.mode`:
   - 'exact': ŷ = softmax(T(x_u)/τ) (soft). The teacher minimises
     L_l(θS'(θT)) with θS' = θS − ηS ∇θS CE(ŷ, S(x_u; θS)) a plain SGD step at
     the student's current lr; `jax.grad` goes straight through that step (a
     Hessian-vector product).
   - 'first_order' (the paper): ŷ hard (argmax, or sampled from T when
     `config.mpl.sample_labels`). The teacher adds (h − b)·CE(ŷ, T(x_u)) with h
     held constant, h = CE_old − CE_new (student labeled CE before minus after
     its real step, `config.mpl.h = 'difference'`) or
     h = ηS ⟨∇L_l(θS'), ∇CE_u(θS)⟩ (`'dot_product'`), and b the moving average
     b ← b − 0.01 (b − h). A label that lowered the student's labeled loss
     (h > b) becomes more likely under the teacher.
     `config.mpl.baseline` says which b is subtracted: 'updated' (default, the
     official code: `training_utils.py` runs `moving_dot_product_update` under
     a control dependency before `dot_product − moving_dot_product`, so this
     step's h is already in b) or 'previous' (b before this step's update).
   - 'official_compat': what the released TF code does, FOR COMPARISON ONLY:
     the student learns from soft teacher probabilities, h = CE_new − CE_old
     (the opposite sign to the derivation), and the MPL term is
     (h − b)·CE(stop_grad(softmax(t)), t), whose gradient w.r.t. the logits t is
     exactly zero: only the UDA and supervised losses train the teacher.
4. The teacher takes its optimizer step; both keep an EMA; the student's EMA is
   evaluated (accuracy/test/ema), beside its raw weights and the teacher.

BatchNorm: every forward pass is in train mode (batch statistics); only the
real student step (on strong x_u) and the teacher's forward keep their updated
running statistics, the auxiliary passes (labeled CE before/after, the inner
step of 'exact') discard theirs.

Method 'mpl_finetune' is the last stage: the student alone, CE on the labeled
data (a plain `TrainState` started from the MPL student).
`config.mpl.finetune_from` picks which student: 'ema' (default;
kekmodel/MPL-pytorch `main.py` loads `avg_state_dict`, the EMA student, before
`finetune`, and `finetune` sets `model.drop = nn.Identity()`: configs/common.py's
`mpl_stages` gives the finetune stage `dropout_rate` 0 where the model has
dropout) or 'raw'. See docs/algorithms.md, "Meta Pseudo Labels".
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import struct

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax import optim
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import supervised
from r2d2_jax.methods import uda
from r2d2_jax.methods.base import (Context, Method, copy_network, step_metrics)
from r2d2_jax.state import TrainState

PyTree = Any
MODES = ("exact", "first_order", "official_compat")
H_KINDS = ("difference", "dot_product")
BASELINES = ("updated", "previous")
FINETUNE_FROM = ("ema", "raw")


class MPLState(struct.PyTreeNode):
  """Teacher and student side by side.

  Attributes:
    step: MPL steps taken (int32 scalar).
    teacher: the teacher network and its optimizer state.
    student: the student network (its EMA is what is evaluated).
    baseline: moving average b of h (float32 scalar).
  """
  step: jax.Array
  teacher: TrainState
  student: TrainState
  baseline: jax.Array


# ---------------------------------------------------------------------------
# Pure pieces (tested directly in tests/test_mpl.py)


def pseudo_labels(t_logits_u: jax.Array, mode: str, *, temperature: float = 1.0,
                  sample: bool = False, rng: jax.Array | None = None
                  ) -> jax.Array:
  """The targets ŷ [B, C] the student trains on, from the teacher's logits.

  Args:
    t_logits_u: teacher logits on the unlabeled batch.
    mode: 'exact' (softmax(t/τ)), 'first_order' (one-hot argmax, or a sample
      from softmax(t) when `sample`), 'official_compat' (softmax(t)).
    temperature: τ of 'exact'.
    sample: sample hard labels instead of the argmax ('first_order').
    rng: key for sampling.

  Returns:
    Target distributions; differentiable in `t_logits_u` only for 'exact'.
  """
  if mode == "exact":
    return jax.nn.softmax(t_logits_u / temperature)
  t = jax.lax.stop_gradient(t_logits_u)
  if mode == "official_compat":
    return jax.nn.softmax(t)
  if sample:
    labels = jax.random.categorical(rng, t)
  else:
    labels = jnp.argmax(t, -1)
  return jax.nn.one_hot(labels, t.shape[-1], dtype=t.dtype)


def labeled_loss_after_step(targets: jax.Array, student_params: PyTree,
                            ce_u_fn: Callable[[PyTree, jax.Array], jax.Array],
                            ce_l_fn: Callable[[PyTree], jax.Array],
                            lr: jax.Array | float) -> jax.Array:
  """L_l(θS') with θS' = θS − lr·∇θS CE_u(θS, targets): the teacher's objective.

  Args:
    targets: ŷ; the result is differentiable in them through the SGD step.
    student_params: θS.
    ce_u_fn: (θS, ŷ) ↦ CE(ŷ, S(x_u; θS)).
    ce_l_fn: θS ↦ CE(y_l, S(x_l; θS)).
    lr: ηS.

  Returns:
    The student's labeled CE after one plain SGD step on the pseudo-labels.

  This is the reference form of the objective. `train_step` computes the same
  value and its gradient fused with the student's real step (one backward
  pass, linearised in ŷ); tests/test_mpl.py checks that the two agree.
  """
  stepped = meta.inner_step(ce_u_fn, student_params, lr, targets)
  return ce_l_fn(stepped)


def exact_teacher_grad(teacher_params: PyTree,
                       teacher_logits_fn: Callable[[PyTree], jax.Array],
                       student_params: PyTree,
                       ce_u_fn: Callable[[PyTree, jax.Array], jax.Array],
                       ce_l_fn: Callable[[PyTree], jax.Array],
                       lr: jax.Array | float, temperature: float = 1.0
                       ) -> PyTree:
  """∇θT L_l(θS'(θT)) of 'exact' mode, without the UDA part.

  Args:
    teacher_params: θT.
    teacher_logits_fn: θT ↦ T(x_u; θT).
    student_params, ce_u_fn, ce_l_fn, lr: as in `labeled_loss_after_step`.
    temperature: τ of the soft labels.

  Returns:
    The gradient, shaped like `teacher_params`.
  """
  def objective(tp):
    targets = pseudo_labels(teacher_logits_fn(tp), "exact",
                            temperature=temperature)
    return labeled_loss_after_step(targets, student_params, ce_u_fn, ce_l_fn,
                                   lr)
  return jax.grad(objective)(teacher_params)


def h_dot_product(ce_l_fn: Callable[[PyTree], jax.Array],
                  student_params: PyTree, grads_u: PyTree,
                  lr: jax.Array | float) -> jax.Array:
  """h = ηS·⟨∇L_l(θS'), ∇CE_u(θS)⟩ with θS' = θS − ηS ∇CE_u(θS).

  Args:
    ce_l_fn: θS ↦ the student's labeled CE.
    student_params: θS.
    grads_u: ∇θS CE(ŷ, S(x_u; θS)), the gradient of the student's step.
    lr: ηS.

  Returns:
    The scalar h of the paper's appendix (first-order MPL).
  """
  stepped = meta.sgd_step(student_params, grads_u, lr)
  return lr * meta.tree_dot(jax.grad(ce_l_fn)(stepped), grads_u)


def h_difference(ce_l_fn: Callable[[PyTree], jax.Array], old_params: PyTree,
                 new_params: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
  """h = CE_old − CE_new, the student's labeled CE before minus after its step.

  Returns:
    (h, CE_old, CE_new).
  """
  old, new = ce_l_fn(old_params), ce_l_fn(new_params)
  return old - new, old, new


def first_order_term(t_logits_u: jax.Array, targets: jax.Array,
                     coef: jax.Array) -> jax.Array:
  """(h − b)·CE(ŷ, T(x_u)), the teacher's REINFORCE term; `coef` held constant."""
  return jax.lax.stop_gradient(coef) * losses.soft_cross_entropy(
      t_logits_u, jax.lax.stop_gradient(targets))


def official_compat_term(t_logits_u: jax.Array, coef: jax.Array) -> jax.Array:
  """The released code's MPL term h·CE(stop_grad(softmax(t)), t): zero grad."""
  targets = jax.lax.stop_gradient(jax.nn.softmax(t_logits_u))
  return jax.lax.stop_gradient(coef) * losses.soft_cross_entropy(
      t_logits_u, targets)


def update_baseline(baseline: jax.Array, h: jax.Array,
                    decay: float = 0.01) -> jax.Array:
  """b ← b − decay·(b − h)."""
  return baseline - decay * (baseline - h)


# ---------------------------------------------------------------------------
# Optimizers and state


def teacher_optimizer(ctx: Context
                      ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The teacher's (tx, schedule) from `config.mpl.teacher_optimizer`.

  Rebuilt on each call: optax transformations are pure, so building them inside
  a traced step costs nothing at run time and keeps the step a function of
  (state, batch, rng, ctx) only.
  """
  return optim.make_optimizer(ctx.config.mpl.teacher_optimizer,
                              ctx.total_steps)


def _check_config(ctx: Context) -> None:
  cfg = ctx.config.mpl
  if cfg.mode not in MODES:
    raise R2D2Error(f"config.mpl.mode={cfg.mode!r}; choose one of {MODES}.")
  if cfg.get("h", "difference") not in H_KINDS:
    raise R2D2Error(f"config.mpl.h={cfg.h!r}; choose one of {H_KINDS}.")
  if cfg.get("baseline", "updated") not in BASELINES:
    raise R2D2Error(f"config.mpl.baseline={cfg.baseline!r}; choose one of "
                    f"{BASELINES}.")


def init_state(rng: jax.Array, ctx: Context) -> MPLState:
  """Teacher and student initialised independently (same architecture)."""
  _check_config(ctx)
  k_teacher, k_student = jax.random.split(rng)
  t_tx, _ = teacher_optimizer(ctx)
  x = jnp.zeros((1, *ctx.image_shape), jnp.float32)
  t_vars = ctx.model.init({"params": k_teacher, **ctx.rngs(k_teacher)}, x,
                          train=False)
  return MPLState(step=jnp.zeros((), jnp.int32),
                  teacher=TrainState.create(t_vars, t_tx),
                  student=ctx.init_train_state(k_student),
                  baseline=jnp.zeros((), jnp.float32))


def eval_variables(state: MPLState) -> dict[str, PyTree]:
  """The student's raw and EMA weights, and the teacher (accuracy/test/teacher)."""
  return {"raw": state.student.variables(),
          "ema": state.student.variables(ema=True),
          "teacher": state.teacher.variables()}


def init_from(state: MPLState, previous: dict, ctx: Context) -> MPLState:
  """Starts the student (and the teacher) from a previous stage.

  From an MPL checkpoint each network continues from its own; from a
  single-network checkpoint (e.g. a supervised warm-up) both start from it.
  Optimizer states, steps and the baseline start fresh.
  """
  student = copy_network(state.student, previous, ctx)
  teacher = copy_network(state.teacher, previous.get("teacher", previous), ctx)
  return state.replace(student=student, teacher=teacher)


def views(config) -> dict[str, tuple[str, ...]]:
  del config
  return {"labeled": ("weak",), "unlabeled": ("weak", "strong")}


# ---------------------------------------------------------------------------
# The step


def train_step(state: MPLState, batch, rng: jax.Array, ctx: Context):
  """One MPL step: the student's real step, then the teacher's (module doc).

  Args:
    state: teacher, student and baseline.
    batch: 'labeled' {'weak', 'label'} and 'unlabeled' {'weak', 'strong',
      'label'} (the unlabeled labels only feed `pseudo_labels/accuracy`).
    rng: this step's key (dropout, label sampling).
    ctx: the stage's context; `ctx.tx` / `ctx.schedule` are the student's.

  Returns:
    (new state, metrics).
  """
  _check_config(ctx)
  cfg = ctx.config.mpl
  mode = cfg.mode
  t_tx, t_schedule = teacher_optimizer(ctx)
  lab, unl = batch["labeled"], batch["unlabeled"]
  x_l, y_l = lab["weak"], lab["label"]
  x_w, x_s = unl["weak"], unl["strong"]
  n_l, n_u = x_l.shape[0], x_w.shape[0]
  k_teacher, k_su, k_sl, k_sample = jax.random.split(rng, 4)
  teacher, student = state.teacher, state.student
  s_lr = ctx.schedule(student.step)
  smoothing = ctx.config.get("label_smoothing", 0.0)

  # Student passes that only measure: train mode, BN updates discarded. One
  # dropout key per input, so "before" and "after" see the same mask.
  def s_logits(params, x, key):
    return ctx.apply_train({"params": params, **student.model_state}, x,
                           key)[0]

  def ce_l_fn(params):
    return losses.cross_entropy(s_logits(params, x_l, k_sl), y_l)

  # 1. The teacher's forward, kept as a VJP: its backward runs once, after
  # the MPL coefficient (which needs the student's step) is known.
  def t_forward(params):
    return ctx.apply_train({"params": params, **teacher.model_state},
                           jnp.concatenate([x_l, x_w, x_s]), k_teacher)

  t_logits, t_vjp, t_model_state = jax.vjp(t_forward, teacher.params,
                                           has_aux=True)
  t_l, t_w, t_s = jnp.split(t_logits, [n_l, n_l + n_u])
  targets = jax.lax.stop_gradient(pseudo_labels(
      t_s, mode, temperature=cfg.get("temperature", 1.0),
      sample=cfg.get("sample_labels", False), rng=k_sample))

  # 2. The student's real step (BN statistics kept).
  def s_loss(params, targets):
    logits, model_state = ctx.apply_train(
        {"params": params, **student.model_state}, x_s, k_su)
    return losses.soft_cross_entropy(logits, targets,
                                     label_smoothing=smoothing), model_state

  if mode == "exact":
    # The inner SGD step of 'exact' differentiates ∇θS CE(ŷ, S(x_s; θS)) at
    # the same θS, x_s, dropout key and ŷ as this real step: compute that
    # gradient once, linearised in ŷ (its transpose is the meta-gradient).
    def s_grad(y):
      (loss, model_state), grads = jax.value_and_grad(
          s_loss, has_aux=True)(student.params, y)
      return grads, (loss, model_state)

    s_grads, inner_vjp, (s_loss_u, s_model_state) = jax.vjp(
        s_grad, targets, has_aux=True)
  else:
    (s_loss_u, s_model_state), s_grads = jax.value_and_grad(
        s_loss, has_aux=True)(student.params, targets)
  new_student = student.apply_gradients(s_grads, ctx.tx, s_model_state,
                                        ctx.ema_decay)

  # h: always measured on the real step (logged); the mode decides what the
  # teacher uses.
  h_diff, ce_old, ce_new = h_difference(ce_l_fn, student.params,
                                        new_student.params)
  if mode == "official_compat":
    h = -h_diff  # CE_new − CE_old, as released.
  elif mode == "first_order" and cfg.get("h", "difference") == "dot_product":
    h = h_dot_product(ce_l_fn, student.params, s_grads, s_lr)
  else:
    h = h_diff
  h = jax.lax.stop_gradient(h)
  new_baseline = update_baseline(state.baseline, h,
                                 cfg.get("baseline_decay", 0.01))
  subtracted = (new_baseline if cfg.get("baseline", "updated") == "updated"
                else state.baseline)
  coef = h - subtracted

  # 3. The teacher's loss as a function of its logits.
  weight = uda.uda_weight(state.step, ctx.config)
  if mode == "exact":
    # L_l(θS'), θS' = θS − ηS ∇θS CE_u(θS, ŷ), and ∂L_l(θS')/∂ŷ.
    stepped = meta.sgd_step(student.params, s_grads, s_lr)
    exact_term, g_stepped = jax.value_and_grad(ce_l_fn)(stepped)
    (g_targets,) = inner_vjp(jax.tree.map(lambda g: -s_lr * g, g_stepped))

  def t_loss(logits):
    tl, tw, ts = jnp.split(logits, [n_l, n_l + n_u])
    uda_total, aux = uda.uda_loss(tl, y_l, tw, ts, weight=weight,
                                  **uda.uda_kwargs(ctx.config))
    if mode == "exact":
      soft = pseudo_labels(ts, "exact", temperature=cfg.get("temperature", 1.0))
      # Value L_l(θS'); gradient w.r.t. ts: ∂L_l(θS')/∂ŷ through the softmax.
      surrogate = jnp.vdot(jax.lax.stop_gradient(g_targets), soft)
      mpl_term = exact_term + surrogate - jax.lax.stop_gradient(surrogate)
    elif mode == "first_order":
      mpl_term = first_order_term(ts, targets, coef)
    else:
      mpl_term = official_compat_term(ts, coef)
    return uda_total + mpl_term, (aux, mpl_term)

  (t_total, (aux, mpl_term)), g_logits = jax.value_and_grad(
      t_loss, has_aux=True)(t_logits)
  (t_grads,) = t_vjp(g_logits)
  new_teacher = teacher.apply_gradients(t_grads, t_tx, t_model_state,
                                        ctx.ema_decay)

  metrics = step_metrics(student, s_grads, ctx)
  metrics.update({
      "mpl/dot_product": h,
      "mpl/moving_dot_product": subtracted,
      "mpl/term": mpl_term,
      "cross_entropy/teacher_on_l": aux["losses/xe"],
      "cross_entropy/teacher_on_u": aux["losses/uda"],
      "cross_entropy/student_on_l": ce_old,
      "cross_entropy/student_on_l_new": ce_new,
      "cross_entropy/student_on_u": s_loss_u,
      "lr/teacher": t_schedule(teacher.step),
      "lr/student": s_lr,
      "uda/mask": aux["uda/mask"],
      "uda/weight": weight,
      # Diagnostics only: the unlabeled rows' true labels never train anything.
      "pseudo_labels/accuracy": losses.accuracy(t_s, unl["label"]),
      "losses/teacher": t_total,
      "losses/student": s_loss_u,
      "losses/total": t_total + s_loss_u,
      "l2_grads/teacher": optax.tree.norm(t_grads),
      "l2_grads/student": metrics["l2_grads"],
      "l2_params/teacher": optax.tree.norm(teacher.params),
      "l2_params/student": metrics["l2_params"],
  })
  new_state = state.replace(
      step=state.step + 1, teacher=new_teacher, student=new_student,
      baseline=new_baseline)
  return new_state, metrics


METHOD = Method(name="mpl", views=views, init_state=init_state,
                train_step=train_step, eval_variables=eval_variables,
                init_from=init_from)

def finetune_init_from(state: TrainState, previous: dict,
                       ctx: Context) -> TrainState:
  """Starts the finetune student from the MPL student's EMA or raw weights.

  `config.mpl.finetune_from`: 'ema' (default, kekmodel's choice) copies the
  EMA weights and EMA BatchNorm statistics into both the raw and the EMA slots;
  'raw' copies the raw weights (and the EMA into the EMA slot). A previous
  stage without a student (e.g. a supervised warm-up) is copied as it is.
  """
  block = ctx.config.get("mpl") or {}
  which = block.get("finetune_from", "ema") or "ema"
  if which not in FINETUNE_FROM:
    raise R2D2Error(f"config.mpl.finetune_from={which!r}; choose one of "
                    f"{FINETUNE_FROM}.")
  state = copy_network(state, previous, ctx)
  if which == "ema":
    # Copies: the step donates its state, and one buffer must not fill two
    # donated slots.
    state = state.replace(
        params=jax.tree.map(jnp.copy, state.ema_params),
        model_state=jax.tree.map(jnp.copy, state.ema_model_state))
  return state


# The last stage: the student alone on the labeled data (CE, optional label
# smoothing `config.label_smoothing`), started from the MPL student
# (`previous['student']`) by `finetune_init_from`.
FINETUNE = Method(name="mpl_finetune", views=supervised.views,
                  init_state=supervised.default_init_state,
                  train_step=supervised.train_step,
                  init_from=finetune_init_from)
