"""Shake-Shake-26 2x{width}d (Gastaldi, 2017), as used by AutoAugment / UDA / MixMatch.

Each residual block has two branches ReLU-conv3x3-BN-ReLU-conv3x3-BN mixed per
example as ``alpha * b1 + (1 - alpha) * b2`` in the forward pass while the
gradient is mixed with an independent ``beta`` ("Shake-Shake-Image"); evaluation
uses 0.5. Down-sampling shortcuts are the two-path 1x1 convs of the paper.
Shake-Shake-26 2x96d has ~26.2M parameters.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def shake(b1: jnp.ndarray, b2: jnp.ndarray, alpha: jnp.ndarray,
          beta: jnp.ndarray) -> jnp.ndarray:
  """Mixes two branches with `alpha` forward and `beta` backward.

  The value is ``alpha * b1 + (1 - alpha) * b2`` while the gradients w.r.t.
  the branches are ``beta`` and ``1 - beta``: the forward/backward difference is
  added under `stop_gradient`.

  Args:
    b1: First branch output.
    b2: Second branch output.
    alpha: Forward mixing weights, broadcastable to `b1`.
    beta: Backward mixing weights, broadcastable to `b1`.

  Returns:
    The mixed tensor.
  """
  backward = beta * b1 + (1 - beta) * b2
  return backward + jax.lax.stop_gradient((alpha - beta) * (b1 - b2))


class ShakeBranch(nn.Module):
  """ReLU-conv3x3(stride)-BN-ReLU-conv3x3-BN."""
  filters: int
  strides: int
  bn_momentum: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    for i, strides in enumerate((self.strides, 1)):
      x = nn.relu(x)
      x = nn.Conv(self.filters, (3, 3), strides=strides, padding='SAME',
                  use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'conv{i + 1}')(x)
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=self.bn_momentum, dtype=self.dtype,
                       param_dtype=jnp.float32, name=f'bn{i + 1}')(x)
    return x


class ShakeShortcut(nn.Module):
  """Identity, or two strided 1x1 conv paths (one shifted by a pixel) + BN."""
  filters: int
  strides: int
  bn_momentum: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    if x.shape[-1] == self.filters and self.strides == 1:
      return x
    s = self.strides
    # Second path sees the image shifted by one pixel so that together the two
    # strided paths cover every input position.
    shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:, :]
    paths = []
    for i, inp in enumerate((x, shifted)):
      paths.append(nn.Conv(self.filters // 2, (1, 1), use_bias=False,
                           kernel_init=conv_init, dtype=self.dtype,
                           param_dtype=jnp.float32,
                           name=f'path{i + 1}_conv')(inp[:, ::s, ::s, :]))
    x = jnp.concatenate(paths, axis=-1)
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                        dtype=self.dtype, param_dtype=jnp.float32,
                        name='bn')(x)


class ShakeBlock(nn.Module):
  """Shortcut + shake(branch1, branch2)."""
  filters: int
  strides: int
  bn_momentum: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    args = (self.filters, self.strides, self.bn_momentum, self.dtype)
    b1 = ShakeBranch(*args, name='branch1')(x, train=train)
    b2 = ShakeBranch(*args, name='branch2')(x, train=train)
    if train:
      alpha_key, beta_key = jax.random.split(self.make_rng('shake'))
      shape = (x.shape[0], 1, 1, 1)  # One coefficient per example.
      alpha = jax.random.uniform(alpha_key, shape, self.dtype)
      beta = jax.random.uniform(beta_key, shape, self.dtype)
      y = shake(b1, b2, alpha, beta)
    else:
      y = 0.5 * (b1 + b2)
    return ShakeShortcut(*args, name='shortcut')(x, train=train) + y


class ShakeShake(nn.Module):
  """Shake-Shake-depth 2x{width}d for 32x32 images.

  Attributes:
    num_classes: Number of output logits.
    depth: Total depth, ``6 * n + 2`` (26 -> 4 blocks per stage).
    width: Channels of the first stage (96 for 2x96d); doubled per stage.
    bn_momentum: BatchNorm running-average momentum.
    dtype: Compute dtype; parameters are kept in float32.
  """
  num_classes: int
  depth: int = 26
  width: int = 96
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ('shake',)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images, already normalised.
      train: Training mode (batch statistics, random shake coefficients from
        the 'shake' rng).
      return_features: Also return the pooled penultimate features.

    Returns:
      Float32 logits ``[B, num_classes]``, or ``(logits, features)``.
    """
    if (self.depth - 2) % 6:
      raise ValueError(f'Shake-Shake depth must be 6n+2, got {self.depth}.')
    blocks_per_stage = (self.depth - 2) // 6
    x = x.astype(self.dtype)
    x = nn.Conv(16, (3, 3), padding='SAME', use_bias=False,
                kernel_init=conv_init, dtype=self.dtype,
                param_dtype=jnp.float32, name='stem')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     dtype=self.dtype, param_dtype=jnp.float32,
                     name='stem_bn')(x)
    for stage in range(3):
      for i in range(blocks_per_stage):
        x = ShakeBlock(self.width * 2**stage,
                       strides=2 if (stage > 0 and i == 0) else 1,
                       bn_momentum=self.bn_momentum, dtype=self.dtype,
                       name=f'stage{stage + 1}_block{i + 1}')(x, train=train)
    x = nn.relu(x)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, name='classifier')(features)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits
