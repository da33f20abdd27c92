"""Noisy Student: a round of self-training from a frozen teacher's table (docs/algorithms.md, "Noisy Student").

Method 'noisy_student', block `config.noisy_student`. One stage is one round
(Xie et al. 2020; google-research/noisystudent `main.py`, `filter_unlabel.py`):

1. Before the first step (hook `label_pool`), the frozen, unnoised teacher T
   (eval mode: BatchNorm running statistics, no dropout, no stochastic depth;
   unaugmented images) predicts every row of the unlabeled pool. Its logits
   fill a per-example table in the state (`[N, C]`, sharded along rows by
   `r2d2_jax.table`, like R2-D2's); other rows stay 0.
2. On the host, from each pool row's teacher class ĉ_i = argmax and confidence
   m_i = max softmax(Z_t,i) (temperature 1), the pseudo-labeled set is chosen
   as a number of copies n_i ≥ 0 of each row (`copies`):
     * the confidence filter keeps rows with m_i ≥ `threshold` (0: all);
     * class balancing (`balance`) equalises the classes to K rows each
       (`per_class`; 0 = the kept rows / C, rounded): a class with more than K
       kept rows keeps its K most confident; one with fewer duplicates them,
       ⌊K / n_c⌋ copies each and one more for its K mod n_c most confident
       (`upsample=False`: no duplication, only the dropping). Ties go to the
       lower row index.
   The copies are a field of the state; the diagnostics are logged once.
3. Each step, the student S trains with noise (the strong view: RandAugment;
   the model's dropout and stochastic depth in train mode) on a labeled and an
   unlabeled batch, in one forward pass:

     L = CE(y, S(x_l)) + λ_u · Σ_i n_i · CE(t_i, S(x_u,i)) / (B_u · n̄)

   with t_i = softmax(Z_t,i / `temperature`) (`targets='soft'`) or the one-hot
   argmax (`'hard'`, label-smoothed like the labeled CE by
   `config.label_smoothing`), n̄ = Σ_pool n_i / |pool| and λ_u =
   `unlabeled_weight` (None: μ = `config.data.uratio`, the reference's
   `data_loss = lab_loss + unl_loss · unl_bsz / lab_bsz`). The unlabeled batch
   is drawn uniformly from the pool, so the weighted mean is an unbiased
   estimate of the mean over the duplicated-and-filtered set (with no filter
   and no balancing n_i = 1 and it is the plain mean).

Rounds are stages: the stage a round starts from (the one before it, its
`init_from_stage`, or `config.init_from`) is its teacher (`teacher_weights`:
its EMA or raw weights; architecture `teacher_model` + `teacher_kwargs`, '' =
this stage's model), so a teacher stage and then rounds 1, 2, ... in one
config make each round's student the next round's teacher
(configs/noisy_student_digits.py). The student starts from scratch
(`student_init='scratch'`, the paper) or from the teacher's weights
('teacher', same architecture). `student_at_least_teacher` (default True)
refuses a student with fewer parameters than its teacher.

The table, the copies and the teacher are checkpointed with the student, so a
round resumed in its middle trains on the same pseudo-labels, bit for bit.

Diagnostics (at the labelling step, against the hidden true labels of the pool,
which never enter a loss): noisy_student/pseudo_label_accuracy (every pool
row), /kept_fraction (rows through the filter), /kept_accuracy (accuracy of
the final set, counted with its copies), /set_size (Σ n_i), /class_count_min,
/class_count_max and, for up to 100 classes, /class_count/<c> after balancing;
/mean_confidence. Each step: losses/xe, losses/unlabeled, losses/total,
monitors/pseudo_label_accuracy, monitors/mask (the fraction of the batch with
n_i > 0).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from r2d2_jax import losses
from r2d2_jax import table as table_lib
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import supervised
from r2d2_jax.methods import teacher as teacher_lib
from r2d2_jax.methods.base import (HookContext, Method, Network, Task,
                                   check_choice, check_range, check_uratio,
                                   copy_network, parse_block,
                                   predict_into_table,
                                   pseudo_label_monitors, register,
                                   replicate_all, step_metrics)
from r2d2_jax.state import TrainState

PyTree = Any

TARGETS = ("soft", "hard")
STUDENT_INITS = ("scratch", "teacher")
MAX_CLASS_METRICS = 100


@dataclasses.dataclass(frozen=True)
class NoisyStudentBlock:
  """`config.noisy_student` (docs/algorithms.md, "Noisy Student").

  Attributes:
    targets: 'soft' (the teacher's softmax at `temperature`) or 'hard'.
    temperature: of the soft targets, > 0 (the reference's
      `teacher_softmax_temp`, 1).
    threshold: the confidence filter, in [0, 1]: keep rows whose teacher
      max-probability is at least this (0: keep all; the paper: 0.3).
    balance: equalise the classes of the pseudo-labeled set.
    per_class: rows per class when balancing, ≥ 0 (0: kept rows / classes).
    upsample: when balancing, duplicate the rarer classes' rows (False: only
      drop the commoner classes' least confident).
    unlabeled_weight: λ_u ≥ 0; None: config.data.uratio.
    student_init: 'scratch' or 'teacher' (start from the teacher's weights).
    student_at_least_teacher: refuse a student with fewer parameters.
    teacher_model: the teacher's registry name ('' = config.model's).
    teacher_kwargs: its module attributes (with teacher_model).
    teacher_weights: 'ema' or 'raw' weights of the teacher's checkpoint.
  """
  targets: str = "soft"
  temperature: float = 1.0
  threshold: float = 0.0
  balance: bool = False
  per_class: int = 0
  upsample: bool = True
  unlabeled_weight: float | None = None
  student_init: str = "scratch"
  student_at_least_teacher: bool = True
  teacher_model: str = ""
  teacher_kwargs: dict = dataclasses.field(default_factory=dict)
  teacher_weights: str = "ema"

  def __post_init__(self):
    check_choice("targets", self.targets, TARGETS)
    check_range("temperature", self.temperature, 0.0, lo_open=True)
    check_range("threshold", self.threshold, 0.0, 1.0)
    for name in ("balance", "upsample", "student_at_least_teacher"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be True or "
                         "False.")
    check_range("per_class", self.per_class, 0, integer=True)
    if self.unlabeled_weight is not None:
      check_range("unlabeled_weight", self.unlabeled_weight, 0.0)
    check_choice("student_init", self.student_init, STUDENT_INITS)
    check_choice("teacher_weights", self.teacher_weights,
                 teacher_lib.WEIGHTS)
    if not isinstance(self.teacher_model, str):
      raise ValueError(f"teacher_model={self.teacher_model!r} must be a "
                       "string.")
    if not isinstance(self.teacher_kwargs, dict):
      raise ValueError(f"teacher_kwargs={self.teacher_kwargs!r} must be a "
                       "dict of module attributes.")


class NoisyStudentHparams(NamedTuple):
  """What the round reads, built once when the stage is.

  Attributes:
    block: the `config.noisy_student` block.
    label_smoothing: ε of the labeled (and hard unlabeled) CE.
    unlabeled_weight: λ_u (the block's, or config.data.uratio).
    teacher: the teacher's module and weights.
  """
  block: NoisyStudentBlock
  label_smoothing: float
  unlabeled_weight: float
  teacher: teacher_lib.Teacher


def hparams(config: ml_collections.ConfigDict,
            task: Task) -> NoisyStudentHparams:
  """`config.noisy_student`, `config.label_smoothing`, the teacher's module.

  Raises:
    R2D2Error: a missing block, a bad or unknown key (named), no unlabeled
      batch, or a teacher model that cannot be built.
  """
  block = config.get("noisy_student")
  if block is None:
    raise R2D2Error(
        "config.noisy_student is missing; set at least "
        "config.noisy_student.targets ('soft' or 'hard'; see "
        "configs/noisy_student_digits.py).")
  b = parse_block(NoisyStudentBlock, block, "config.noisy_student")
  check_uratio(config, "noisy_student")
  weight = (float(config.data.uratio) if b.unlabeled_weight is None
            else float(b.unlabeled_weight))
  return NoisyStudentHparams(
      block=b, label_smoothing=supervised.hparams(config).label_smoothing,
      unlabeled_weight=weight,
      teacher=teacher_lib.build(config, task.num_classes, b,
                                "config.noisy_student"))


def views(hp: NoisyStudentHparams) -> dict[str, tuple[str, ...]]:
  del hp
  return {"labeled": ("strong",), "unlabeled": ("strong",)}


# ---------------------------------------------------------------------------
# The state


class NoisyStudentState(TrainState):
  """The student's `TrainState`, the frozen teacher and its pseudo-labels.

  Attributes:
    teacher: the teacher's variables; no step changes them.
    teacher_loaded: int32 1 once the teacher's trained variables are in.
    table: [N_pad, C] float32, the teacher's logits on the pool rows (0
      elsewhere), sharded along rows.
    copies: [N_pad] float32, n_i: the row's copies in the pseudo-labeled set
      (0 outside the pool, filtered out or dropped by balancing).
    pool: [N_pad] float32, 1 on the unlabeled pool's rows.
    mean_copies: n̄ = Σ_pool n_i / |pool| (float32; 1 before labelling).
    labelled: int32 1 once the teacher has labelled the pool.
  """
  teacher: PyTree
  teacher_loaded: jax.Array
  table: jax.Array
  copies: jax.Array
  pool: jax.Array
  mean_copies: jax.Array
  labelled: jax.Array


def check_sizes(student_params: PyTree, teacher_params: PyTree,
                hp: NoisyStudentHparams) -> None:
  """An equal-or-larger student, when `student_at_least_teacher` asks."""
  n_s = teacher_lib.num_params(student_params)
  n_t = teacher_lib.num_params(teacher_params)
  if hp.block.student_at_least_teacher and n_s < n_t:
    raise R2D2Error(
        f"The Noisy Student student has {n_s:,} parameters, fewer than its "
        f"teacher {hp.teacher.name} ({n_t:,}); the config asks for an equal "
        "or larger student (config.noisy_student.student_at_least_teacher). "
        "Make config.model (this round's student) at least as large as the "
        "teacher, or set student_at_least_teacher=False.")


def init_state(rng: jax.Array, *, net: Network, task: Task,
               hp: NoisyStudentHparams) -> NoisyStudentState:
  """A fresh student; teacher placeholders; an empty table over the pool."""
  student_rng, teacher_rng = jax.random.split(rng)
  base = net.init_train_state(student_rng)
  teacher = hp.teacher.init_variables(teacher_rng, net.image_shape)
  check_sizes(base.params, teacher["params"], hp)
  n_rows = table_lib.padded_rows(task.num_train, task.mesh)
  pool = np.zeros(n_rows, np.float32)
  pool[np.asarray(task.unlabeled_index)] = 1.0
  return NoisyStudentState.extending(
      base, teacher=teacher, teacher_loaded=jnp.zeros((), jnp.int32),
      table=jnp.zeros((n_rows, task.num_classes), jnp.float32),
      copies=jnp.zeros((n_rows,), jnp.float32), pool=jnp.asarray(pool),
      mean_copies=jnp.ones((), jnp.float32),
      labelled=jnp.zeros((), jnp.int32))


def state_sharding(abstract_state: NoisyStudentState, mesh) -> Any:
  """Networks replicated; table, copies and pool sharded along rows."""
  rows = NamedSharding(mesh, table_lib.ROW_SPEC)
  return replicate_all(abstract_state, mesh).replace(
      table=table_lib.table_sharding(mesh), copies=rows, pool=rows)


def init_from(state: NoisyStudentState, previous: PyTree, *, task: Task,
              hp: NoisyStudentHparams) -> NoisyStudentState:
  """The checkpoint the round starts from is its teacher (and, with
  student_init='teacher', the student's start)."""
  teacher = teacher_lib.from_checkpoint(
      hp.teacher, previous, state.teacher, task.num_classes,
      where="the checkpoint this noisy_student round starts from (the stage "
      "before it, its init_from_stage, or config.init_from)")
  if hp.block.student_init == "teacher":
    state = copy_network(state, previous)
  return state.replace(teacher=teacher,
                       teacher_loaded=jnp.ones((), jnp.int32))


# ---------------------------------------------------------------------------
# Filtering and balancing (host side, numpy)


def copies_of(pred: np.ndarray, conf: np.ndarray, pool: np.ndarray,
              num_classes: int, block: NoisyStudentBlock) -> np.ndarray:
  """n_i: copies of each row in the pseudo-labeled set (module docstring, 2).

  Args:
    pred: [N] the teacher's class per row.
    conf: [N] its max probability.
    pool: [N] bool, the unlabeled pool.
    num_classes: C.
    block: threshold, balance, per_class, upsample.

  Returns:
    [N] int64 copies (0 outside the pool).
  """
  keep = pool & (conf >= block.threshold)
  if not block.balance:
    return keep.astype(np.int64)
  per_class = block.per_class or int(round(keep.sum() / num_classes))
  out = np.zeros(pred.shape, np.int64)
  for c in range(num_classes):
    rows = np.flatnonzero(keep & (pred == c))
    if rows.size == 0:
      continue
    # Most confident first; a stable sort leaves ties in row order.
    rows = rows[np.argsort(-conf[rows], kind="stable")]
    if rows.size >= per_class:
      out[rows[:per_class]] = 1
    elif block.upsample:
      each, extra = divmod(per_class, rows.size)
      out[rows] = each
      out[rows[:extra]] += 1
    else:
      out[rows] = 1
  return out


def diagnostics(pred: np.ndarray, conf: np.ndarray, pool: np.ndarray,
                copies: np.ndarray, labels: np.ndarray, threshold: float,
                num_classes: int) -> dict[str, float]:
  """What the labelling step logs (module docstring); labels are hidden.

  Rows whose hidden label is unknown (< 0: a user dataset's unlabeled images)
  are left out of the two accuracies.
  """
  known = pool & (labels >= 0)
  correct = (pred == labels) & known
  kept_known = copies * known
  counts = np.bincount(pred, weights=copies, minlength=num_classes)
  n_pool = max(int(pool.sum()), 1)
  out = {
      "noisy_student/pseudo_label_accuracy":
          float(correct.sum() / max(known.sum(), 1)),
      "noisy_student/kept_fraction":
          float((pool & (conf >= threshold)).sum() / n_pool),
      "noisy_student/kept_accuracy":
          float((copies * correct).sum() / max(kept_known.sum(), 1)),
      "noisy_student/set_size": float(copies.sum()),
      "noisy_student/class_count_min": float(counts.min()),
      "noisy_student/class_count_max": float(counts.max()),
      "noisy_student/mean_confidence": float(conf[pool].mean())
                                       if pool.any() else 0.0,
  }
  if num_classes <= MAX_CLASS_METRICS:
    for c in range(num_classes):
      out[f"noisy_student/class_count/{c}"] = float(counts[c])
  return out


# ---------------------------------------------------------------------------
# The labelling hook


def _predict_pool(hooks: HookContext, state: NoisyStudentState
                  ) -> NoisyStudentState:
  """table[i] ← T(x_i) on every pool row (eval mode, unaugmented images)."""
  hp = hooks.hp
  return predict_into_table(
      hooks, state, "noisy_student/predict",
      lambda s, x: teacher_lib.logits(hp.teacher, s.teacher, x),
      lambda s: s.pool)


def _class_and_confidence(hooks: HookContext, state: NoisyStudentState):
  """Every row's argmax and max probability, replicated to every host."""

  def build():
    def stats(table, pool):
      return (jnp.argmax(table, -1).astype(jnp.int32),
              jnp.max(jax.nn.softmax(table), -1), pool)
    return jax.jit(stats, out_shardings=NamedSharding(hooks.mesh,
                                                      jax.sharding.PartitionSpec()))

  fn = hooks.compiled("noisy_student/stats", build)
  pred, conf, pool = jax.device_get(fn(state.table, state.pool))
  return np.asarray(pred), np.asarray(conf), np.asarray(pool) > 0


def label_pool(hooks: HookContext, state: NoisyStudentState, step: int):
  """Before the round's first step: the teacher labels the pool; filter, balance.

  A resumed round (labelled = 1) keeps its checkpointed table and copies.
  """
  del step
  if hooks.cache.get("noisy_student/checked"):
    return state, None
  hooks.cache["noisy_student/checked"] = True
  if not bool(jax.device_get(state.teacher_loaded)):
    raise R2D2Error(
        "The noisy_student round has no teacher: run it after a teacher "
        "stage (a staged config: the stage before it, or its "
        "init_from_stage) or set config.init_from to a trained stage's "
        "checkpoints folder.")
  if bool(jax.device_get(state.labelled)):
    return state, None
  hp, task = hooks.hp, hooks.task
  state = _predict_pool(hooks, state)
  pred, conf, pool = _class_and_confidence(hooks, state)
  copies = copies_of(pred, conf, pool, task.num_classes, hp.block)
  total = int(copies.sum())
  if total == 0:
    raise R2D2Error(
        f"The confidence filter kept no unlabeled row (threshold "
        f"{hp.block.threshold}; the teacher's largest confidence is "
        f"{conf[pool].max() if pool.any() else float('nan'):.3f}). Lower "
        "config.noisy_student.threshold.")
  labels = np.full(pred.shape, -1, np.int64)
  labels[:task.num_train] = task.train_labels
  metrics = diagnostics(pred, conf, pool, copies, labels, hp.block.threshold,
                        task.num_classes)
  rows = NamedSharding(hooks.mesh, table_lib.ROW_SPEC)
  host = copies.astype(state.copies.dtype)
  copies_dev = jax.make_array_from_callback(host.shape, rows,
                                            lambda i: host[i])
  state = state.replace(
      copies=copies_dev,
      mean_copies=jnp.asarray(total / max(int(pool.sum()), 1),
                              state.mean_copies.dtype),
      labelled=jnp.ones((), jnp.int32))
  state = jax.device_put(state, hooks.state_shardings)
  return state, metrics


# ---------------------------------------------------------------------------
# The step


def soft_targets(rows: jax.Array, temperature: float) -> jax.Array:
  return jax.nn.softmax(rows / temperature)


def train_step(state: NoisyStudentState, batch, rng: jax.Array, *,
               net: Network, task: Task, hp: NoisyStudentHparams):
  """One noised student step on CE(y, S(x_l)) + λ_u · weighted CE(t, S(x_u)).

  Args:
    state: student, teacher, table and copies.
    batch: 'labeled' {'strong', 'label'}, 'unlabeled' {'strong', 'index',
      'label' (hidden)}.
    rng: this step's key (dropout, stochastic depth).
    net: the student.
    task: its mesh shards the table.
    hp: the parsed block.

  Returns:
    (new state, metrics).
  """
  lab, unl = batch["labeled"], batch["unlabeled"]
  n_l = lab["strong"].shape[0]
  rows = table_lib.gather_rows(state.table, unl["index"], task.mesh)
  copies = table_lib.gather_rows(state.copies, unl["index"], task.mesh)
  b = hp.block
  if b.targets == "soft":
    targets = soft_targets(rows, b.temperature)
  else:
    eps = hp.label_smoothing
    targets = (jax.nn.one_hot(jnp.argmax(rows, -1), rows.shape[-1]) *
               (1.0 - eps) + eps / rows.shape[-1])
  targets = jax.lax.stop_gradient(targets)
  weights = copies / (copies.shape[0] * state.mean_copies)
  x = jnp.concatenate([lab["strong"], unl["strong"]])

  def objective(params):
    logits, model_state = net.apply_train(
        {"params": params, **state.model_state}, x, rng)
    z_l, z_u = logits[:n_l], logits[n_l:]
    xe = losses.cross_entropy(z_l, lab["label"],
                              label_smoothing=hp.label_smoothing)
    ce_u = -jnp.sum(targets.astype(z_u.dtype) * jax.nn.log_softmax(z_u), -1)
    unlabeled = jnp.sum(weights.astype(z_u.dtype) * ce_u)
    loss = xe + hp.unlabeled_weight * unlabeled
    return loss, (xe, unlabeled, z_l, model_state)

  (loss, (xe, unlabeled, z_l, model_state)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  new = state.apply_gradients(grads, net.tx, model_state, net.ema_decay)
  metrics = step_metrics(state, new, grads, net)
  metrics.update({
      "losses/total": loss, "losses/xe": xe, "losses/unlabeled": unlabeled,
      "accuracy/train": losses.accuracy(z_l, lab["label"]),
  })
  metrics.update(pseudo_label_monitors(rows, unl["label"],
                                       mask=(copies > 0).astype(jnp.float32)))
  return new, metrics


METHOD = register(Method(
    name="noisy_student", hparams=hparams, views=views, init_state=init_state,
    train_step=train_step, state_sharding=state_sharding,
    init_from=init_from, hooks=(label_pool,)))
