"""Losses as pure jnp functions of logits and targets, averaged over examples.

Every function takes an optional `mask` (float [B]) so padded or filtered
examples drop out; the mean is over all B rows (FixMatch's convention), not over
the kept ones, unless stated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _mean(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(x)
  return jnp.mean(x * mask)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  mask: jax.Array | None = None,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Mean CE of integer labels, with optional label smoothing."""
  num_classes = logits.shape[-1]
  targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  return soft_cross_entropy(logits, targets, mask, label_smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array,
                       mask: jax.Array | None = None,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Mean CE(targets, softmax(logits)) for target distributions [B, C]."""
  if label_smoothing:
    num_classes = logits.shape[-1]
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_example = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)
  return _mean(per_example, mask)


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array,
                  mask: jax.Array | None = None) -> jax.Array:
  """Mean KL(p ‖ q) = Σ p (log p − log q), both given as logits."""
  log_p = jax.nn.log_softmax(p_logits)
  log_q = jax.nn.log_softmax(q_logits)
  return _mean(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), mask)


def entropy(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean H(softmax(logits))."""
  log_p = jax.nn.log_softmax(logits)
  return _mean(-jnp.sum(jnp.exp(log_p) * log_p, axis=-1), mask)


def accuracy(logits: jax.Array, labels: jax.Array,
             mask: jax.Array | None = None) -> jax.Array:
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  if mask is None:
    return jnp.mean(correct)
  return jnp.sum(correct * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def sharpen(p: jax.Array, temperature: float) -> jax.Array:
  """MixMatch's sharpening: p^(1/T), renormalised."""
  p = p ** (1.0 / temperature)
  return p / jnp.sum(p, axis=-1, keepdims=True)
