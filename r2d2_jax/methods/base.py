"""What a method is: a few pure functions over an explicit state pytree.

A method module builds a `Method` and registers it (`@register` or
`register(Method(...))`); every module of `r2d2_jax.methods` is imported when
the package is, so a new file is a new method. A `Method` has
  hparams(config[, *, task]) -> hp
      its typed, frozen hyperparameters, parsed and validated once when the
      stage is built (it may read the `Task`, e.g. `total_steps` for a second
      optimizer's schedule) (`parse_block`: an unknown or missing key, or a value out of
      range, is an `R2D2Error` naming the field);
  views(hp) -> {'labeled': ('weak',), 'unlabeled': ('weak', 'strong')}
      which augmented views of which stream its step reads;
  init_state(rng, *, net, task, hp) -> state
      a fresh state (a `TrainState`, a subclass with more fields, or a pytree of
      several, e.g. teacher and student);
  train_step(state, batch, rng, *, net, task, hp) -> (state, metrics)
      one pure, jittable step; `batch[stream][view]` are normalised float images,
      `batch[stream]['label']` / `['index']` int32 (the unlabeled labels are
      the hidden true labels: diagnostics only);
and optionally
  eval_variables(state) -> {'raw': variables, 'ema': variables}
      the networks to evaluate (accuracy/{test,val}/raw, .../ema);
  state_sharding(abstract_state, mesh) -> shardings
      default: everything replicated;
  init_from(state, previous, *, net, task, hp) -> state
      start from a previous stage's checkpoint (default: copy its network);
  hooks: host-side callbacks run before each step,
      `hook(hooks: HookContext, state, step) -> (state, metrics or None)` (e.g.
      R2-D2's reprediction and pseudo-label diagnostics);
  augment_state(state) -> pytree or None
      what the augmentation policies may read (docs/algorithms.md,
      "Augmentation policies"); default None.

The keyword arguments are bound by name (`bind`): a function receives only the
ones its signature names, so a step that reads `net` and `hp` says so, and
nothing else reaches it. `net` (a `Network`) is the model with its optimizer,
schedule and EMA decay; `task` (a `Task`) the facts of the data (classes, rows,
the split, the mesh); `hp` the method's hyperparameters.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r2d2_jax import losses
from r2d2_jax import table as table_lib
from r2d2_jax.errors import R2D2Error, unknown_name
from r2d2_jax.state import TrainState

PyTree = Any
Metrics = dict[str, jax.Array]


# ---------------------------------------------------------------------------
# What a step may read


@dataclasses.dataclass(frozen=True, eq=False)
class Network:
  """One network and how it is trained: model, optimizer, schedule, EMA.

  Attributes:
    model: the Flax module.
    tx: the optimizer.
    schedule: its learning-rate schedule (logged as `lr`; meta-steps read it).
    image_shape: (H, W, C) of model inputs.
    ema_decay: decay of the EMA weights (0: EMA = raw weights).
  """
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  image_shape: tuple[int, int, int]
  ema_decay: float = 0.0

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

  def init_train_state(self, rng: jax.Array,
                       tx: optax.GradientTransformation | None = None
                       ) -> TrainState:
    """Initialises the network and its optimizer state (`tx`, default `self.tx`)."""
    x = jnp.zeros((1, *self.image_shape), jnp.float32)
    variables = self.model.init({"params": rng, **self.rngs(rng)}, x,
                                train=False)
    return TrainState.create(variables, tx or self.tx)


@dataclasses.dataclass(frozen=True, eq=False)
class Task:
  """Facts of the data a stage trains on (host-side; static under jit).

  Attributes:
    num_classes: number of classes.
    num_train: rows of the train split (size of a per-example table).
    total_steps: length of this stage.
    steps_per_epoch: steps for one pass over the unlabeled (else labeled) set.
    mesh: the device mesh (for sharded per-example tables).
    labeled_index: train-split rows of the labeled examples.
    unlabeled_index: train-split rows of the unlabeled pool.
    train_labels: true labels of the train split (diagnostics only: a method
      must never train on the labels of unlabeled rows).
  """
  num_classes: int
  num_train: int
  total_steps: int
  steps_per_epoch: int
  mesh: Mesh | None = None
  labeled_index: np.ndarray | None = None
  unlabeled_index: np.ndarray | None = None
  train_labels: np.ndarray | None = None


def bind(fn: Callable[..., Any], **available: Any) -> Callable[..., Any]:
  """`fn` with the keyword arguments its signature names taken from `available`.

  A function that names an argument `available` lacks is an error here, when
  the stage is built, not a TypeError at the first traced step.
  """
  params = inspect.signature(fn).parameters
  if any(p.kind is p.VAR_KEYWORD for p in params.values()):
    return functools.partial(fn, **available)
  lacking = [p.name for p in params.values()
             if p.kind is p.KEYWORD_ONLY and p.default is p.empty and
             p.name not in available]
  if lacking:
    raise TypeError(
        f"{getattr(fn, '__qualname__', fn)} names keyword argument(s) "
        f"{lacking}; the trainer provides {sorted(available)}.")
  named = {k: v for k, v in available.items() if k in params}
  return functools.partial(fn, **named) if named else fn


# ---------------------------------------------------------------------------
# Hyperparameters


class NoHparams(typing.NamedTuple):
  """A method without hyperparameters."""


def _field_doc(cls) -> str:
  parts = []
  for f in dataclasses.fields(cls):
    if f.default is not dataclasses.MISSING:
      parts.append(f"{f.name}={f.default!r}")
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore
      parts.append(f"{f.name}={f.default_factory()!r}")  # type: ignore
    else:
      parts.append(f"{f.name} (required)")
  return ", ".join(parts)


def _plain(value: Any) -> Any:
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, list):
    return tuple(_plain(v) for v in value)
  return value


def parse_block(cls: type, block: Mapping[str, Any] | None, where: str,
                **extra: Any) -> Any:
  """Builds the frozen dataclass `cls` from a config block, validated.

  Args:
    cls: a frozen dataclass; its `__post_init__` may raise `ValueError` naming
      a field (use `check_range` / `check_choice`).
    block: the config block (`config.fixmatch`, ...); None: all defaults.
    where: the block's path in the config, e.g. 'config.fixmatch', for errors.
    **extra: fields that do not come from the block (e.g. the top-level
      `label_smoothing`); None values are dropped (the field's default).

  Returns:
    An instance of `cls`.

  Raises:
    R2D2Error: an unknown key, a missing required key, or a value out of range,
      naming the field and listing the method's fields.
  """
  values = dict(block.items()) if block is not None else {}
  values = {k: _plain(v) for k, v in values.items()}
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - names)
  if unknown:
    raise R2D2Error(
        f"{where}: unknown key(s) {', '.join(unknown)}. {cls.__name__} has: "
        f"{_field_doc(cls)}.")
  values.update({k: v for k, v in extra.items() if v is not None})
  missing = [f.name for f in dataclasses.fields(cls)
             if f.name not in values and f.default is dataclasses.MISSING and
             f.default_factory is dataclasses.MISSING]  # type: ignore
  if missing:
    raise R2D2Error(
        f"{where}: missing key(s) {', '.join(missing)}. {cls.__name__} has: "
        f"{_field_doc(cls)}.")
  try:
    return cls(**values)
  except (ValueError, TypeError) as e:
    raise R2D2Error(f"{where}: {e}") from None


def check_range(name: str, value: Any, lo: float | None = None,
                hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, integer: bool = False) -> None:
  """Raises ValueError unless `value` lies in the interval (for `__post_init__`)."""
  left = "(" if lo_open else "["
  right = ")" if hi_open else "]"
  interval = (f"{left}{'-inf' if lo is None else lo}, "
              f"{'inf' if hi is None else hi}{right}")
  if integer and (isinstance(value, bool) or
                  not isinstance(value, (int, np.integer))):
    raise ValueError(f"{name}={value!r} must be an integer in {interval}.")
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise ValueError(f"{name}={value!r} must be a number in {interval}.")
  bad = ((lo is not None and (value <= lo if lo_open else value < lo)) or
         (hi is not None and (value >= hi if hi_open else value > hi)))
  if bad:
    raise ValueError(f"{name}={value!r} is outside {interval}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises ValueError unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"{name}={value!r}; choose one of "
                     f"{', '.join(repr(c) for c in choices)}.")


def check_uratio(config, method: str) -> None:
  """An unlabeled batch is required: μ = config.data.uratio > 0."""
  uratio = config.data.get("uratio", 0) or 0
  if not uratio > 0 or round(uratio * config.data.batch_size) < 1:
    raise R2D2Error(
        f"config.data.uratio={uratio!r}: {method} trains on an unlabeled "
        "batch of uratio * batch_size images; set config.data.uratio > 0.")


# ---------------------------------------------------------------------------
# Hooks


@dataclasses.dataclass(eq=False)
class HookContext:
  """What a host-side hook may use: the stage's parts, nothing more.

  Attributes:
    net: the network (`Network`).
    task: the data's facts (`Task`).
    hp: the method's hyperparameters.
    mesh: the device mesh.
    state_shardings: the state's shardings (out_shardings of a compiled
      function that returns the state).
    total_steps: length of the stage.
    log_every: how often (steps) the stage logs.
    eval_batches: `eval_batches(split)` yields padded batches {'image' uint8,
      'label', 'index', 'mask'} of 'train', 'val' or 'test' (global arrays).
    normalize: uint8 images to the network's float inputs (inside jit).
    cache: compiled functions a hook builds once (`compiled`).
  """
  net: Network
  task: Task
  hp: Any
  mesh: Mesh
  state_shardings: PyTree
  total_steps: int
  log_every: int
  eval_batches: Callable[[str], Iterator[dict[str, Any]]]
  normalize: Callable[[jax.Array], jax.Array]
  cache: dict[str, Any] = dataclasses.field(default_factory=dict)

  def compiled(self, name: str, build: Callable[[], Any]) -> Any:
    """`build()` the first time `name` is asked for, then the cached result."""
    if name not in self.cache:
      self.cache[name] = build()
    return self.cache[name]


def predict_into_table(hooks: HookContext, state: PyTree, name: str,
                       logits: Callable[[PyTree, jax.Array], jax.Array],
                       rows: Callable[[PyTree], jax.Array]) -> PyTree:
  """state.table[i] <- logits(state, x_i) for every train row i with rows(state)[i] > 0.

  One pass over the unaugmented train split (`hooks.eval_batches('train')`),
  compiled once per stage under `name`; the other rows, and the padding, are
  left as they are. R2-D2's reprediction (`rows`: the learnable rows) and
  Noisy Student's teacher labelling (`rows`: the pool) are this pass.
  """
  mesh, normalize = hooks.mesh, hooks.normalize

  def build():
    def write(state, batch):
      z = logits(state, normalize(batch["image"]))
      chosen = table_lib.gather_rows(rows(state), batch["index"], mesh)
      ok = batch["mask"] & (chosen > 0)
      return state.replace(table=table_lib.set_rows(
          state.table, batch["index"], z, ok, mesh))
    return jax.jit(write, donate_argnums=(0,),
                   out_shardings=hooks.state_shardings)

  write = hooks.compiled(name, build)
  for batch in hooks.eval_batches("train"):
    state = write(state, batch)
  return state


class Hook(Protocol):

  def __call__(self, hooks: HookContext, state: PyTree, step: int
               ) -> tuple[PyTree, dict[str, float] | None]:
    ...


class TrainStep(Protocol):
  """`train_step(state, batch, rng, *, net, task, hp)`; names what it reads."""

  def __call__(self, state: PyTree, batch: PyTree, rng: jax.Array,
               **named: Any) -> tuple[PyTree, Metrics]:
    ...


class InitState(Protocol):
  """`init_state(rng, *, net, task, hp)`; names what it reads."""

  def __call__(self, rng: jax.Array, **named: Any) -> PyTree:
    ...


# ---------------------------------------------------------------------------
# Defaults


def no_hparams(config: ml_collections.ConfigDict) -> NoHparams:
  del config
  return NoHparams()


def no_augment_state(state: PyTree) -> None:
  """Methods whose augmentations read no state."""
  del state
  return None


def default_init_state(rng: jax.Array, net: Network) -> TrainState:
  """One network and its optimizer state."""
  return net.init_train_state(rng)


def default_eval_variables(state: TrainState) -> dict[str, PyTree]:
  return {"raw": state.variables(), "ema": state.variables(ema=True)}


def replicate_all(abstract_state: PyTree, mesh: Mesh) -> PyTree:
  return jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract_state)


def copy_network(state: TrainState, previous: Mapping[str, Any]) -> TrainState:
  """Starts from a previous stage's network (raw and EMA weights, BN statistics).

  The optimizer state and step start fresh: a new stage has its own schedule.
  """
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
    out[field] = jax.tree.map(lambda n, o: jnp.asarray(o, n.dtype), new, old)
  return state.replace(**out)


@dataclasses.dataclass(frozen=True)
class Method:
  """A semi-supervised method: pure functions over its state pytree."""
  name: str
  views: Callable[[Any], dict[str, tuple[str, ...]]]
  train_step: TrainStep
  init_state: InitState = default_init_state
  hparams: Callable[[ml_collections.ConfigDict], Any] = no_hparams
  eval_variables: Callable[[PyTree], dict[str, PyTree]] = default_eval_variables
  state_sharding: Callable[[PyTree, Mesh], PyTree] = replicate_all
  init_from: Callable[..., PyTree] = copy_network
  hooks: tuple[Hook, ...] = ()
  # The part of the state the augmentation policies read (e.g. CTAugment's bin
  # weights), handed to every view by the trainer; None: no policy reads state.
  augment_state: Callable[[PyTree], PyTree | None] = no_augment_state


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
  """Adds `method` to the registry under `method.name` (a duplicate is an error)."""
  if method.name in METHODS and METHODS[method.name] is not method:
    raise ValueError(f"Two methods are called {method.name!r}.")
  METHODS[method.name] = method
  return method


def get_method(name: str) -> Method:
  """The method registered as `name`, or an error listing the valid names."""
  if name not in METHODS:
    raise unknown_name("method", name, METHODS)
  return METHODS[name]


# ---------------------------------------------------------------------------
# The shared one-network step


def step_metrics(old: TrainState, new: TrainState, grads: PyTree,
                 net: Network) -> Metrics:
  """What every step logs: lr, l2_grads, l2_params (before), l2_updates."""
  return {"lr": net.schedule(old.step),
          "l2_grads": optax.tree.norm(grads),
          "l2_params": optax.tree.norm(old.params),
          "l2_updates": optax.tree.norm(
              jax.tree.map(lambda a, b: a - b, new.params, old.params))}


LossOfLogits = Callable[[list[jax.Array], PyTree],
                        tuple[jax.Array, dict[str, jax.Array]]]


def one_network_step(state: TrainState, inputs: Sequence[jax.Array],
                     loss_fn: LossOfLogits, rng: jax.Array, net: Network, *,
                     labels: jax.Array | None = None
                     ) -> tuple[TrainState, Metrics]:
  """One optimizer step of one network on a loss of its logits.

  The inputs go through the network in ONE train-mode forward pass (BatchNorm
  sees, and its running statistics average, the whole concatenated batch, as
  in the fixmatch / UDA reference code), are split back, and
  `loss_fn(logits_parts, params) -> (loss, aux metrics)` gives the loss (the
  params are there for losses that need another forward pass, e.g. VAT's).
  Then: gradients, the optimizer, the EMA update, and the standard metrics.

  Args:
    state: the network's state.
    inputs: image batches, concatenated in this order.
    loss_fn: the method's loss of the split logits.
    rng: this step's key (dropout and the like).
    net: the network.
    labels: if given, the labels of `inputs[0]` (logs `accuracy/train`).

  Returns:
    (new state, metrics: losses/total, lr, l2_grads, l2_params, l2_updates,
    accuracy/train if labels, and `loss_fn`'s aux metrics).
  """
  sizes = np.cumsum([x.shape[0] for x in inputs])[:-1].tolist()
  x = jnp.concatenate(list(inputs)) if len(inputs) > 1 else inputs[0]

  def objective(params):
    logits, model_state = net.apply_train(
        {"params": params, **state.model_state}, x, rng)
    parts = jnp.split(logits, sizes) if sizes else [logits]
    loss, aux = loss_fn(parts, params)
    return loss, (aux, parts[0], model_state)

  (loss, (aux, logits0, model_state)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.params)
  new = state.apply_gradients(grads, net.tx, model_state, net.ema_decay)
  metrics = step_metrics(state, new, grads, net)
  metrics["losses/total"] = loss
  if labels is not None:
    metrics["accuracy/train"] = losses.accuracy(logits0, labels)
  metrics.update(aux)
  return new, metrics


def pseudo_label_monitors(pseudo_labels: jax.Array, true_labels: jax.Array,
                          mask: jax.Array | None = None) -> Metrics:
  """How good the pseudo-labels are (diagnostics: the true labels are hidden).

  Args:
    pseudo_labels: [B] int hard labels, or [B, C] probabilities / logits
      (their argmax).
    true_labels: [B] the hidden true labels of the unlabeled batch (-1: none;
      such rows do not count).
    mask: [B] weights in [0, 1] the loss gives each row (None: all 1).

  Returns:
    monitors/mask (mean weight), monitors/pseudo_label_accuracy (over every
    row), monitors/pseudo_label_accuracy_masked (weighted by the mask).
  """
  if pseudo_labels.ndim == 2:
    pseudo_labels = jnp.argmax(pseudo_labels, -1)
  # Rows without a hidden label (-1: a user dataset's unlabeled images,
  # `r2d2_jax.data.custom.UNKNOWN_LABEL`) are left out of the accuracies.
  known = (true_labels >= 0).astype(jnp.float32)
  correct = (pseudo_labels == true_labels).astype(jnp.float32)
  accuracy = jnp.sum(correct * known) / jnp.maximum(jnp.sum(known), 1.0)
  out = {"monitors/pseudo_label_accuracy": accuracy}
  if mask is None:
    out["monitors/mask"] = jnp.ones((), jnp.float32)
    out["monitors/pseudo_label_accuracy_masked"] = accuracy
  else:
    mask = jax.lax.stop_gradient(mask).astype(jnp.float32)
    out["monitors/mask"] = jnp.mean(mask)
    out["monitors/pseudo_label_accuracy_masked"] = (
        jnp.sum(mask * known * correct) /
        jnp.maximum(jnp.sum(mask * known), 1e-12))
  return out

