"""Mean Teacher (Tarvainen & Valpola 2017; docs/algorithms.md, "Mean Teacher").

The teacher θ' is an exponential moving average of the student θ; the student
is trained on

  L = CE(y_l, f_θ(weak x_l)) + w(t) · mean_i mean_c (p_i − q_i)²_c,
  p_i = softmax(f_θ(weak x_i)),  q_i = stop_grad(softmax(f_θ'(weak_1 x_i))),
  w(t) = weight · exp(−5 (1 − min(t, T) / T)²),  T = ramp_steps,

i over the labeled and unlabeled rows (`consistency_on_labeled`; the unlabeled
rows only when False), the two views augmented independently. After the
student's optimizer step, θ' ← d(t) θ' + (1 − d(t)) θ with

  d(t) = ema_decay_rampup while t < ramp_steps, else `config.ema_decay`,
         and, with `ema_warmup`, at most 1 − 1/(t + 2) (the true average of
         the weights so far, CuriousAI/mean-teacher pytorch
         `update_ema_variables`).

The teacher is the state's EMA (`ema_params`, evaluated as 'ema'). Its forward
runs in train mode, as in both references (pytorch `ema_model.train()`; TF: the
'ema' tower with `is_training`): its own dropout and input noise, BatchNorm on
the teacher batch's statistics, and its running statistics (`ema_model_state`,
used to evaluate it) are updated by its own forwards, not averaged from the
student's (pytorch: the EMA covers `parameters()` only; TF: each tower has its
own `eval_mean`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import (Method, Network, check_range,
                                   one_network_step, parse_block,
                                   pseudo_label_monitors, register)
from r2d2_jax.methods.pi_model import softmax_mse, two_views
from r2d2_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class MeanTeacherHparams:
  """`config.mean_teacher` (docs/algorithms.md, "Mean Teacher").

  Attributes:
    weight: w_max, the consistency weight after the ramp-up, ≥ 0.
    ramp_steps: steps of the sigmoid ramp-up of the weight (and of the
      ramp-up EMA decay), ≥ 0.
    ema_decay: the teacher's decay after the ramp-up, in [0, 1): the top-level
      `config.ema_decay` (not a key of the block).
    ema_decay_rampup: the decay during the ramp-up, in [0, 1); None: ema_decay.
    ema_warmup: cap the decay at 1 − 1/(t + 2) (the pytorch reference).
    consistency_on_labeled: the consistency term covers the labeled rows too.
  """
  weight: float
  ema_decay: float
  ramp_steps: int = 0
  ema_decay_rampup: float | None = None
  ema_warmup: bool = False
  consistency_on_labeled: bool = True

  def __post_init__(self):
    check_range("weight", self.weight, 0.0)
    check_range("ramp_steps", self.ramp_steps, 0, integer=True)
    check_range("ema_decay (config.ema_decay)", self.ema_decay, 0.0, 1.0,
                hi_open=True)
    if self.ema_decay_rampup is not None:
      check_range("ema_decay_rampup", self.ema_decay_rampup, 0.0, 1.0,
                  hi_open=True)
    for name in ("ema_warmup", "consistency_on_labeled"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name}={getattr(self, name)!r} must be True or "
                         "False.")

  def weight_at(self, step: jax.Array) -> jax.Array:
    """w(t)."""
    return self.weight * meta.sigmoid_rampup(step, self.ramp_steps)

  def decay_at(self, step: jax.Array) -> jax.Array:
    """d(t), the teacher's EMA decay at the step that takes `step` to step + 1."""
    t = jnp.asarray(step, jnp.result_type(float))
    rampup = (self.ema_decay if self.ema_decay_rampup is None
              else self.ema_decay_rampup)
    decay = jnp.where(t < self.ramp_steps, rampup, self.ema_decay)
    if self.ema_warmup:
      decay = jnp.minimum(decay, 1.0 - 1.0 / (t + 2.0))
    return decay


def hparams(config) -> MeanTeacherHparams:
  """`config.mean_teacher` and `config.ema_decay` as `MeanTeacherHparams`."""
  block = config.get("mean_teacher")
  if block is None:
    raise R2D2Error("config.mean_teacher is missing; it needs at least "
                    "`weight` (see configs/mean_teacher_digits.py).")
  if "ema_decay" in block:
    raise R2D2Error("config.mean_teacher.ema_decay: the teacher's decay after "
                    "the ramp-up is the top-level config.ema_decay; set that "
                    "(and mean_teacher.ema_decay_rampup for the ramp-up).")
  return parse_block(MeanTeacherHparams, block, "config.mean_teacher",
                     ema_decay=float(config.get("ema_decay", 0.0) or 0.0))


def train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
               hp: MeanTeacherHparams):
  """One student step on CE + w(t)·consistency; then the teacher's EMA.

  Args:
    state: student (`params`, `model_state`) and teacher (`ema_params`,
      `ema_model_state`).
    batch: 'labeled' {'weak', 'weak_1', 'label'}, 'unlabeled' {'weak',
      'weak_1'}: the student reads 'weak', the teacher 'weak_1'.
    rng: this step's key.
    net: the network.
    hp: `config.mean_teacher`.

  Returns:
    (new state, metrics).
  """
  lab, unl = batch["labeled"], batch["unlabeled"]
  n_l = lab["weak"].shape[0]
  weight, decay = hp.weight_at(state.step), hp.decay_at(state.step)
  student_rng, teacher_rng = jax.random.split(rng)

  teacher_logits, teacher_model_state = net.apply_train(
      state.variables(ema=True),
      jnp.concatenate([lab["weak_1"], unl["weak_1"]]), teacher_rng)
  q = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits))
  q_rows = q if hp.consistency_on_labeled else q[n_l:]

  def loss_fn(logits, params):
    del params
    z_l, z_u = logits
    xe = losses.cross_entropy(z_l, lab["label"])
    z = jnp.concatenate([z_l, z_u]) if hp.consistency_on_labeled else z_u
    cons = softmax_mse(z, q_rows.astype(z.dtype))
    aux = {"losses/xe": xe, "losses/xeu": cons}
    aux.update(pseudo_label_monitors(q[n_l:], unl["label"]))
    return xe + weight * cons, aux

  # The shared step's EMA, with this step's decay, is the teacher's update.
  student_net = dataclasses.replace(net, ema_decay=decay)
  state, metrics = one_network_step(state, [lab["weak"], unl["weak"]], loss_fn,
                                    student_rng, student_net,
                                    labels=lab["label"])
  # The teacher's BatchNorm statistics are its own (not the student's EMA).
  state = state.replace(ema_model_state=teacher_model_state)
  metrics["monitors/weight"] = weight
  metrics["monitors/ema_decay"] = decay
  return state, metrics


METHOD = register(Method(name="mean_teacher", hparams=hparams, views=two_views,
                         train_step=train_step))
