"""Train state pytrees (`flax.struct`), the same for every backend and device count.

`TrainState` is one network with its optimizer state and EMA weights. Methods
that need more state subclass it (R2-D2 adds the pseudo-label table) or nest it
(Meta Pseudo Labels keeps a teacher and a student `TrainState` side by side).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import struct

PyTree = Any


class TrainState(struct.PyTreeNode):
  """One network being trained.

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: the network's parameters.
    model_state: mutable collections of the network (e.g. {'batch_stats': ...}).
    opt_state: optax state of `params`.
    ema_params: exponential moving average of `params` (evaluated beside them).
    ema_model_state: the same for `model_state`.
  """
  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  ema_params: PyTree
  ema_model_state: PyTree

  @classmethod
  def create(cls, variables: PyTree, tx: optax.GradientTransformation,
             **kwargs) -> "TrainState":
    """Builds the state from `model.init` output."""
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               model_state=variables, opt_state=tx.init(params),
               ema_params=params, ema_model_state=variables, **kwargs)

  @classmethod
  def extending(cls, base: "TrainState", **fields) -> "TrainState":
    """`cls` (a subclass) with `base`'s network fields and the extra `fields`."""
    network = {f: getattr(base, f) for f in TrainState.__dataclass_fields__}
    return cls(**network, **fields)

  def variables(self, ema: bool = False) -> dict[str, PyTree]:
    """The variables dict to pass to `model.apply`."""
    if ema:
      return {"params": self.ema_params, **self.ema_model_state}
    return {"params": self.params, **self.model_state}

  def apply_gradients(self, grads: PyTree, tx: optax.GradientTransformation,
                      model_state: PyTree, ema_decay: float) -> "TrainState":
    """One optimizer step, then the EMA update.

    Args:
      grads: gradients w.r.t. `params`.
      tx: the optimizer.
      model_state: the updated mutable collections from the forward pass.
      ema_decay: EMA decay; 0 makes the EMA equal the raw weights.

    Returns:
      The new state, with `step` incremented.
    """
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = lambda e, p: e * ema_decay + (1.0 - ema_decay) * p
    return self.replace(
        step=self.step + 1, params=params, model_state=model_state,
        opt_state=opt_state,
        ema_params=jax.tree.map(ema, self.ema_params, params),
        ema_model_state=jax.tree.map(ema, self.ema_model_state, model_state))
