"""The inner SGD step and meta-gradient helpers shared by MPL and SemiMeta.

Meta-gradients here are ordinary JAX: the inner step is a pure function of the
parameters, so `jax.grad`, `jax.vjp` and `jax.jvp` go straight through it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

PyTree = Any


def sgd_step(params: PyTree, grads: PyTree, lr: jax.Array | float) -> PyTree:
  """θ − lr·g, leaf by leaf."""
  return jax.tree.map(lambda p, g: p - lr * g, params, grads)


def inner_step(loss_fn: Callable[..., jax.Array], params: PyTree,
               lr: jax.Array | float, *args: Any) -> PyTree:
  """One plain SGD step `θ' = θ − lr·∇θ loss_fn(θ, *args)`.

  Differentiable in `args` (and `params`): `jax.grad` of a function of θ'
  w.r.t. an argument that `loss_fn` depends on gives the exact meta-gradient
  (a mixed second derivative, computed by JAX as a Hessian-vector product).
  """
  return sgd_step(params, jax.grad(loss_fn)(params, *args), lr)


def tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  """⟨a, b⟩ summed over every leaf."""
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b)))


def linear_ramp(step: jax.Array, ramp_steps: int) -> jax.Array:
  """0 → 1 linearly over `ramp_steps` (1 from the start when 0)."""
  if not ramp_steps:
    return jnp.asarray(1.0, jnp.float32)
  return jnp.clip(jnp.asarray(step, jnp.float32) / ramp_steps, 0.0, 1.0)


def sigmoid_rampup(step: jax.Array, ramp_steps: int) -> jax.Array:
  """exp(−5 (1 − min(t, T) / T)²), 1 when T = 0 (Laine & Aila's ramp-up)."""
  if not ramp_steps:
    return jnp.ones((), jnp.result_type(float))
  t = jnp.clip(jnp.asarray(step, jnp.result_type(float)) / ramp_steps, 0., 1.)
  return jnp.exp(-5.0 * (1.0 - t) ** 2)
