"""What a method is: a few pure functions over an explicit state pytree.

A method module defines a `Method` with
  views(config) -> {'labeled': ('weak',), 'unlabeled': ('weak', 'strong')}
      which augmented views of which stream its step reads;
  init_state(rng, ctx) -> state
      a fresh state (a `TrainState`, a subclass with more fields, or a pytree of
      several, e.g. teacher and student);
  train_step(state, batch, rng, ctx) -> (state, metrics)
      one pure, jittable step; `batch[stream][view]` are normalised float images,
      `batch[stream]['label']` / `['index']` int32;
and optionally
  eval_variables(state) -> {'raw': variables, 'ema': variables}
      the networks to evaluate (accuracy/{test,val}/raw, .../ema);
  state_sharding(abstract_state, mesh) -> shardings
      default: everything replicated;
  init_from(state, previous, ctx) -> state
      start from a previous stage's checkpoint (default: copy its network);
  hooks: host-side callbacks run before each step,
      `hook(stage, state, step) -> (state, metrics or None)` (e.g. R2-D2's
      reprediction and pseudo-label diagnostics);
  augment_state(state) -> pytree or None
      what the augmentation policies may read (docs/algorithms.md,
      "Augmentation policies"); default None.
`ctx` (a `Context`) carries the model, optimizer, schedule and config; the trainer
binds it with `functools.partial` before `jax.jit`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r2d2_jax.errors import R2D2Error
from r2d2_jax.state import TrainState

PyTree = Any
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Context:
  """Everything static a step needs, bound before jit.

  Attributes:
    config: the full experiment config.
    model: the Flax module.
    tx: the optimizer.
    schedule: its learning-rate schedule.
    num_classes: number of classes.
    num_train: rows of the train split (size of a per-example table).
    image_shape: (H, W, C) of model inputs.
    total_steps: length of this stage.
    steps_per_epoch: steps for one pass over the unlabeled (else labeled) set.
    mesh: the device mesh (for sharded per-example tables).
    labeled_index: train-split rows of the labeled examples.
    unlabeled_index: train-split rows of the unlabeled pool.
    train_labels: true labels of the train split (diagnostics only: a method
      must never train on the labels of unlabeled rows).
  """
  config: ml_collections.ConfigDict
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  num_classes: int
  num_train: int
  image_shape: tuple[int, int, int]
  total_steps: int
  steps_per_epoch: int
  mesh: Mesh | None = None
  labeled_index: np.ndarray | None = None
  unlabeled_index: np.ndarray | None = None
  train_labels: np.ndarray | None = None

  @property
  def ema_decay(self) -> float:
    return float(self.config.get("ema_decay", 0.0) or 0.0)

  def rngs(self, rng: jax.Array) -> dict[str, jax.Array]:
    """One rng per stream the model draws from (dropout, shake-shake, ...)."""
    names = getattr(self.model, "rng_names", ("dropout",))
    return {n: jax.random.fold_in(rng, i) for i, n in enumerate(names)}

  def apply_train(self, variables: PyTree, x: jax.Array, rng: jax.Array,
                  **kwargs) -> tuple[jax.Array, PyTree]:
    """Forward pass in train mode; returns (logits, updated mutable collections)."""
    mutable = [k for k in variables if k != "params"]
    out, new_state = self.model.apply(variables, x, train=True,
                                      rngs=self.rngs(rng), mutable=mutable,
                                      **kwargs)
    return out, flax.core.unfreeze(new_state)

  def apply_eval(self, variables: PyTree, x: jax.Array, **kwargs) -> jax.Array:
    """Forward pass in eval mode (running BN statistics, no dropout)."""
    return self.model.apply(variables, x, train=False, **kwargs)

  def init_train_state(self, rng: jax.Array) -> TrainState:
    """Initialises the network and its optimizer state."""
    x = jax.numpy.zeros((1, *self.image_shape), jax.numpy.float32)
    variables = self.model.init({"params": rng, **self.rngs(rng)}, x,
                                train=False)
    return TrainState.create(variables, self.tx)


def no_augment_state(state: PyTree) -> None:
  """Methods whose augmentations read no state (every method today)."""
  del state
  return None


def default_eval_variables(state: TrainState) -> dict[str, PyTree]:
  return {"raw": state.variables(), "ema": state.variables(ema=True)}


def replicate_all(abstract_state: PyTree, mesh: Mesh) -> PyTree:
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state)


def copy_network(state: TrainState, previous: Mapping[str, Any],
                 ctx: Context) -> TrainState:
  """Starts from a previous stage's network (raw and EMA weights, BN statistics).

  The optimizer state and step start fresh: a new stage has its own schedule.
  """
  del ctx
  prev = previous.get("student", previous)  # teacher/student states: the student.
  out = {}
  for field in ("params", "model_state", "ema_params", "ema_model_state"):
    if field not in prev:
      raise R2D2Error(
          f"init_from checkpoint has no {field!r}; it holds "
          f"{sorted(prev)}. Is it a checkpoint of this library?")
    new, old = getattr(state, field), prev[field]
    if (jax.tree.structure(new) != jax.tree.structure(old) or
        [x.shape for x in jax.tree.leaves(new)] !=
        [tuple(x.shape) for x in jax.tree.leaves(old)]):
      raise R2D2Error(
          f"init_from checkpoint's {field!r} do not match this model "
          "(different architecture or number of classes).")
    out[field] = jax.tree.map(lambda n, o: jax.numpy.asarray(o, n.dtype), new,
                              old)
  return state.replace(**out)


@dataclasses.dataclass(frozen=True)
class Method:
  """A semi-supervised method: pure functions over its state pytree."""
  name: str
  views: Callable[[ml_collections.ConfigDict], dict[str, tuple[str, ...]]]
  init_state: Callable[..., PyTree]
  train_step: Callable[..., tuple[PyTree, Metrics]]
  eval_variables: Callable[[PyTree], dict[str, PyTree]] = default_eval_variables
  state_sharding: Callable[[PyTree, Mesh], PyTree] = replicate_all
  init_from: Callable[..., PyTree] = copy_network
  hooks: tuple[Any, ...] = ()
  # The part of the state the augmentation policies read (e.g. CTAugment's bin
  # weights), handed to every view by the trainer; None: no policy reads state.
  augment_state: Callable[[PyTree], PyTree | None] = no_augment_state


def step_metrics(state: TrainState, grads: PyTree, ctx: Context) -> Metrics:
  """The metrics every method logs: lr, l2_grads, l2_params."""
  return {"lr": ctx.schedule(state.step),
          "l2_grads": optax.tree.norm(grads),
          "l2_params": optax.tree.norm(state.params)}
