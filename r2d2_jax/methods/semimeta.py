"""SemiMeta: semi-supervised learning with meta-gradient pseudo-labels.

Zhang, Xiao, Jia, Cheng and Yang, "Semi-Supervised Learning with Meta-Gradient"
(AISTATS 2021); docs/algorithms.md, "SemiMeta". One network θ. Each step, on a labeled batch
(x_l, y_l) and an unlabeled batch x_u of n examples with s_i(θ) = softmax(f(x_u_i; θ)):

  ỹ   = stop_gradient(s(θ))                    pseudo-labels (per batch, not stored)
  L_u(θ, y) = mean_i ‖s_i(θ) − y_i‖²            consistency loss
  θ̃   = θ − α ∇θ L_u(θ, ỹ)                      one inner SGD step
  g_y = ∇ỹ L_l(θ̃)                               L_l = CE on the labeled batch
  ŷ   = normalize(relu(ỹ − β · g_y))            rows stay distributions
  L   = mixup CE on (x_l, y_l) × (x_u, ŷ) + w(t) · L_u(θ, ŷ)
  θ   ← optimizer(θ, ∇θ L)

The meta-gradient in closed form. ∇θ L_u(θ, y) = (2/n) Σ_i J_iᵀ (s_i − y_i) with
J_i = ∂s_i/∂θ (a C × P Jacobian), so θ̃ depends on ỹ linearly and *exactly*:
∂θ̃/∂ỹ_i = +(2α/n) J_iᵀ (J at θ, not θ̃). Hence

  exact:        g_y,i = (2α/n) · J_i(θ) ∇θ L_l(θ̃)
  first_order:  g_y,i = (2α/n) · J_i(θ) ∇θ L_l(θ)      (θ̃ → θ in the last factor)

The only approximation of 'first_order' is evaluating the labeled gradient at θ
instead of θ̃, so exact / α → first_order / α as α → 0 with an O(α) relative
error. The first-order form is one `jax.jvp` of θ ↦ s(θ) in the direction
g = ∇θ L_l(θ) (its primal output is ỹ itself, for free). The label step then
moves along −J_i g (the descent direction −J_i g of docs/algorithms.md, "SemiMeta").

Relation to the reference code (Sakura03/SemiMeta, `train_meta.py`): it
estimates (s(θ + εg) − s(θ − εg)) / ε ≈ 2 J_i g by central differences with
ε = 0.01/‖g‖ and steps ỹ ← ỹ − lr · 2 J_i g. We write the label step
`ŷ = normalize(relu(ỹ − label_lr · n · g_y))`, i.e. a per-row step of
2 · label_lr · α · J_i g that does not depend on the batch size; with
`inner_lr` = the current lr (the default) and `label_lr = 1` this is exactly the
reference's update, without its finite-difference error.

Note: ỹ is computed by the same forward pass as the inner step's s(θ), so
∇θ L_u(θ, ỹ) = 0 and θ̃ = θ: in the training step the two modes give the same
g_y (up to rounding), and 'exact' costs a Hessian-vector product more. They
differ for ỹ ≠ s(θ), which is what the tests check ('exact' is kept as the
reference for the identity above, and for experiments with other ỹ).

BatchNorm: the meta forwards (ỹ, the inner step, the labeled gradient, the jvp)
run in `config.semimeta.meta_bn` mode — 'eval' (running statistics, no
dropout), as the reference does, by default, or 'train' (batch statistics; the
updated running statistics are discarded). With 'eval' the pseudo-label ỹ is
the clean prediction and the final loss's training-mode forward (dropout,
batch statistics) differs from it, which is what gives the consistency term its
signal: on an MLP without dropout and without augmentation, 'train' makes
ỹ = s(θ) exactly and the term vanishes (docs/results.md, SemiMeta on MNIST). Only the final loss's two forwards (mixed
images, then unlabeled images, as the reference's two `model(...)` calls)
update the running statistics.

Mixup: per-sample λ_i ~ Beta(a, a) *without* λ' = max(λ, 1 − λ) (the reference
uses λ as drawn); labeled example i is mixed with unlabeled example i (the
labeled batch is tiled when uratio > 1), and the mixed target is
λ_i onehot(y_l_i) + (1 − λ_i) ŷ_i. The reference's KL(batchmean) and our soft
CE differ by the targets' entropy, a constant in θ: the gradients are equal.
`mixup_alpha = 0` turns mixup off (plain CE on the labeled batch).

Config block (`config.semimeta`, parsed into `SemiMetaHparams`; a missing key
takes the reference's value, `default_block()`): mode, inner_lr, label_lr,
mixup_alpha, weight, ramp_steps, meta_bn. `config.data.uratio` must be ≥ 1.
Metrics: losses/xe (the mixup CE), losses/xeu = losses/consistency (L_u(θ, ŷ)),
monitors/pseudo_label_accuracy = pseudo_labels/accuracy (argmax ŷ against the
hidden labels), pseudo_labels/accuracy_before (argmax ỹ), semimeta/*.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import (Method, Network, Task, check_choice,
                                   check_range, parse_block,
                                   pseudo_label_monitors, register,
                                   step_metrics)
from r2d2_jax.state import TrainState

PyTree = Any
LogitsFn = Callable[[PyTree], jax.Array]

MODES = ("exact", "first_order")
META_BN = ("eval", "train")


@dataclasses.dataclass(frozen=True)
class SemiMetaHparams:
  """The `config.semimeta` block; defaults: the reference's CIFAR-10 values.

  Attributes:
    mode: 'first_order' (one jvp) or 'exact' (grad through the inner step).
    inner_lr: α of the inner step, ≥ 0; None = the current learning rate.
    label_lr: per-row label step, ≥ 0; ŷ = ỹ − label_lr · n · g_y
      (1 = reference).
    mixup_alpha: a of Beta(a, a), ≥ 0; 0 disables mixup.
    weight: final weight of L_u(θ, ŷ), ≥ 0.
    ramp_steps: steps of the linear 0 → weight ramp (0: none).
    meta_bn: 'eval' (the reference) or 'train' mode for the meta forwards.
  """
  mode: str = "first_order"
  inner_lr: float | None = None
  label_lr: float = 1.0
  mixup_alpha: float = 1.0
  weight: float = 1.0
  ramp_steps: int = 4000
  meta_bn: str = "eval"

  def __post_init__(self):
    check_choice("mode", self.mode, MODES)
    if self.inner_lr is not None:
      check_range("inner_lr", self.inner_lr, 0.0)
    check_range("label_lr", self.label_lr, 0.0)
    check_range("mixup_alpha", self.mixup_alpha, 0.0)
    check_range("weight", self.weight, 0.0)
    check_range("ramp_steps", self.ramp_steps, 0, integer=True)
    check_choice("meta_bn", self.meta_bn, META_BN)


def default_block() -> ml_collections.ConfigDict:
  """`config.semimeta` with `SemiMetaHparams`' defaults (the reference's).

  `inner_lr` is a float field holding None (the current learning rate), so a
  config may set it to a number.
  """
  block = {f.name: f.default for f in dataclasses.fields(SemiMetaHparams)}
  block["inner_lr"] = ml_collections.FieldReference(None, field_type=float)
  return ml_collections.ConfigDict(block)


def hparams(config) -> SemiMetaHparams:
  """`config.semimeta` as `SemiMetaHparams` (missing keys: the defaults).

  Raises:
    R2D2Error: an unknown key or a bad value (naming the field), or no
      unlabeled data (`config.data.uratio` < 1).
  """
  if int(config.data.get("uratio", 0) or 0) < 1:
    raise R2D2Error("semimeta needs unlabeled data: set config.data.uratio "
                    ">= 1 (the reference uses 1: 128 labeled + 128 unlabeled).")
  return parse_block(SemiMetaHparams, config.get("semimeta"),
                     "config.semimeta")


# ---------------------------------------------------------------------------
# Pure pieces


def consistency_loss(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """L_u = mean_i ‖softmax(logits_i) − targets_i‖² (squared L2 over classes).

  Args:
    logits: [n, C] network outputs.
    targets: [n, C] target distributions.

  Returns:
    The scalar loss.
  """
  return jnp.mean(jnp.sum((jax.nn.softmax(logits) - targets) ** 2, axis=-1))


def meta_label_grad_exact(unlabeled_fn: LogitsFn, labeled_fn: LogitsFn,
                          params: PyTree, y_tilde: jax.Array,
                          y_l: jax.Array, alpha: jax.Array | float
                          ) -> jax.Array:
  """g_y = ∇ỹ CE(f(x_l; θ̃), y_l) with θ̃ = θ − α ∇θ L_u(θ, ỹ), by autodiff.

  Args:
    unlabeled_fn: params ↦ [n, C] logits of the unlabeled batch.
    labeled_fn: params ↦ [m, C] logits of the labeled batch.
    params: θ.
    y_tilde: [n, C] pseudo-labels ỹ.
    y_l: [m] integer labels.
    alpha: inner learning rate α.

  Returns:
    [n, C] gradient w.r.t. ỹ.
  """
  def outer(y):
    inner = lambda p, y: consistency_loss(unlabeled_fn(p), y)
    theta_tilde = meta.inner_step(inner, params, alpha, y)
    return losses.cross_entropy(labeled_fn(theta_tilde), y_l)
  return jax.grad(outer)(y_tilde)


def meta_label_grad_first_order(unlabeled_fn: LogitsFn, labeled_fn: LogitsFn,
                                params: PyTree, y_l: jax.Array,
                                alpha: jax.Array | float
                                ) -> tuple[jax.Array, jax.Array]:
  """g_y,i = (2α/n) J_i g with g = ∇θ CE(f(x_l; θ), y_l): one jvp.

  See the module docstring for the derivation of the constant 2α/n.

  Args:
    unlabeled_fn: params ↦ [n, C] logits of the unlabeled batch.
    labeled_fn: params ↦ [m, C] logits of the labeled batch.
    params: θ.
    y_l: [m] integer labels.
    alpha: inner learning rate α.

  Returns:
    (g_y [n, C], s(θ) [n, C]): the gradient, and the softmax outputs the jvp
    computed on the way (the pseudo-labels ỹ).
  """
  g = jax.grad(lambda p: losses.cross_entropy(labeled_fn(p), y_l))(params)
  probs, j_g = jax.jvp(lambda p: jax.nn.softmax(unlabeled_fn(p)), (params,),
                       (g,))
  n = probs.shape[0]
  return (2.0 * alpha / n) * j_g, probs


def update_labels(y_tilde: jax.Array, g_y: jax.Array,
                  step_size: jax.Array | float) -> jax.Array:
  """ŷ = normalize(relu(ỹ − step_size · g_y)), row by row.

  A row the step zeroes entirely keeps ỹ (the reference divides by 1 there,
  leaving an all-zero target; a distribution is the better fallback).

  Args:
    y_tilde: [n, C] pseudo-labels (distributions).
    g_y: [n, C] their meta-gradient.
    step_size: β.

  Returns:
    [n, C] non-negative rows summing to 1.
  """
  r = jax.nn.relu(y_tilde - step_size * g_y)
  sums = jnp.sum(r, axis=-1, keepdims=True)
  ok = sums > 0
  return jnp.where(ok, r / jnp.where(ok, sums, 1.0), y_tilde)


def mixup(rng: jax.Array, x_l: jax.Array, t_l: jax.Array, x_u: jax.Array,
          t_u: jax.Array, alpha: float) -> tuple[jax.Array, jax.Array]:
  """Pairs labeled i with unlabeled i, per-sample λ_i ~ Beta(α, α).

  The labeled batch is tiled to the unlabeled batch's size (uratio > 1).

  Args:
    rng: key for λ.
    x_l: [m, ...] labeled images; t_l: [m, C] their one-hot targets.
    x_u: [n, ...] unlabeled images (n a multiple of m); t_u: [n, C] targets.
    alpha: Beta concentration.

  Returns:
    (mixed images [n, ...], mixed targets [n, C]).
  """
  reps = x_u.shape[0] // x_l.shape[0]
  x_l = jnp.tile(x_l, (reps,) + (1,) * (x_l.ndim - 1))
  t_l = jnp.tile(t_l, (reps, 1))
  lam = jax.random.beta(rng, alpha, alpha, (x_u.shape[0],), jnp.float32)
  lam_x = lam.reshape((-1,) + (1,) * (x_u.ndim - 1)).astype(x_u.dtype)
  lam_t = lam[:, None].astype(t_u.dtype)
  return (lam_x * x_l + (1 - lam_x) * x_u, lam_t * t_l + (1 - lam_t) * t_u)


def step_keys(rng: jax.Array) -> dict[str, jax.Array]:
  """The step's independent random streams (named: tests reproduce them)."""
  names = ("meta", "mix", "forward_mix", "forward_unlabeled")
  return {n: jax.random.fold_in(rng, i) for i, n in enumerate(names)}


