"""UDA: Unsupervised Data Augmentation (docs/algorithms.md, "UDA"), one network.

  L = CE(y_l, f(weak x_l))                                   (label smoothing)
    + w(t) · mean_i mask_i · CE(stop_grad(softmax(f(weak x_u_i) / τ)),
                                f(strong x_u_i))
  mask_i = [max softmax(f(weak x_u_i) / τ_mask) ≥ threshold],
  w(t)   = config.uda.weight · min(1, t / config.uda.ramp_steps).

`config.uda.mask_on` picks the softmax the mask thresholds: 'unsharpened'
(τ_mask = 1, the UDA paper's code: google-research/uda `image/main.py`,
`largest_prob = reduce_max(softmax(ori_logits))`) or 'sharpened' (τ_mask = τ,
the Meta Pseudo Labels code: google-research/google-research
`meta_pseudo_labels/training_utils.py`, `UDA.build_uda_cross_entropy` takes
`reduce_max(labels['u_ori'])` with `labels['u_ori'] = softmax(logits / uda_temp)`).
Missing key: 'unsharpened'. The paper configs set it (docs/algorithms.md, "UDA").

The mean is over every unlabeled row (masked rows count as zero), FixMatch's
convention. The same loss is the auxiliary loss of the Meta Pseudo Labels
teacher (`r2d2_jax.methods.mpl`), so it is exposed as the pure `uda_loss`.

Config block (`config.uda`): weight, ramp_steps, temperature, threshold,
label_smoothing, mask_on.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import Context, Method, step_metrics
from r2d2_jax.state import TrainState

MASK_ON = ("sharpened", "unsharpened")


def uda_loss(logits_l: jax.Array, labels: jax.Array, logits_weak: jax.Array,
             logits_strong: jax.Array, *, weight: jax.Array | float,
             temperature: float, threshold: float,
             label_smoothing: float = 0.0, mask_on: str = "unsharpened"
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The UDA objective from logits.

  Args:
    logits_l: [B_l, C] logits of the (weakly augmented) labeled batch.
    labels: [B_l] int labels.
    logits_weak: [B_u, C] logits of the weak unlabeled view (targets only: no
      gradient flows through them).
    logits_strong: [B_u, C] logits of the strong unlabeled view.
    weight: w(t), the consistency weight at this step.
    temperature: τ, sharpening of the targets.
    threshold: confidence threshold of the mask.
    label_smoothing: on the labeled CE.
    mask_on: 'unsharpened' (the mask reads softmax(logits_weak), the UDA code)
      or 'sharpened' (softmax(logits_weak / τ), the MPL code).

  Returns:
    (total loss, {'losses/xe', 'losses/uda', 'uda/mask'}).
  """
  xe = losses.cross_entropy(logits_l, labels, label_smoothing=label_smoothing)
  if mask_on not in MASK_ON:
    raise R2D2Error(f"Unknown uda.mask_on {mask_on!r}. Valid values: "
                    f"{', '.join(MASK_ON)}.")
  logits_weak = jax.lax.stop_gradient(logits_weak)
  targets = jax.nn.softmax(logits_weak / temperature)
  confidence = targets if mask_on == "sharpened" else jax.nn.softmax(
      logits_weak)
  mask = (jnp.max(confidence, -1) >= threshold).astype(logits_strong.dtype)
  consistency = losses.soft_cross_entropy(logits_strong, targets, mask)
  total = xe + weight * consistency
  return total, {"losses/xe": xe, "losses/uda": consistency,
                 "uda/mask": jnp.mean(mask)}


def uda_weight(step: jax.Array, config: ml_collections.ConfigDict) -> jax.Array:
  """w(t): `config.uda.weight` ramped linearly from 0 over `ramp_steps`."""
  return config.uda.weight * meta.linear_ramp(
      step, int(config.uda.get("ramp_steps", 0) or 0))


def uda_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The static keyword arguments of `uda_loss` from `config.uda`."""
  return dict(temperature=config.uda.temperature,
              threshold=config.uda.threshold,
              label_smoothing=config.uda.get("label_smoothing", 0.0),
              mask_on=config.uda.get("mask_on", "unsharpened") or "unsharpened")


def views(config) -> dict[str, tuple[str, ...]]:
  del config
  return {"labeled": ("weak",), "unlabeled": ("weak", "strong")}


def init_state(rng: jax.Array, ctx: Context) -> TrainState:
  return ctx.init_train_state(rng)


def train_step(state: TrainState, batch, rng: jax.Array, ctx: Context):
  """One optimizer step on the UDA objective.

  The labeled, weak and strong batches go through the network in one train-mode
  forward pass, so BatchNorm sees (and its running statistics average) the whole
  mixed batch, as in the reference implementation.

  Args:
    state: the network.
    batch: 'labeled' {'weak', 'label'}, 'unlabeled' {'weak', 'strong'}.
    rng: this step's key (dropout).
    ctx: the stage's context.

  Returns:
    (new state, metrics).
  """
  lab, unl = batch["labeled"], batch["unlabeled"]
  n_l, n_u = lab["weak"].shape[0], unl["weak"].shape[0]
  x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
  weight = uda_weight(state.step, ctx.config)

  def loss_fn(params):
    logits, model_state = ctx.apply_train(
        {"params": params, **state.model_state}, x, rng)
    logits_l, logits_w, logits_s = jnp.split(logits, [n_l, n_l + n_u])
    loss, aux = uda_loss(logits_l, lab["label"], logits_w, logits_s,
                         weight=weight, **uda_kwargs(ctx.config))
    return loss, (aux, logits_l, model_state)

  (loss, (aux, logits_l, model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  metrics = step_metrics(state, grads, ctx)
  state = state.apply_gradients(grads, ctx.tx, model_state, ctx.ema_decay)
  metrics.update(aux)
  metrics.update({"losses/total": loss, "uda/weight": weight,
                  "accuracy/train": losses.accuracy(logits_l, lab["label"])})
  return state, metrics


METHOD = Method(name="uda", views=views, init_state=init_state,
                train_step=train_step)
