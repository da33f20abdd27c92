"""A frozen teacher network of any registered architecture (docs/algorithms.md, "DeiT-style distillation").

Not a method (nothing is registered here): the pieces a method uses to keep a
trained network's variables in its state, frozen, and apply them with the
teacher's own module, which may differ from the student's.

* `Teacher` (built once when the stage is, from `config.distill.teacher_model`
  and `teacher_kwargs`; '' = the student's `config.model`): the module and
  which weights of a checkpoint to take ('ema' or 'raw').
* `from_checkpoint(teacher, previous, like, num_classes)`: the teacher's
  variables out of a restored checkpoint (`checkpoint.restore_raw`: a train
  state as nested dicts; a Meta Pseudo Labels state's student; a distillation
  state's student), checked against the module's own variables: another
  architecture or another number of classes is an `R2D2Error` that says what to
  change.
* `build(config, num_classes, block, where)`: the `Teacher` of a method's
  block (`teacher_model`, `teacher_kwargs`, `teacher_weights`; '' = the
  stage's `config.model`).
* `logits(teacher, variables, x)`: the teacher in eval mode (BatchNorm running
  statistics, no dropout), under `stop_gradient`; for a distilled ViT teacher
  its averaged prediction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from r2d2_jax import models
from r2d2_jax.errors import R2D2Error

PyTree = Any

WEIGHTS = ("ema", "raw")


@dataclasses.dataclass(frozen=True, eq=False)
class Teacher:
  """The teacher's module and which of a checkpoint's weights it uses.

  Attributes:
    model: the flax module (a registered model, or any module with the
      models' `__call__(x, *, train)` contract).
    weights: 'ema' (the checkpoint's `ema_params` / `ema_model_state`; equal to
      the raw weights when that stage had no EMA) or 'raw'.
    name: what to call it in errors (e.g. "cnn_small").
  """
  model: nn.Module
  weights: str = "ema"
  name: str = "the teacher"

  def __post_init__(self):
    if self.weights not in WEIGHTS:
      raise R2D2Error(f"teacher weights={self.weights!r}; choose one of "
                      f"{WEIGHTS}.")

  def init_variables(self, rng: jax.Array,
                     image_shape: tuple[int, ...]) -> PyTree:
    """Placeholder variables of the teacher's shapes (replaced when loaded)."""
    x = jnp.zeros((1, *image_shape), jnp.float32)
    names = getattr(self.model, "rng_names", ("dropout",))
    rngs = {"params": rng, **{n: rng for n in names}}
    return dict(self.model.init(rngs, x, train=False))


def build(config, num_classes: int, block: Any, where: str) -> Teacher:
  """The teacher a method's block names, with its module built.

  Args:
    config: the stage's config (its `model` is the default architecture).
    num_classes: classes of the stage's data.
    block: the parsed block with `teacher_model`, `teacher_kwargs` and
      `teacher_weights`.
    where: the block's path in errors, e.g. 'config.distill'.

  Raises:
    R2D2Error: kwargs without a model, or a model that cannot be built.
  """
  if block.teacher_model:
    name, kwargs = block.teacher_model, dict(block.teacher_kwargs)
  else:
    if block.teacher_kwargs:
      raise R2D2Error(f"{where}.teacher_kwargs is set but teacher_model is "
                      f"'' (the student's model): set {where}.teacher_model "
                      "too.")
    name = config.model.name
    kwargs = dict(config.model.get("kwargs", {}) or {})
    if config.model.get("dtype"):
      kwargs["dtype"] = config.model.dtype
  try:
    module = models.get_model(name, num_classes, **kwargs)
  except (ValueError, TypeError) as e:
    raise R2D2Error(f"{where}.teacher_model={name!r} with "
                    f"teacher_kwargs={kwargs}: {e}") from None
  return Teacher(module, block.teacher_weights, name)


def num_params(variables: PyTree) -> int:
  """Parameters in `variables['params']` (or a params tree)."""
  params = variables.get("params", variables) if isinstance(
      variables, Mapping) else variables
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(params)))


def logits(teacher: Teacher, variables: PyTree, x: jax.Array) -> jax.Array:
  """stop_gradient(teacher(x)) in eval mode, [B, C], at least float32."""
  out = teacher.model.apply(variables, x, train=False)
  return jax.lax.stop_gradient(
      out.astype(jnp.promote_types(out.dtype, jnp.float32)))


def _network_fields(previous: Mapping[str, Any]) -> Mapping[str, Any]:
  """The trained network of a restored state (an MPL state: its student)."""
  return previous.get("student", previous)


def _shapes(tree: PyTree) -> list[tuple[int, ...]]:
  return [tuple(np.shape(x)) for x in jax.tree.leaves(tree)]


def from_checkpoint(teacher: Teacher, previous: Mapping[str, Any],
                    like: PyTree, num_classes: int,
                    where: str = "the teacher checkpoint") -> PyTree:
  """The teacher's variables from a restored checkpoint, checked.

  Args:
    teacher: the teacher (module, which weights).
    previous: a restored state (nested dicts of arrays).
    like: variables of the teacher's module (shapes and dtypes to match).
    num_classes: the classes of this stage's data.
    where: the checkpoint's name in errors (its folder).

  Returns:
    {'params': ..., other collections ...} as arrays of `like`'s dtypes.

  Raises:
    R2D2Error: a state without network fields, another architecture than
      `teacher.model`, or another number of classes.
  """
  prev = _network_fields(previous)
  if teacher.weights == "ema":
    fields = ("ema_params", "ema_model_state")
  else:
    fields = ("params", "model_state")
  missing = [f for f in fields if f not in prev]
  if missing:
    raise R2D2Error(
        f"{where} has no {missing}; it holds {sorted(prev)}. Is it a "
        "checkpoint of this library (a stage's WORKDIR/checkpoints)?")
  loaded = {"params": prev[fields[0]], **dict(prev[fields[1]] or {})}
  like = dict(like)
  fix = ("set config.distill.teacher_model (and teacher_kwargs) to the model "
         "that stage trained ('' = this stage's config.model)")
  if jax.tree.structure(like) != jax.tree.structure(loaded):
    raise R2D2Error(
        f"{where} is not a {teacher.name}: its parameters "
        f"({sorted(loaded['params'])[:8]}...) are not those of "
        f"{teacher.name} ({sorted(like['params'])[:8]}...); {fix}.")
  want, have = _shapes(like), _shapes(loaded)
  if want != have:
    # Leaves that differ only in their last axis, num_classes here: the head.
    other = {h[-1] for w, h in zip(want, have) if w != h and len(w) == len(h)
             and w[:-1] == h[:-1] and w[-1] == num_classes}
    if other and all(w == h or (w[:-1] == h[:-1] and w[-1] == num_classes)
                     for w, h in zip(want, have)):
      raise R2D2Error(
          f"{where} was trained on {sorted(other)[0]} classes; this stage's "
          f"data has {num_classes}. Distil from a teacher trained on the same "
          "classes (config.distill.teacher_from or the stage it follows), or "
          "change config.data.")
    raise R2D2Error(
        f"{where}'s parameter shapes are not those of {teacher.name}: {fix}.")
  return jax.tree.map(lambda n, o: jnp.asarray(o, n.dtype), like, loaded)
