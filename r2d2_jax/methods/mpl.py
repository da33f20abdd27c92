"""Meta Pseudo Labels (MPL, docs/algorithms.md, "Meta Pseudo Labels"): a teacher taught by its student.

Teacher T(θT) and student S(θS), the same architecture, each with its own
optimizer and schedule (the student's is `config.optimizer`, the `net` of the
stage; the teacher's `config.mpl.teacher_optimizer`, built once into
`MPLHparams.teacher_tx` / `teacher_schedule`). One jitted step:

1. The teacher runs once (train mode) on [x_l, weak x_u, strong x_u]; its
   logits on the strong view give the pseudo-labels ŷ.
2. The student takes its real optimizer step on CE(ŷ, S(strong x_u))
   (label smoothing `config.label_smoothing`).
3. The teacher's gradient is its UDA loss (`uda.uda_loss`, `config.uda`) plus
   an MPL term that depends on `config.mpl.mode`, one step function each:
   - 'exact' (`exact_step`): ŷ = softmax(T(x_u)/τ) (soft). The teacher
     minimises L_l(θS'(θT)) with θS' = θS − ηS ∇θS CE(ŷ, S(x_u; θS)) a plain
     SGD step at the student's current lr; `jax.grad` goes straight through
     that step (a Hessian-vector product).
   - 'first_order' (`first_order_step`, the paper): ŷ hard (argmax, or sampled
     from T when `config.mpl.sample_labels`). The teacher adds
     (h − b)·CE(ŷ, T(x_u)) with h held constant, h = CE_old − CE_new (student
     labeled CE before minus after its real step, `config.mpl.h =
     'difference'`) or h = ηS ⟨∇L_l(θS'), ∇CE_u(θS)⟩ (`'dot_product'`), and b
     the moving average b ← b − 0.01 (b − h). A label that lowered the
     student's labeled loss (h > b) becomes more likely under the teacher.
     `config.mpl.baseline` says which b is subtracted: 'updated' (default, the
     official code: `training_utils.py` runs `moving_dot_product_update` under
     a control dependency before `dot_product − moving_dot_product`, so this
     step's h is already in b) or 'previous' (b before this step's update).
   - 'official_compat' (`official_compat_step`): what the released TF code
     does, FOR COMPARISON ONLY: the student learns from soft teacher
     probabilities, h = CE_new − CE_old (the opposite sign to the derivation),
     and the MPL term is (h − b)·CE(stop_grad(softmax(t)), t), whose gradient
     w.r.t. the logits t is exactly zero: only the UDA and supervised losses
     train the teacher.
4. The teacher takes its optimizer step; both keep an EMA; the student's EMA is
   evaluated (accuracy/test/ema), beside its raw weights and the teacher.

The three step functions share `teacher_forward` (1), `student_step` (2) and
`teacher_update` (3, 4, the baseline and the metrics).

BatchNorm: every forward pass is in train mode (batch statistics); only the
real student step (on strong x_u) and the teacher's forward keep their updated
running statistics, the auxiliary passes (labeled CE before/after, the inner
step of 'exact') discard theirs.

Metrics: the standard lr, l2_grads, l2_params, l2_updates (the student's; the
teacher's with a '/teacher' suffix); losses/xe and losses/xeu (the teacher's
UDA parts, also logged under the official code's names
cross_entropy/teacher_on_l, cross_entropy/teacher_on_u); monitors/mask (the
teacher's UDA mask), monitors/pseudo_label_accuracy (the student's targets ŷ
against the hidden labels; _masked: over the rows the UDA mask keeps),
monitors/weight (the UDA weight); mpl/dot_product (h), mpl/moving_dot_product
(the b subtracted), mpl/term; cross_entropy/student_on_{l,l_new,u}; lr/teacher,
lr/student; losses/teacher, losses/student, losses/total.

Method 'mpl_finetune' is the last stage: the student alone, CE on the labeled
data (a plain `TrainState` started from the MPL student).
`config.mpl.finetune_from` picks which student: 'ema' (default;
kekmodel/MPL-pytorch `main.py` loads `avg_state_dict`, the EMA student, before
`finetune`, and `finetune` sets `model.drop = nn.Identity()`: configs/common.py's
`mpl_stages` gives the finetune stage `dropout_rate` 0 where the model has
dropout) or 'raw'. See docs/algorithms.md, "Meta Pseudo Labels".
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax import optim
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import supervised
from r2d2_jax.methods import uda
from r2d2_jax.methods.base import (Method, Network, Task, check_choice,
                                   check_range, copy_network,
                                   default_init_state, parse_block,
                                   pseudo_label_monitors, register,
                                   step_metrics)
from r2d2_jax.state import TrainState

PyTree = Any
MODES = ("exact", "first_order", "official_compat")
H_KINDS = ("difference", "dot_product")
BASELINES = ("updated", "previous")
FINETUNE_FROM = ("ema", "raw")


# ---------------------------------------------------------------------------
# Hyperparameters


@dataclasses.dataclass(frozen=True)
class MPLBlock:
  """The `config.mpl` block (docs/algorithms.md, "Meta Pseudo Labels").

  Attributes:
    mode: the teacher's gradient: 'exact', 'first_order' or 'official_compat'.
    teacher_optimizer: the teacher's optimizer block (`optim.make_optimizer`).
    h: 'difference' (CE_old − CE_new) or 'dot_product' (first_order only).
    sample_labels: first_order: sample ŷ from the teacher instead of argmax.
    temperature: τ of the exact mode's soft labels, > 0.
    baseline_decay: d of b ← b − d·(b − h), in [0, 1].
    baseline: 'updated' (b after this step's update, the official order) or
      'previous'.
    finetune_from: which student `mpl_finetune` starts from: 'ema' or 'raw'.
  """
  mode: str
  teacher_optimizer: Any
  h: str = "difference"
  sample_labels: bool = False
  temperature: float = 1.0
  baseline_decay: float = 0.01
  baseline: str = "updated"
  finetune_from: str = "ema"

  def __post_init__(self):
    check_choice("mode", self.mode, MODES)
    if not isinstance(self.teacher_optimizer, dict):
      raise ValueError(f"teacher_optimizer={self.teacher_optimizer!r} must be "
                       "an optimizer block (dict(name=..., lr=..., "
                       "schedule=...)).")
    check_choice("h", self.h, H_KINDS)
    if not isinstance(self.sample_labels, bool):
      raise ValueError(f"sample_labels={self.sample_labels!r} must be True or "
                       "False.")
    check_range("temperature", self.temperature, 0.0, lo_open=True)
    check_range("baseline_decay", self.baseline_decay, 0.0, 1.0)
    check_choice("baseline", self.baseline, BASELINES)
    check_choice("finetune_from", self.finetune_from, FINETUNE_FROM)


def parse_mpl_block(config: ml_collections.ConfigDict) -> MPLBlock:
  """`config.mpl` as `MPLBlock` (an error names a bad or unknown field)."""
  if config.get("mpl") is None:
    raise R2D2Error("config.mpl is missing; it needs mode and "
                    "teacher_optimizer (configs/common.py `mpl_stages`).")
  return parse_block(MPLBlock, config.mpl, "config.mpl")


@dataclasses.dataclass(frozen=True, eq=False)
class MPLHparams:
  """What the MPL step reads, parsed and built once when the stage is.

  Attributes:
    mpl: the `config.mpl` block.
    uda: the teacher's UDA loss (`config.uda`).
    label_smoothing: of the student's CE on ŷ (`config.label_smoothing`).
    teacher_tx: the teacher's optimizer, from `config.mpl.teacher_optimizer`
      over the stage's `total_steps`.
    teacher_schedule: its learning-rate schedule (logged as lr/teacher).
  """
  mpl: MPLBlock
  uda: uda.UdaHparams
  label_smoothing: float
  teacher_tx: optax.GradientTransformation
  teacher_schedule: optax.Schedule

  def teacher(self, net: Network) -> Network:
    """The teacher: the student's model and EMA decay, its own optimizer."""
    return dataclasses.replace(net, tx=self.teacher_tx,
                               schedule=self.teacher_schedule)


def hparams(config: ml_collections.ConfigDict, task: Task) -> MPLHparams:
  """config.mpl, config.uda, config.label_smoothing; the teacher's optimizer.

  Raises:
    R2D2Error: naming the field, for a bad or unknown key of either block, a
      label smoothing outside [0, 1), or a bad teacher optimizer.
  """
  block = parse_mpl_block(config)
  smoothing = supervised.hparams(config).label_smoothing
  try:
    tx, schedule = optim.make_optimizer(config.mpl.teacher_optimizer,
                                        task.total_steps)
  except (R2D2Error, ValueError, KeyError, AttributeError) as e:
    raise R2D2Error(f"config.mpl.teacher_optimizer: {e}") from None
  return MPLHparams(mpl=block, uda=uda.parse_uda(config),
                    label_smoothing=smoothing, teacher_tx=tx,
                    teacher_schedule=schedule)


@dataclasses.dataclass(frozen=True)
class FinetuneHparams:
  """The `mpl_finetune` stage: label_smoothing of its CE, finetune_from."""
  label_smoothing: float = 0.0
  finetune_from: str = "ema"


def finetune_hparams(config: ml_collections.ConfigDict) -> FinetuneHparams:
  """`config.label_smoothing` and `config.mpl.finetune_from` (default 'ema').

  The finetune stage inherits the MPL stage's `mpl` block: it is checked as
  strictly as there (every key), and read for `finetune_from` only.
  """
  which = (parse_mpl_block(config).finetune_from
           if config.get("mpl") is not None else "ema")
  return FinetuneHparams(
      label_smoothing=supervised.hparams(config).label_smoothing,
      finetune_from=which)


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
# State


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


def init_state(rng: jax.Array, *, net: Network, hp: MPLHparams) -> MPLState:
  """Teacher and student initialised independently (same architecture)."""
  k_teacher, k_student = jax.random.split(rng)
  return MPLState(step=jnp.zeros((), jnp.int32),
                  teacher=net.init_train_state(k_teacher, hp.teacher_tx),
                  student=net.init_train_state(k_student),
                  baseline=jnp.zeros((), jnp.float32))


def eval_variables(state: MPLState) -> dict[str, PyTree]:
  """The student's raw and EMA weights, and the teacher (accuracy/test/teacher)."""
  return {"raw": state.student.variables(),
          "ema": state.student.variables(ema=True),
          "teacher": state.teacher.variables()}


def init_from(state: MPLState, previous: dict) -> MPLState:
  """Starts the student (and the teacher) from a previous stage.

  From an MPL checkpoint each network continues from its own; from a
  single-network checkpoint (e.g. a supervised warm-up) both start from it.
  Optimizer states, steps and the baseline start fresh.
  """
  student = copy_network(state.student, previous)
  teacher = copy_network(state.teacher, previous.get("teacher", previous))
  return state.replace(student=student, teacher=teacher)


def views(hp) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak",), "unlabeled": ("weak", "strong")}


# ---------------------------------------------------------------------------
# The parts every mode's step is made of


class Inputs(NamedTuple):
  """One step's images and labels (`y_u`: hidden labels, diagnostics only)."""
  x_l: jax.Array
  y_l: jax.Array
  x_w: jax.Array
  x_s: jax.Array
  y_u: jax.Array


class Keys(NamedTuple):
  """One step's keys: teacher forward, student on x_u / x_l, label sampling."""
  teacher: jax.Array
  student_u: jax.Array
  student_l: jax.Array
  sample: jax.Array


def step_inputs(batch, rng: jax.Array) -> tuple[Inputs, Keys]:
  """The batch's arrays and the step's four keys (one split, in this order)."""
  lab, unl = batch["labeled"], batch["unlabeled"]
  inputs = Inputs(lab["weak"], lab["label"], unl["weak"], unl["strong"],
                  unl["label"])
  return inputs, Keys(*jax.random.split(rng, 4))


class TeacherForward(NamedTuple):
  """The teacher's one train-mode forward on [x_l, weak x_u, strong x_u].

  Attributes:
    logits: the concatenated logits.
    logits_s: the strong view's rows (ŷ comes from them).
    vjp: cotangent of `logits` ↦ (∇θT,): the backward runs once, after the
      MPL term (which needs the student's step) is known.
    model_state: the teacher's updated BatchNorm statistics (kept).
    sizes: (n_l, n_u).
  """
  logits: jax.Array
  logits_s: jax.Array
  vjp: Callable[[jax.Array], tuple[PyTree]]
  model_state: PyTree
  sizes: tuple[int, int]

  def split(self, logits: jax.Array) -> list[jax.Array]:
    """[labeled, weak, strong] rows of `logits` (this forward's or a copy)."""
    n_l, n_u = self.sizes
    return jnp.split(logits, [n_l, n_l + n_u])


def teacher_forward(teacher: TrainState, inputs: Inputs, key: jax.Array,
                    t_net: Network) -> TeacherForward:
  """Step 1: the teacher's forward pass, kept as a VJP."""
  def forward(params):
    return t_net.apply_train(
        {"params": params, **teacher.model_state},
        jnp.concatenate([inputs.x_l, inputs.x_w, inputs.x_s]), key)

  logits, vjp, model_state = jax.vjp(forward, teacher.params, has_aux=True)
  sizes = (inputs.x_l.shape[0], inputs.x_w.shape[0])
  return TeacherForward(logits, logits[sum(sizes):], vjp, model_state, sizes)


def labeled_ce(student: TrainState, inputs: Inputs, key: jax.Array,
               net: Network) -> Callable[[PyTree], jax.Array]:
  """θS ↦ CE(y_l, S(x_l; θS)): train mode, BatchNorm updates discarded.

  One dropout key for every call, so "before" and "after" see the same mask.
  """
  def ce_l(params):
    logits = net.apply_train({"params": params, **student.model_state},
                             inputs.x_l, key)[0]
    return losses.cross_entropy(logits, inputs.y_l)
  return ce_l


class StudentStep(NamedTuple):
  """Step 2: the student's real step on CE(ŷ, S(strong x_u)).

  Attributes:
    new: the student after its optimizer step and EMA update.
    grads: ∇θS CE(ŷ, S(x_s; θS)).
    loss: CE(ŷ, S(x_s; θS)).
    lr: ηS, the student's lr at this step.
    targets_vjp: with `linearize`, cotangent of `grads` ↦ (cotangent of ŷ,):
      the transpose of the inner backward that 'exact' differentiates through.
  """
  new: TrainState
  grads: PyTree
  loss: jax.Array
  lr: jax.Array
  targets_vjp: Callable[[PyTree], tuple[jax.Array]] | None


def student_step(student: TrainState, inputs: Inputs, targets: jax.Array,
                 key: jax.Array, net: Network, hp: MPLHparams, *,
                 linearize: bool = False) -> StudentStep:
  """Step 2: the student's optimizer step on ŷ (BatchNorm statistics kept).

  With `linearize` ('exact'), the gradient is computed linearised in ŷ: the
  inner SGD step of 'exact' differentiates ∇θS CE(ŷ, S(x_s; θS)) at the same
  θS, x_s, dropout key and ŷ as this real step, so one backward serves both
  (its transpose is the meta-gradient).
  """
  def loss(params, y):
    logits, model_state = net.apply_train(
        {"params": params, **student.model_state}, inputs.x_s, key)
    return losses.soft_cross_entropy(
        logits, y, label_smoothing=hp.label_smoothing), model_state

  if linearize:
    def grad_of_targets(y):
      (value, model_state), grads = jax.value_and_grad(
          loss, has_aux=True)(student.params, y)
      return grads, (value, model_state)

    grads, targets_vjp, (value, model_state) = jax.vjp(
        grad_of_targets, targets, has_aux=True)
  else:
    (value, model_state), grads = jax.value_and_grad(
        loss, has_aux=True)(student.params, targets)
    targets_vjp = None
  new = student.apply_gradients(grads, net.tx, model_state, net.ema_decay)
  return StudentStep(new, grads, value, net.schedule(student.step),
                     targets_vjp)


MPLTerm = Callable[[jax.Array, jax.Array], jax.Array]


def teacher_update(state: MPLState, inputs: Inputs, fwd: TeacherForward,
                   targets: jax.Array, s: StudentStep, ce_old_new, h,
                   mpl_term: MPLTerm, *, net: Network, hp: MPLHparams
                   ) -> tuple[MPLState, dict[str, jax.Array]]:
  """Steps 3 and 4: the baseline, the teacher's loss and step, the metrics.

  Args:
    state: the state before the step.
    inputs: the step's batch.
    fwd: the teacher's forward.
    targets: ŷ, the labels the student trained on.
    s: the student's step.
    ce_old_new: the student's labeled CE before and after its step (logged).
    h: the mode's h (held constant; logged as mpl/dot_product).
    mpl_term: (strong-view teacher logits, h − b) ↦ the mode's MPL term, added
      to the teacher's UDA loss.
    net: the student network (the teacher's is `hp.teacher(net)`).
    hp: the hyperparameters.

  Returns:
    (new state, metrics).
  """
  t_net = hp.teacher(net)
  teacher = state.teacher
  h = jax.lax.stop_gradient(h)
  new_baseline = update_baseline(state.baseline, h, hp.mpl.baseline_decay)
  subtracted = (new_baseline if hp.mpl.baseline == "updated"
                else state.baseline)
  coef = h - subtracted
  weight = hp.uda.weight_at(state.step)

  def t_loss(logits):
    tl, tw, ts = fwd.split(logits)
    uda_total, aux = uda.uda_loss(tl, inputs.y_l, tw, ts, weight=weight,
                                  **hp.uda.loss_kwargs())
    term = mpl_term(ts, coef)
    return uda_total + term, (aux, term)

  (t_total, (aux, term)), g_logits = jax.value_and_grad(
      t_loss, has_aux=True)(fwd.logits)
  (t_grads,) = fwd.vjp(g_logits)
  new_teacher = teacher.apply_gradients(t_grads, t_net.tx, fwd.model_state,
                                        t_net.ema_decay)

  ce_old, ce_new = ce_old_new
  student_m = step_metrics(state.student, s.new, s.grads, net)
  teacher_m = step_metrics(teacher, new_teacher, t_grads, t_net)
  metrics = dict(student_m)
  metrics.update({f"{k}/teacher": v for k, v in teacher_m.items()})
  metrics.update({f"{k}/student": v for k, v in student_m.items()})
  metrics.update(pseudo_label_monitors(targets, inputs.y_u, aux["mask"]))
  metrics.update({
      "mpl/dot_product": h,
      "mpl/moving_dot_product": subtracted,
      "mpl/term": term,
      "losses/xe": aux["losses/xe"],
      "losses/xeu": aux["losses/xeu"],
      "cross_entropy/teacher_on_l": aux["losses/xe"],
      "cross_entropy/teacher_on_u": aux["losses/xeu"],
      "cross_entropy/student_on_l": ce_old,
      "cross_entropy/student_on_l_new": ce_new,
      "cross_entropy/student_on_u": s.loss,
      "monitors/weight": weight,
      "losses/teacher": t_total,
      "losses/student": s.loss,
      "losses/total": t_total + s.loss,
  })
  new_state = state.replace(step=state.step + 1, teacher=new_teacher,
                            student=s.new, baseline=new_baseline)
  return new_state, metrics


# ---------------------------------------------------------------------------
# One step per mode


def exact_step(state: MPLState, batch, rng: jax.Array, *, net: Network,
               hp: MPLHparams):
  """'exact': the teacher minimises L_l(θS − ηS ∇θS CE_u(θS, softmax(t/τ)))."""
  inputs, keys = step_inputs(batch, rng)
  student = state.student
  fwd = teacher_forward(state.teacher, inputs, keys.teacher, hp.teacher(net))
  soft = lambda ts: pseudo_labels(ts, "exact", temperature=hp.mpl.temperature)
  targets = jax.lax.stop_gradient(soft(fwd.logits_s))
  s = student_step(student, inputs, targets, keys.student_u, net, hp,
                   linearize=True)
  ce_l = labeled_ce(student, inputs, keys.student_l, net)
  h, ce_old, ce_new = h_difference(ce_l, student.params, s.new.params)

  # L_l(θS'), θS' = θS − ηS ∇θS CE_u(θS, ŷ), and ∂L_l(θS')/∂ŷ.
  stepped = meta.sgd_step(student.params, s.grads, s.lr)
  exact_term, g_stepped = jax.value_and_grad(ce_l)(stepped)
  (g_targets,) = s.targets_vjp(jax.tree.map(lambda g: -s.lr * g, g_stepped))

  def mpl_term(ts, coef):
    del coef  # 'exact' has no baseline.
    # Value L_l(θS'); gradient w.r.t. ts: ∂L_l(θS')/∂ŷ through the softmax.
    surrogate = jnp.vdot(jax.lax.stop_gradient(g_targets), soft(ts))
    return exact_term + surrogate - jax.lax.stop_gradient(surrogate)

  return teacher_update(state, inputs, fwd, targets, s, (ce_old, ce_new), h,
                        mpl_term, net=net, hp=hp)


def first_order_step(state: MPLState, batch, rng: jax.Array, *, net: Network,
                     hp: MPLHparams):
  """'first_order' (the paper): the teacher adds (h − b)·CE(ŷ, T(x_u))."""
  inputs, keys = step_inputs(batch, rng)
  student = state.student
  fwd = teacher_forward(state.teacher, inputs, keys.teacher, hp.teacher(net))
  targets = jax.lax.stop_gradient(pseudo_labels(
      fwd.logits_s, "first_order", sample=hp.mpl.sample_labels,
      rng=keys.sample))
  s = student_step(student, inputs, targets, keys.student_u, net, hp)
  ce_l = labeled_ce(student, inputs, keys.student_l, net)
  h, ce_old, ce_new = h_difference(ce_l, student.params, s.new.params)
  if hp.mpl.h == "dot_product":
    h = h_dot_product(ce_l, student.params, s.grads, s.lr)
  return teacher_update(
      state, inputs, fwd, targets, s, (ce_old, ce_new), h,
      lambda ts, coef: first_order_term(ts, targets, coef), net=net, hp=hp)


def official_compat_step(state: MPLState, batch, rng: jax.Array, *,
                         net: Network, hp: MPLHparams):
  """'official_compat': the released code; its MPL term has zero gradient."""
  inputs, keys = step_inputs(batch, rng)
  student = state.student
  fwd = teacher_forward(state.teacher, inputs, keys.teacher, hp.teacher(net))
  targets = jax.lax.stop_gradient(pseudo_labels(fwd.logits_s,
                                                "official_compat"))
  s = student_step(student, inputs, targets, keys.student_u, net, hp)
  ce_l = labeled_ce(student, inputs, keys.student_l, net)
  h_diff, ce_old, ce_new = h_difference(ce_l, student.params, s.new.params)
  return teacher_update(state, inputs, fwd, targets, s, (ce_old, ce_new),
                        -h_diff,  # CE_new − CE_old, as released.
                        official_compat_term, net=net, hp=hp)


MODE_STEPS = {"exact": exact_step, "first_order": first_order_step,
              "official_compat": official_compat_step}


def train_step(state: MPLState, batch, rng: jax.Array, *, net: Network,
               hp: MPLHparams):
  """One MPL step of `config.mpl.mode`: the student's step, then the teacher's.

  Args:
    state: teacher, student and baseline.
    batch: 'labeled' {'weak', 'label'} and 'unlabeled' {'weak', 'strong',
      'label'} (the unlabeled labels only feed the monitors).
    rng: this step's key (dropout, label sampling).
    net: the student network (`hp.teacher(net)` is the teacher's).
    hp: `MPLHparams`.

  Returns:
    (new state, metrics; module docstring).
  """
  return MODE_STEPS[hp.mpl.mode](state, batch, rng, net=net, hp=hp)


METHOD = register(Method(name="mpl", hparams=hparams, views=views,
                         init_state=init_state, train_step=train_step,
                         eval_variables=eval_variables, init_from=init_from))


# ---------------------------------------------------------------------------
# The finetune stage


def finetune_init_from(state: TrainState, previous: dict, *,
                       hp: FinetuneHparams) -> TrainState:
  """Starts the finetune student from the MPL student's EMA or raw weights.

  `config.mpl.finetune_from`: 'ema' (default, kekmodel's choice) copies the
  EMA weights and EMA BatchNorm statistics into both the raw and the EMA slots;
  'raw' copies the raw weights (and the EMA into the EMA slot). A previous
  stage without a student (e.g. a supervised warm-up) is copied as it is.
  """
  state = copy_network(state, previous)
  if hp.finetune_from == "ema":
    # Copies: the step donates its state, and one buffer must not fill two
    # donated slots.
    state = state.replace(
        params=jax.tree.map(jnp.copy, state.ema_params),
        model_state=jax.tree.map(jnp.copy, state.ema_model_state))
  return state


def finetune_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
                  hp: FinetuneHparams):
  """One step on CE(y_l, S(weak x_l)); label smoothing: hp.label_smoothing."""
  return supervised.cross_entropy_step(
      state, batch["labeled"]["weak"], batch["labeled"]["label"], rng, net,
      hp.label_smoothing)


def finetune_views(hp: FinetuneHparams) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("weak",)}


# The last stage: the student alone on the labeled data, started from the MPL
# student (`previous['student']`) by `finetune_init_from`.
FINETUNE = register(Method(name="mpl_finetune", hparams=finetune_hparams,
                           views=finetune_views,
                           init_state=default_init_state,
                           train_step=finetune_step,
                           init_from=finetune_init_from))
