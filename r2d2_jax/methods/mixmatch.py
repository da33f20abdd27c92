"""MixMatch (docs/algorithms.md, "MixMatch"), one network.

  q      = sharpen(mean_k softmax(f(weak_k x_u)), T)       (no gradient)
  X, P   = [x_l; weak_1 x_u; ...; weak_K x_u], [onehot(y_l); q; ...; q]
  λ'_i   = max(λ_i, 1 − λ_i), λ_i ~ Beta(α, α) per row; π a permutation
  X', P' = λ' X + (1 − λ') X[π],  λ' P + (1 − λ') P[π]
  L      = CE(P'_l, f(X'_l)) + w(t) · mean_{i, c} (softmax(f(X'_u))_ic − P'_u,ic)²
  w(t)   = config.mixmatch.weight · min(1, t / ramp_steps).

As google-research/mixmatch `mixmatch.py` (mixmode 'xxy.yxy': one shuffle of
the whole pool, λ per row); the L2 loss is a mean over rows and classes. The
guesses come from train-mode forwards, one BatchNorm batch per view, whose
running statistics are dropped (the reference's `skip_ops`). With `interleave`
(the reference's `layers.interleave`), the mixed pool goes through BatchNorm as
1 + Kμ batches of B rows, each holding labeled and unlabeled rows, and only the
first updates the running statistics; without it, as one batch. The EMA model
averages the parameters only and evaluates with the raw running statistics
(the reference's EMA covers the trainable variables). Its weight decay is the
optimizer's `weight_decay_mode='after_update'` (r2d2_jax/optim.py).

Distribution alignment (off by default; `config.mixmatch.alignment`, parsed
by `methods/alignment.py`, target 'uniform' or 'labeled'), as ReMixMatch
applies it to its guess: on the K-view average, before sharpening,

  q = sharpen(Normalize(p̄ · (p_target + ε) / (p_model + ε)), T),
  p̄ = mean_k softmax(f(weak_k x_u)),

the running estimate p_model updated with this batch's mean of p̄ first; its
statistics are `MixMatchState.alignment` (the state is a plain `TrainState`
when alignment is off). Target 'model' needs an unmixed labeled prediction,
which MixMatch's step does not compute: it is an error.

Config block (`config.mixmatch`, parsed into `MixMatchHparams`): weight,
ramp_steps, temperature, alpha, num_views, interleave, and the `alignment`
sub-block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from r2d2_jax import losses
from r2d2_jax import meta
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods.base import (Method, Network, Task, check_range,
                                   parse_block, pseudo_label_monitors,
                                   register, step_metrics)
from r2d2_jax.state import TrainState

PyTree = Any
ALIGNMENT = "config.mixmatch.alignment"


class MixMatchState(TrainState):
  """A `TrainState` with distribution alignment's running estimates.

  Used only when alignment is on (otherwise the state is a `TrainState`).
  """
  alignment: PyTree = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MixMatchHparams:
  """The `config.mixmatch` block (docs/algorithms.md, "MixMatch").

  Attributes:
    weight: λu, the weight of the unlabeled L2 loss, ≥ 0.
    ramp_steps: the weight ramps linearly from 0 over this many steps (0: none).
    temperature: T of the sharpening, > 0.
    alpha: α of MixUp's Beta(α, α), > 0.
    num_views: K weak views of each unlabeled image, ≥ 1.
    interleave: BatchNorm over 1 + Kμ interleaved batches (the reference), or
      over the whole mixed batch at once.
    alignment: distribution alignment of the averaged guess (module
      docstring), off by default.
  """
  weight: float
  ramp_steps: int = 0
  temperature: float = 0.5
  alpha: float = 0.75
  num_views: int = 2
  interleave: bool = True
  alignment: alignment_lib.AlignmentHparams = alignment_lib.AlignmentHparams()

  def __post_init__(self):
    check_range("weight", self.weight, 0.0)
    check_range("ramp_steps", self.ramp_steps, 0, integer=True)
    check_range("temperature", self.temperature, 0.0, lo_open=True)
    check_range("alpha", self.alpha, 0.0, lo_open=True)
    check_range("num_views", self.num_views, 1, integer=True)
    if not isinstance(self.interleave, bool):
      raise ValueError(f"interleave={self.interleave!r} must be True or False.")

  def weight_at(self, step: jax.Array) -> jax.Array:
    """w(t): `weight` ramped linearly from 0 over `ramp_steps`."""
    return self.weight * meta.linear_ramp(step, self.ramp_steps)


def hparams(config) -> MixMatchHparams:
  """`config.mixmatch` as `MixMatchHparams`; checks the unlabeled batch."""
  block = config.get("mixmatch")
  values = None if block is None else {
      k: v for k, v in block.items() if k != "alignment"}
  al = alignment_lib.parse(None if block is None else block.get("alignment"),
                           ALIGNMENT)
  if al.enabled and al.target == "model":
    raise R2D2Error(
        f"{ALIGNMENT}.target='model': MixMatch's step has no unmixed "
        "prediction on the labeled batch to estimate it from; use 'labeled' "
        "(ReMixMatch) or 'uniform'.")
  hp = parse_block(MixMatchHparams, values, "config.mixmatch", alignment=al)
  b = int(config.data.batch_size)
  uratio = config.data.get("uratio", 0) or 0
  u = int(round(uratio * b))
  if u <= 0:
    raise R2D2Error(f"config.data.uratio={uratio}: MixMatch needs an unlabeled "
                    "batch; set config.data.uratio > 0 (the reference: 1).")
  if hp.interleave and (hp.num_views * u) % b:
    raise R2D2Error(
        f"config.data.uratio={uratio}: with config.mixmatch.interleave the "
        f"mixed batch ({b} + {hp.num_views}·{u} rows) must be a whole number "
        f"of labeled batches ({b}); choose an integer uratio·num_views or "
        "interleave=False.")
  return hp


def view_names(hp: MixMatchHparams) -> tuple[str, ...]:
  return ("weak",) + tuple(f"weak_{k}" for k in range(1, hp.num_views))


def views(hp: MixMatchHparams) -> dict[str, tuple[str, ...]]:
  return {"labeled": ("weak",), "unlabeled": view_names(hp)}


def init_state(rng: jax.Array, *, net: Network, task: Task,
               hp: MixMatchHparams) -> TrainState:
  """The network; with alignment on, a `MixMatchState` with its estimates."""
  base = net.init_train_state(rng)
  if not hp.alignment.enabled:
    return base
  return MixMatchState.extending(
      base, alignment=alignment_lib.init_stats(task, hp.alignment, ALIGNMENT))


def guess_labels(probs: jax.Array, temperature: float) -> jax.Array:
  """sharpen(mean over views): probs [K, U, C] → [U, C], no gradient."""
  return jax.lax.stop_gradient(losses.sharpen(jnp.mean(probs, 0), temperature))


def mix_draw(key: jax.Array, n: int, alpha: float, dtype=jnp.float32
             ) -> tuple[jax.Array, jax.Array]:
  """MixUp's draw for n rows: (λ' = max(λ, 1 − λ) [n], λ ~ Beta(α, α); π [n])."""
  k_lam, k_perm = jax.random.split(key)
  lam = jax.random.beta(k_lam, alpha, alpha, (n,), dtype)
  return jnp.maximum(lam, 1.0 - lam), jax.random.permutation(k_perm, n)


def interleave_index(groups: int, size: int) -> np.ndarray:
  """The reference's `interleave` of `groups` batches of `size` rows, as a row order.

  Batch 0 swaps its p-th slice with the p-th slice of batch p, so every batch
  holds rows of each; the order is its own inverse.
  """
  sizes = [size // groups] * groups
  for x in range(size - sum(sizes)):
    sizes[-x - 1] += 1
  cut = np.cumsum([0] + sizes)
  rows = np.arange(groups * size).reshape(groups, size)
  parts = [[r[cut[p]:cut[p + 1]] for p in range(groups)] for r in rows]
  for i in range(1, groups):
    parts[0][i], parts[i][i] = parts[i][i], parts[0][i]
  return np.concatenate([np.concatenate(p) for p in parts])


def forward_groups(net: Network, variables, x: jax.Array, rng: jax.Array,
                   groups: int):
  """Train-mode forward of x as `groups` BatchNorm batches (consecutive rows).

  Returns (logits [N, C], the mutable collections updated by the first batch).
  """
  xs = x.reshape(groups, -1, *x.shape[1:])
  fwd = lambda xb, k: net.apply_train(variables, xb, k)
  logits, states = jax.vmap(fwd)(xs, jax.random.split(rng, groups))
  return (logits.reshape(-1, logits.shape[-1]),
          jax.tree.map(lambda a: a[0], states))


def train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
               hp: MixMatchHparams):
  """One Adam (or the configured optimizer) step on the MixMatch loss.

  Args:
    state: the network.
    batch: 'labeled' {'weak', 'label'}, 'unlabeled' {'weak', 'weak_1', ...}.
    rng: this step's key: the guess forwards, the MixUp draw, the training
      forwards (`fold_in(rng, 0 / 1 / 2)`).
    net: the network.
    hp: `config.mixmatch`.

  Returns:
    (new state, metrics).
  """
  lab, unl = batch["labeled"], batch["unlabeled"]
  x_l, y_l = lab["weak"], lab["label"]
  b, k = x_l.shape[0], hp.num_views
  k_guess, k_mix, k_fwd = (jax.random.fold_in(rng, i) for i in range(3))
  x_u = jnp.concatenate([unl[v] for v in view_names(hp)])     # view-major
  logits_u, _ = forward_groups(net, state.variables(), x_u, k_guess, k)
  probs = jax.nn.softmax(logits_u).reshape(k, -1, logits_u.shape[-1])
  if hp.alignment.enabled:
    mean, da_stats = alignment_lib.align(
        jax.lax.stop_gradient(jnp.mean(probs, 0)), None, state.alignment,
        hp.alignment)
    q = jax.lax.stop_gradient(losses.sharpen(mean, hp.temperature))
  else:
    q = guess_labels(probs, hp.temperature)

  x = jnp.concatenate([x_l, x_u])
  p = jnp.concatenate([jax.nn.one_hot(y_l, q.shape[-1], dtype=q.dtype)] +
                      [q] * k)
  lam, perm = mix_draw(k_mix, x.shape[0], hp.alpha, x.dtype)
  x_mix = (lam.reshape(-1, *[1] * (x.ndim - 1)) * x +
           (1 - lam.reshape(-1, *[1] * (x.ndim - 1))) * x[perm])
  p_mix = lam[:, None] * p + (1 - lam[:, None]) * p[perm]
  groups = x.shape[0] // b if hp.interleave else 1
  order = interleave_index(groups, x.shape[0] // groups)
  weight = hp.weight_at(state.step)

  def objective(params):
    variables = {"params": params, **state.model_state}
    logits, model_state = forward_groups(net, variables, x_mix[order], k_fwd,
                                         groups)
    logits = logits[order]                                     # back in order
    xe = losses.soft_cross_entropy(logits[:b], p_mix[:b])
    l2u = jnp.mean(jnp.square(jax.nn.softmax(logits[b:]) - p_mix[b:]))
    return xe + weight * l2u, (xe, l2u, logits[:b], model_state)

  (loss, (xe, l2u, logits_l, model_state)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  new = state.apply_gradients(grads, net.tx, model_state, net.ema_decay)
  new = new.replace(ema_model_state=new.model_state)
  if hp.alignment.enabled:
    new = new.replace(alignment=jax.lax.stop_gradient(da_stats))
  metrics = step_metrics(state, new, grads, net)
  metrics.update({"losses/total": loss, "losses/xe": xe, "losses/xeu": l2u,
                  "accuracy/train": losses.accuracy(logits_l, y_l),
                  "monitors/weight": weight, "monitors/lambda": jnp.mean(lam)})
  metrics.update(pseudo_label_monitors(q, unl["label"]))
  return new, metrics


METHOD = register(Method(name="mixmatch", hparams=hparams, views=views,
                         init_state=init_state, train_step=train_step))
