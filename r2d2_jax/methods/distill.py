"""DeiT-style knowledge distillation from a frozen teacher (docs/algorithms.md, "DeiT-style distillation").

Method 'distill', block `config.distill`. A student S (the stage's model) learns
from the labels and from a frozen teacher T (any registered architecture,
`teacher.Teacher`), with α = `alpha`, τ = `tau` (Touvron et al. 2021;
facebookresearch/deit `losses.py`, `DistillationLoss`):

  kind 'soft':  L = (1 − α) CE(y, Z_s) + α D_soft(Z_s, Z_t)            (α = 0.1)
  kind 'hard':  L = (1 − α) CE(y, Z_s) + α CE(argmax Z_t, Z_s)        (α = ½)
  kind 'token': L = (1 − α) CE(y, Z_cls) + α D(Z_dist, Z_t)           (α = ½)
                D = CE(argmax Z_t, ·) (`token_target='hard'`, DeiT's default)
                or D_soft (`token_target='soft'`); the student must be a ViT
                with a distillation token (`distilled=True`).

  D_soft(Z_s, Z_t) = τ² · Σ_i Σ_c q_ic (log q_ic − log p_ic) / N,
      q = softmax(Z_t / τ), p = softmax(Z_s / τ),
      N = rows × classes (`kl_reduction='numel'`: DeiT's `F.kl_div(...,
      reduction='sum') * T * T / outputs_kd.numel()`) or N = rows
      ('batchmean').

CE(y, ·) is over the labeled rows (label smoothing `config.label_smoothing`);
the distillation term is averaged over every row the teacher sees: the labeled
batch (the same images for teacher and student, as DeiT feeds the teacher the
student's inputs: the weak view, or with `labeled_view='strong'` the strong
one, DeiT's RandAugment) and, when `config.data.uratio` > 0, the
unlabeled batch (the teacher sees its weak view, the student its strong view).
With uratio = 0 this is DeiT's loss. The student runs once, in train mode, over
[labeled weak; unlabeled strong] (BatchNorm sees both).

The teacher is frozen: its variables are a field of the state (`DistillState.
teacher`) that no step changes, applied with the teacher's own module in eval
mode (running BatchNorm statistics, no dropout) under stop_gradient. It comes
from, in this order:
  * `teacher_from` (a checkpoint folder), loaded before the first step (the
    stage's `init_from`, if any, then initialises the student, which must then
    be of the same architecture);
  * else the checkpoint the stage starts from: the stage before it in a staged
    config (or its `init_from_stage`), or `config.init_from`.
Its weights are the checkpoint's EMA weights (`teacher_weights='ema'`, equal to
the raw ones when that stage had no EMA) or raw ones; its architecture
`teacher_model` + `teacher_kwargs` ('' = this stage's `config.model`).

Evaluation: the student (raw and EMA) through the plain call, i.e. for a
distilled ViT the log of the mean of the two heads' softmaxes; and each head
alone as raw_cls, raw_dist, ema_cls, ema_dist (`vit.with_head`).

Metrics: losses/xe (labeled CE), losses/distill (D), losses/total,
accuracy/train (class head), monitors/teacher_accuracy (the teacher on the
labeled batch), monitors/agreement (argmax of the distilled head = the
teacher's, every row), and on unlabeled rows monitors/pseudo_label_accuracy
(the teacher's argmax against the hidden labels).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import losses
from r2d2_jax import paths
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import supervised
from r2d2_jax.methods import teacher as teacher_lib
from r2d2_jax.methods.base import (HookContext, Method, Network, Task,
                                   check_choice, check_range, copy_network,
                                   default_eval_variables, parse_block,
                                   pseudo_label_monitors, register,
                                   step_metrics)
from r2d2_jax.models import vit
from r2d2_jax.state import TrainState

PyTree = Any

KINDS = ("soft", "hard", "token")
DEFAULT_ALPHA = {"soft": 0.1, "hard": 0.5, "token": 0.5}


@dataclasses.dataclass(frozen=True)
class DistillBlock:
  """`config.distill` (docs/algorithms.md, "DeiT-style distillation").

  Attributes:
    kind: 'soft', 'hard' or 'token' (see the module docstring).
    tau: τ of the soft term, > 0 (3.0: the paper's soft distillation).
    alpha: α, the weight of the distillation term, in [0, 1]; None: 0.1 for
      'soft', ½ for 'hard' and 'token'.
    token_target: the distillation head's target with kind 'token': 'hard'
      (DeiT's default) or 'soft'.
    kl_reduction: 'numel' (DeiT: the summed KL over rows × classes) or
      'batchmean' (over rows).
    teacher_model: the teacher's registry name ('' = config.model's).
    teacher_kwargs: its module attributes (with teacher_model; '' takes
      config.model.kwargs and dtype).
    teacher_from: a checkpoint folder to take the teacher from ('' = the
      checkpoint the stage starts from).
    teacher_weights: 'ema' or 'raw'.
    labeled_view: the labeled images' view, 'weak' (default) or 'strong'
      (DeiT: RandAugment on the images both networks see).
  """
  kind: str = "soft"
  tau: float = 3.0
  alpha: float | None = None
  token_target: str = "hard"
  kl_reduction: str = "numel"
  teacher_model: str = ""
  teacher_kwargs: dict = dataclasses.field(default_factory=dict)
  teacher_from: str = ""
  teacher_weights: str = "ema"
  labeled_view: str = "weak"

  def __post_init__(self):
    check_choice("kind", self.kind, KINDS)
    check_choice("labeled_view", self.labeled_view, ("weak", "strong"))
    check_range("tau", self.tau, 0.0, lo_open=True)
    if self.alpha is None:
      object.__setattr__(self, "alpha", DEFAULT_ALPHA[self.kind])
    check_range("alpha", self.alpha, 0.0, 1.0)
    check_choice("token_target", self.token_target, ("hard", "soft"))
    check_choice("kl_reduction", self.kl_reduction, ("numel", "batchmean"))
    check_choice("teacher_weights", self.teacher_weights,
                 teacher_lib.WEIGHTS)
    for name in ("teacher_model", "teacher_from"):
      if not isinstance(getattr(self, name), str):
        raise ValueError(f"{name}={getattr(self, name)!r} must be a string.")
    if not isinstance(self.teacher_kwargs, dict):
      raise ValueError(f"teacher_kwargs={self.teacher_kwargs!r} must be a "
                       "dict of module attributes.")

  @property
  def target(self) -> str:
    """The distillation term's kind: 'soft' or 'hard'."""
    return self.token_target if self.kind == "token" else self.kind


class DistillHparams(NamedTuple):
  """What the distillation step reads, built once when the stage is.

  Attributes:
    distill: the `config.distill` block.
    label_smoothing: ε of the labeled CE (`config.label_smoothing`).
    teacher: the teacher's module and weights.
    use_unlabeled: config.data.uratio > 0 (the teacher labels the unlabeled
      batch too).
  """
  distill: DistillBlock
  label_smoothing: float
  teacher: teacher_lib.Teacher
  use_unlabeled: bool


def hparams(config: ml_collections.ConfigDict, task: Task) -> DistillHparams:
  """`config.distill`, `config.label_smoothing`; the teacher's module.

  Raises:
    R2D2Error: a missing block, a bad or unknown key (named), or a teacher
      model that cannot be built.
  """
  block = config.get("distill")
  if block is None:
    raise R2D2Error(
        "config.distill is missing; set at least config.distill.kind "
        f"(one of {KINDS}; see configs/distill_digits.py).")
  d = parse_block(DistillBlock, block, "config.distill")
  teacher = teacher_lib.build(config, task.num_classes, d, "config.distill")
  uratio = config.data.get("uratio", 0) or 0
  return DistillHparams(
      distill=d, label_smoothing=supervised.hparams(config).label_smoothing,
      teacher=teacher,
      use_unlabeled=bool(uratio > 0))


def views(hp: DistillHparams) -> dict[str, tuple[str, ...]]:
  out = {"labeled": (hp.distill.labeled_view,)}
  if hp.use_unlabeled:
    out["unlabeled"] = ("weak", "strong")
  return out


def check_student(net: Network, hp: DistillHparams) -> None:
  """kind 'token' needs a student with a distillation token and head."""
  if hp.distill.kind == "token" and not getattr(net.model, "distilled",
                                                False):
    raise R2D2Error(
        "config.distill.kind='token' needs a student with a distillation "
        f"token, and {type(net.model).__name__} has none: use a distilled ViT "
        "(config.model.name='vit_digits_distilled', 'deit_tiny_distilled', "
        "..., or 'vit' with config.model.kwargs.distilled=True), or "
        "kind='soft' / 'hard'.")


# ---------------------------------------------------------------------------
# The state


class DistillState(TrainState):
  """The student's `TrainState` plus the frozen teacher.

  Attributes:
    teacher: the teacher's variables ({'params', 'batch_stats', ...}); never
      changed by a step.
    teacher_loaded: int32 1 once the teacher's trained variables are in
      (0: the placeholder of `init_state`, which no step may train against).
  """
  teacher: PyTree
  teacher_loaded: jax.Array


def init_state(rng: jax.Array, *, net: Network,
               hp: DistillHparams) -> DistillState:
  """A fresh student; the teacher's variables as placeholders of its shapes."""
  check_student(net, hp)
  student_rng, teacher_rng = jax.random.split(rng)
  base = net.init_train_state(student_rng)
  return DistillState.extending(
      base, teacher=hp.teacher.init_variables(teacher_rng, net.image_shape),
      teacher_loaded=jnp.zeros((), jnp.int32))


def init_from(state: DistillState, previous: PyTree, *, task: Task,
              hp: DistillHparams) -> DistillState:
  """The checkpoint the stage starts from is the teacher (or, with `teacher_from`, the student's start)."""
  if hp.distill.teacher_from:
    return copy_network(state, previous)
  teacher = teacher_lib.from_checkpoint(
      hp.teacher, previous, state.teacher, task.num_classes,
      where="the checkpoint this distill stage starts from (init_from / the "
      "previous stage)")
  return state.replace(teacher=teacher,
                       teacher_loaded=jnp.ones((), jnp.int32))


def load_teacher(hooks: HookContext, state: DistillState, step: int):
  """Before the first step: load `teacher_from`, or insist that a teacher is in."""
  del step
  if hooks.cache.get("distill/teacher_checked"):
    return state, None
  hp = hooks.hp
  loaded = bool(jax.device_get(state.teacher_loaded))
  folder = hp.distill.teacher_from
  if not loaded and folder:
    if not paths.path(folder).is_dir():
      raise R2D2Error(f"config.distill.teacher_from={folder!r}: no such "
                      "folder; give a teacher stage's workdir or its "
                      "checkpoints folder.")
    try:
      previous, _ = ckpt_lib.restore_raw(folder)
    except R2D2Error as e:
      raise R2D2Error(f"config.distill.teacher_from={folder!r}: {e}") from None
    teacher = teacher_lib.from_checkpoint(
        hp.teacher, previous, state.teacher, hooks.task.num_classes,
        where=f"config.distill.teacher_from={folder!r}")
    state = jax.device_put(
        state.replace(teacher=teacher, teacher_loaded=jnp.ones((), jnp.int32)),
        hooks.state_shardings)
  elif not loaded:
    raise R2D2Error(
        "The distill stage has no teacher: set config.distill.teacher_from to "
        "a trained stage's checkpoint folder, or run it after a teacher stage "
        "(a staged config: the stage before it, or its init_from_stage) or "
        "with config.init_from.")
  hooks.cache["distill/teacher_checked"] = True
  return state, None


def eval_variables(state: DistillState) -> dict[str, PyTree]:
  """raw, ema; with a distillation token also each head alone."""
  out = default_eval_variables(state)
  if "dist_token" in state.params:
    for name in ("raw", "ema"):
      out[f"{name}_cls"] = vit.with_head(out[name], "class")
      out[f"{name}_dist"] = vit.with_head(out[name], "distill")
  return out


# ---------------------------------------------------------------------------
# The loss and the step


def soft_distillation(z_student: jax.Array, z_teacher: jax.Array, tau: float,
                      reduction: str = "numel") -> jax.Array:
  """D_soft = τ² Σ KL(softmax(Z_t/τ) ‖ softmax(Z_s/τ)) / N (module docstring)."""
  log_p = jax.nn.log_softmax(z_student / tau)
  log_q = jax.nn.log_softmax(z_teacher / tau)
  total = jnp.sum(jnp.exp(log_q) * (log_q - log_p))
  n = z_student.size if reduction == "numel" else z_student.shape[0]
  return total * (tau * tau) / n


def distillation_term(z_student: jax.Array, z_teacher: jax.Array,
                      d: DistillBlock) -> jax.Array:
  if d.target == "soft":
    return soft_distillation(z_student, z_teacher, d.tau, d.kl_reduction)
  return losses.cross_entropy(z_student, jnp.argmax(z_teacher, -1))


def train_step(state: DistillState, batch, rng: jax.Array, *, net: Network,
               hp: DistillHparams):
  """One student step on (1 − α) CE(y, Z_cls) + α D(Z_s, Z_t); the teacher untouched.

  Args:
    state: student and frozen teacher.
    batch: 'labeled' {labeled_view ('weak'), 'label'}; with unlabeled data also
      'unlabeled' {'weak' (teacher), 'strong' (student), 'label' (hidden)}.
    rng: this step's key.
    net: the student.
    hp: the parsed `config.distill` and the teacher.

  Returns:
    (new state, metrics).
  """
  check_student(net, hp)
  d = hp.distill
  lab = batch["labeled"]
  x_l, y = lab[d.labeled_view], lab["label"]
  n_l = x_l.shape[0]
  if hp.use_unlabeled:
    unl = batch["unlabeled"]
    teacher_in = jnp.concatenate([x_l, unl["weak"]])
    student_in = jnp.concatenate([x_l, unl["strong"]])
  else:
    teacher_in = student_in = x_l
  z_t = teacher_lib.logits(hp.teacher, state.teacher, teacher_in)
  token = d.kind == "token"

  def objective(params):
    out, model_state = net.apply_train(
        {"params": params, **state.model_state}, student_in, rng,
        **({"heads": True} if token else {}))
    z_cls, z_kd = out if token else (out, out)
    xe = losses.cross_entropy(z_cls[:n_l], y,
                              label_smoothing=hp.label_smoothing)
    dist = distillation_term(z_kd, z_t.astype(z_kd.dtype), d)
    loss = (1.0 - d.alpha) * xe + d.alpha * dist
    return loss, (xe, dist, z_cls[:n_l], z_kd, model_state)

  (loss, (xe, dist, z_lab, z_kd, model_state)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  new = state.apply_gradients(grads, net.tx, model_state, net.ema_decay)
  metrics = step_metrics(state, new, grads, net)
  t_label = jnp.argmax(z_t, -1)
  metrics.update({
      "losses/total": loss, "losses/xe": xe, "losses/distill": dist,
      "accuracy/train": losses.accuracy(z_lab, y),
      "monitors/teacher_accuracy": losses.accuracy(z_t[:n_l], y),
      "monitors/agreement": jnp.mean(
          (jnp.argmax(z_kd, -1) == t_label).astype(jnp.float32)),
  })
  if hp.use_unlabeled:
    metrics.update(pseudo_label_monitors(t_label[n_l:],
                                         batch["unlabeled"]["label"]))
  return new, metrics


METHOD = register(Method(
    name="distill", hparams=hparams, views=views, init_state=init_state,
    train_step=train_step, eval_variables=eval_variables, init_from=init_from,
    hooks=(load_teacher,)))
