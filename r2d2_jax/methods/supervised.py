"""Supervised training on the labeled examples only: the baseline, and stage 1 of R2-D2.

Loss: cross-entropy of the weakly augmented labeled batch (optional label
smoothing, `config.label_smoothing`).
"""

from __future__ import annotations

import jax

from r2d2_jax import losses
from r2d2_jax.methods.base import Context, Method, step_metrics
from r2d2_jax.state import TrainState


def views(config) -> dict[str, tuple[str, ...]]:
  del config
  return {"labeled": ("weak",)}


def init_state(rng: jax.Array, ctx: Context) -> TrainState:
  return ctx.init_train_state(rng)


def cross_entropy_step(state: TrainState, x: jax.Array, labels: jax.Array,
                       rng: jax.Array, ctx: Context,
                       label_smoothing: float = 0.0):
  """One optimizer step on CE(labels, f(x)); shared by every CE-only stage.

  Returns:
    (new state, metrics with losses/xe, losses/total, accuracy/train, lr,
    l2_grads, l2_params).
  """

  def loss_fn(params):
    logits, model_state = ctx.apply_train(
        {"params": params, **state.model_state}, x, rng)
    loss = losses.cross_entropy(logits, labels,
                                label_smoothing=label_smoothing)
    return loss, (logits, model_state)

  (loss, (logits, model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = step_metrics(state, grads, ctx)
  state = state.apply_gradients(grads, ctx.tx, model_state, ctx.ema_decay)
  metrics.update({"losses/xe": loss, "losses/total": loss,
                  "accuracy/train": losses.accuracy(logits, labels)})
  return state, metrics


def train_step(state: TrainState, batch, rng: jax.Array, ctx: Context):
  """One SGD step on CE(labels, f(weak(x_l)))."""
  return cross_entropy_step(state, batch["labeled"]["weak"],
                            batch["labeled"]["label"], rng, ctx,
                            ctx.config.get("label_smoothing", 0.0))


METHOD = Method(name="supervised", views=views, init_state=init_state,
                train_step=train_step)
