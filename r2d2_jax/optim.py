"""Optimizers and learning-rate schedules from config.

An optimizer block looks like
  optimizer = dict(name='sgd', lr=0.03, momentum=0.9, nesterov=True,
                   weight_decay=5e-4, grad_clip_norm=0.0,
                   schedule=dict(name='cosine', warmup_steps=0, wait_steps=0,
                                 decay_steps=None))
Schedules: 'constant', 'cosine' (half cosine to 0 over `decay_steps`, which may be
longer than the run, as in R2-D2's "scheduled for 350 epochs"), 'fixmatch_cosine'
(lr·cos(7πk/16K)), 'piecewise' (at each of `boundaries` — steps — or of
`boundary_fractions` of the horizon, the lr is multiplied by the matching entry
of `scales`; multipliers compound, as in optax).
All take a linear `warmup_steps` and `wait_steps` of lr 0 before it (the MPL
student waits 3000 steps).

`decay_mask` chooses which parameters weight decay touches (docs/algorithms.md,
"Optimizers, weight decay and models"):
  'all'         every parameter (PyTorch's `SGD(model.parameters(), weight_decay)`:
                the R2-D2 and SemiMeta references);
  'kernels'     convolution and dense kernels only (FixMatch, Mean Teacher);
  'no_bn'       all but normalisation layers' scale and bias (the MPL reference:
                `common_utils.add_weight_decay` skips BatchNorm variables and
                decays the classifier's bias; kekmodel's `no_decay = ['bn']`);
  'no_bn_bias'  all but normalisation layers and every bias.
A normalisation layer is recognised by structure, not by name: a module whose
parameters include 'scale' (BatchNorm, LayerNorm, GroupNorm).

`weight_decay_mode` says how 'sgd' and 'adam' apply it:
  'coupled'       (default) L2: wd·θ added to the gradient before the optimizer;
  'after_update'  after the optimizer's step, the decayed parameters are scaled
                  θ ← (θ + u)·(1 − wd·lr_t), lr_t the schedule's rate: the
                  MixMatch reference (google-research/mixmatch `mixmatch.py`:
                  `wd *= lr` and `v ← v·(1 − wd)` on the kernels after Adam).

`b1_schedule` ('adam', 'adamw'; absent or None: β1 = `b1` throughout) makes
Adam's β1 piecewise constant: `dict(boundaries=(s_1, ...), values=(v_1, ...))`
sets β1 = v_i from step s_i on (`b1` before s_1). vat_tf's `train_semisup.py`
feeds β1 = 0.5 (`mom2`) from the first decay epoch on, 0.9 (`mom1`) before.
The moment update is m ← β1(t)·m + (1 − β1(t))·g and its bias correction
1 − β1(t)^(t+1), optax's with β1 read at each step (TF's Adam corrects with the
product of the β1s fed so far; both are 1 to float precision once a switch
comes after a few hundred steps).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import optax

from r2d2_jax.errors import R2D2Error, unknown_name

SCHEDULES = ("constant", "cosine", "fixmatch_cosine", "piecewise")
OPTIMIZERS = ("sgd", "adam", "adamw")
DECAY_MASKS = ("all", "kernels", "no_bn", "no_bn_bias")
WEIGHT_DECAY_MODES = ("coupled", "after_update")


def decay_mask(name: str) -> Callable[[Any], Any]:
  """The weight-decay mask `name` as a function params -> tree of bools.

  Args:
    name: one of `DECAY_MASKS`.

  Returns:
    A function mapping a params tree to a tree of the same structure whose
    leaves say whether weight decay applies to that parameter.

  Raises:
    R2D2Error: for an unknown name; the message lists the valid ones.
  """
  if name not in DECAY_MASKS:
    raise R2D2Error(
        f"Unknown optimizer.decay_mask {name!r}. Valid decay masks: "
        f"{', '.join(DECAY_MASKS)}.")

  def keep(leaf_name: str, module: Any) -> bool:
    is_norm = isinstance(module, Mapping) and "scale" in module
    if name == "all":
      return True
    if name == "kernels":
      return leaf_name == "kernel"
    if name == "no_bn":
      return not is_norm
    return not is_norm and leaf_name != "bias"

  def walk(node):
    return [x for k in sorted(node) for x in
            (walk(node[k]) if isinstance(node[k], Mapping) else [keep(k, node)])]

  def mask(params):
    if not isinstance(params, Mapping):
      raise R2D2Error("decay_mask expects a params dict (module -> leaves).")
    # Leaves in sorted-key order, as jax flattens dicts (and FrozenDicts).
    return jax.tree.unflatten(jax.tree.structure(params), walk(params))

  return mask


def decay_after_update(rate: float, schedule: optax.Schedule,
                       mask: Callable[[Any], Any]
                       ) -> optax.GradientTransformation:
  """Weight decay applied after the optimizer's step: θ' = (θ + u)·(1 − rate·lr_t).

  Chained after the optimizer, it rewrites the updates u of the parameters
  `mask` selects to u − rate·lr_t·(θ + u), lr_t = `schedule(t)` at this step
  (its own count, as optax's schedules keep): the new parameters are the
  stepped ones, shrunk (the MixMatch reference's `v ← v·(1 − wd·lr)`).
  """

  def init(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("decay_after_update needs the params.")
    factor = rate * schedule(state.count)
    new = jax.tree.map(
        lambda u, p, keep: u - (factor * (p + u)).astype(u.dtype) if keep else u,
        updates, params, mask(params))
    return new, optax.ScaleByScheduleState(
        count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init, update)


def make_schedule(lr: float, config: ml_collections.ConfigDict | None,
                  total_steps: int) -> optax.Schedule:
  """Builds the learning-rate schedule.

  Args:
    lr: the base (peak) learning rate.
    config: the schedule block (None: constant).
    total_steps: the run's length; the default horizon of decays.

  Returns:
    A function step -> learning rate.
  """
  config = config or ml_collections.ConfigDict({"name": "constant"})
  name = config.get("name", "constant")
  warmup = int(config.get("warmup_steps", 0) or 0)
  wait = int(config.get("wait_steps", 0) or 0)
  horizon = int(config.get("decay_steps", 0) or total_steps)
  decay_len = max(1, horizon - warmup - wait)

  if name == "constant":
    main = lambda k: jnp.asarray(lr, jnp.float32)
  elif name == "cosine":
    main = lambda k: lr * 0.5 * (1 + jnp.cos(
        math.pi * jnp.minimum(k, decay_len) / decay_len))
  elif name == "fixmatch_cosine":
    main = lambda k: lr * jnp.cos(7 * math.pi * jnp.minimum(k, decay_len) /
                                  (16 * decay_len))
  elif name == "piecewise":
    boundaries = list(config.get("boundaries", ()))
    if config.get("boundary_fractions"):
      boundaries = [round(f * horizon) for f in config.boundary_fractions]
    scales = list(config.get("scales", ()))
    if len(boundaries) != len(scales):
      raise ValueError("schedule.boundaries and schedule.scales must have the "
                       "same length")
    main = optax.piecewise_constant_schedule(
        lr, {int(b) - warmup - wait: s for b, s in zip(boundaries, scales)})
  else:
    raise unknown_name("schedule", name, SCHEDULES)

  def schedule(step):
    k = jnp.asarray(step, jnp.float32) - wait
    ramp = jnp.clip((k + 1) / warmup, 0.0, 1.0) if warmup else 1.0
    value = ramp * main(jnp.maximum(k - warmup, 0))
    return jnp.where(k < 0, 0.0, value).astype(jnp.float32)

  return schedule


def b1_schedule(b1: float, config: ml_collections.ConfigDict | None
                ) -> float | optax.Schedule:
  """β1 as a number (no `config`) or a piecewise-constant function of the step.

  Args:
    b1: β1 before the first boundary.
    config: the `b1_schedule` block: boundaries (strictly increasing steps
      ≥ 1) and values (one β1 in [0, 1) each), or None.

  Raises:
    R2D2Error: for unequal lengths, unsorted boundaries or a β1 outside [0, 1).
  """
  if config is None:
    return b1
  boundaries = [int(b) for b in config.get("boundaries", ())]
  values = [float(v) for v in config.get("values", ())]
  if not boundaries or len(boundaries) != len(values):
    raise R2D2Error(
        "optimizer.b1_schedule needs boundaries and values of one length "
        f"(≥ 1); got {len(boundaries)} boundaries and {len(values)} values.")
  if boundaries[0] < 1 or any(a >= b for a, b in zip(boundaries,
                                                     boundaries[1:])):
    raise R2D2Error(
        "optimizer.b1_schedule.boundaries must be strictly increasing steps "
        f"≥ 1; got {tuple(boundaries)}.")
  bad = [v for v in [b1] + values if not 0.0 <= v < 1.0]
  if bad:
    raise R2D2Error(f"Adam's β1 must be in [0, 1); got {bad[0]} in "
                    "optimizer.b1 / optimizer.b1_schedule.values.")
  starts = jnp.asarray(boundaries, jnp.int32)
  table = jnp.asarray([b1] + values)   # float32, or float64 under jax x64

  def schedule(step):
    return table[jnp.sum(jnp.asarray(step, jnp.int32) >= starts)]

  return schedule


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds the optax optimizer and its schedule from an optimizer block.

  Weight decay is coupled L2 (added to the gradient before momentum) for SGD, as
  in the reference implementations of every paper here, and decoupled for
  'adamw'. It applies to the parameters chosen by `config.decay_mask` (default
  'all'; see `decay_mask`). `config.weight_decay_mode='after_update'` (sgd,
  adam) instead shrinks them after the step (`decay_after_update`).

  Returns:
    (tx, schedule).

  Raises:
    R2D2Error: for an unknown optimizer, schedule, decay mask or weight-decay
      mode, or a `b1_schedule` that is malformed or given to 'sgd'.
  """
  name = config.get("name", "sgd")
  schedule = make_schedule(config.lr, config.get("schedule"), total_steps)
  wd = config.get("weight_decay", 0.0) or 0.0
  mask = decay_mask(config.get("decay_mask", "all") or "all")
  mode = config.get("weight_decay_mode", "coupled") or "coupled"
  if mode not in WEIGHT_DECAY_MODES:
    raise R2D2Error(
        f"Unknown optimizer.weight_decay_mode {mode!r}. Valid modes: "
        f"{', '.join(WEIGHT_DECAY_MODES)}.")
  if mode != "coupled" and name not in ("sgd", "adam"):
    raise R2D2Error(
        f"optimizer.weight_decay_mode={mode!r} applies to 'sgd' and 'adam'; "
        f"{name!r} decays its own way (leave the mode 'coupled').")
  coupled = wd and mode == "coupled"
  if config.get("b1_schedule") is not None and name not in ("adam", "adamw"):
    raise R2D2Error(
        f"optimizer.b1_schedule is Adam's β1; optimizer {name!r} has none "
        "(remove the block or use 'adam' / 'adamw').")
  b1 = b1_schedule(config.get("b1", 0.9), config.get("b1_schedule"))
  # A scheduled β1 is injected as a hyperparameter (read at each step's count).
  adam = optax.adam if not callable(b1) else optax.inject_hyperparams(optax.adam)
  adamw = (optax.adamw if not callable(b1)
           else optax.inject_hyperparams(optax.adamw, static_args="mask"))
  parts = []
  if config.get("grad_clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if name == "sgd":
    if coupled:
      parts.append(optax.add_decayed_weights(wd, mask=mask))
    parts.append(optax.sgd(schedule, momentum=config.get("momentum", 0.9) or None,
                           nesterov=config.get("nesterov", False)))
  elif name == "adam":
    if coupled:
      parts.append(optax.add_decayed_weights(wd, mask=mask))
    parts.append(adam(schedule, b1=b1, b2=config.get("b2", 0.999)))
  elif name == "adamw":
    parts.append(adamw(schedule, b1=b1, b2=config.get("b2", 0.999),
                       weight_decay=wd, mask=mask))
  else:
    raise unknown_name("optimizer", name, OPTIMIZERS)
  if wd and mode == "after_update":
    parts.append(decay_after_update(wd, schedule, mask))
  return optax.chain(*parts), schedule