# ---------------------------------------------------------------------------
# The method


def views(hp: SemiMetaHparams) -> dict[str, tuple[str, ...]]:
  """Standard (weak) augmentation on both streams, as the reference."""
  del hp
  return {"labeled": ("weak",), "unlabeled": ("weak",)}


def train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
               task: Task, hp: SemiMetaHparams):
  """One SemiMeta step: meta-update the batch's pseudo-labels, then θ.

  Not `one_network_step`: the final loss takes two train-mode forwards (mixed
  images, then unlabeled images, as the reference), the second one starting
  from the BatchNorm statistics the first one updated.

  Args:
    state: the network.
    batch: 'labeled' {'weak', 'label'}, 'unlabeled' {'weak', 'label'} (the
      unlabeled labels only feed the pseudo-label accuracy).
    rng: this step's key (`step_keys`).
    net: the network (its schedule gives the default inner lr).
    task: num_classes.
    hp: `config.semimeta`.

  Returns:
    (new state, metrics).
  """
  keys = step_keys(rng)
  lab, unl = batch["labeled"], batch["unlabeled"]
  x_l, y_l, x_u = lab["weak"], lab["label"], unl["weak"]
  n = x_u.shape[0]
  lr = net.schedule(state.step)
  alpha = lr if hp.inner_lr is None else hp.inner_lr

  # Meta forwards: their updated BatchNorm statistics are dropped on purpose
  # (only the final loss's forwards may move the running averages).
  if hp.meta_bn == "train":
    fwd = lambda p, x: net.apply_train({"params": p, **state.model_state}, x,
                                       keys["meta"])[0]
  else:
    fwd = lambda p, x: net.apply_eval({"params": p, **state.model_state}, x)
  unlabeled_fn = lambda p: fwd(p, x_u)
  labeled_fn = lambda p: fwd(p, x_l)

  if hp.mode == "exact":
    y_tilde = jax.lax.stop_gradient(jax.nn.softmax(unlabeled_fn(state.params)))
    g_y = meta_label_grad_exact(unlabeled_fn, labeled_fn, state.params,
                                y_tilde, y_l, alpha)
  else:
    g_y, y_tilde = meta_label_grad_first_order(unlabeled_fn, labeled_fn,
                                               state.params, y_l, alpha)
  y_hat = jax.lax.stop_gradient(
      update_labels(y_tilde, g_y, hp.label_lr * n))

  weight = hp.weight * meta.linear_ramp(state.step, hp.ramp_steps)
  t_l = jax.nn.one_hot(y_l, task.num_classes, dtype=y_hat.dtype)
  if hp.mixup_alpha > 0:
    x_sup, t_sup = mixup(keys["mix"], x_l, t_l, x_u, y_hat, hp.mixup_alpha)
  else:
    x_sup, t_sup = x_l, t_l

  def loss_fn(params):
    # Two forwards, as the reference: BN statistics are updated by the mixed
    # batch, then by the unlabeled batch.
    logits_sup, model_state = net.apply_train(
        {"params": params, **state.model_state}, x_sup, keys["forward_mix"])
    logits_u, model_state = net.apply_train(
        {"params": params, **model_state}, x_u, keys["forward_unlabeled"])
    xe = losses.soft_cross_entropy(logits_sup, t_sup)
    cons = consistency_loss(logits_u, y_hat)
    return xe + weight * cons, (xe, cons, logits_u, model_state)

  (loss, (xe, cons, logits_u, model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads, net.tx, model_state, net.ema_decay)
  metrics = step_metrics(state, new_state, grads, net)
  # Diagnostics only: the unlabeled labels never enter the loss.
  monitors = pseudo_label_monitors(y_hat, unl["label"])
  metrics.update(monitors)
  metrics.update({
      "losses/xe": xe,
      "losses/xeu": cons,
      "losses/consistency": cons,
      "losses/total": loss,
      "semimeta/label_change": jnp.mean(jnp.sum(jnp.abs(y_hat - y_tilde), -1)),
      "semimeta/inner_lr": jnp.asarray(alpha, jnp.float32),
      "pseudo_labels/accuracy": monitors["monitors/pseudo_label_accuracy"],
      "pseudo_labels/accuracy_before": losses.accuracy(
          y_tilde, unl["label"], unl["label"] >= 0),
      "accuracy/train_unlabeled": losses.accuracy(
          logits_u, unl["label"], unl["label"] >= 0),
      "monitors/consistency_weight": weight,
  })
  return new_state, metrics


METHOD = register(Method(name="semimeta", hparams=hparams, views=views,
                         train_step=train_step))
