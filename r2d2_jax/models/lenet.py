"""LeNet with a 2-D feature bottleneck for the MNIST feature illustration.

R2-D2 (Wang & Wu, 2020) plots the 2-D penultimate features of a LeNet trained on
MNIST, in the style of the center-loss paper's "LeNet++". Hidden layers use PReLU,
which trains reliably through such a narrow bottleneck; the 2-D feature itself is
linear so the classes spread radially around the origin.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp


class PReLU(nn.Module):
  """Parametric ReLU with one learned slope per channel, computed in `dtype`."""
  dtype: Any = jnp.float32
  negative_slope_init: float = 0.25

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    slope = self.param('negative_slope',
                       nn.initializers.constant(self.negative_slope_init),
                       (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, slope.astype(self.dtype) * x)


class LeNet(nn.Module):
  """conv(32,5)-pool-conv(64,5)-pool-dense(hidden)-dense(feature_dim)-dense(K).

  Attributes:
    num_classes: Number of output logits.
    feature_dim: Width of the (linear) penultimate feature layer; 2 for plots.
    hidden_dim: Width of the hidden dense layer.
    dtype: Compute dtype; parameters are kept in float32.
  """
  num_classes: int
  feature_dim: int = 2
  hidden_dim: int = 256
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ()

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images (28x28x1 for MNIST), already normalised.
      train: Training mode (unused: no BatchNorm or dropout).
      return_features: Also return the `feature_dim`-D features.

    Returns:
      Float32 logits ``[B, num_classes]``, or ``(logits, features)``.
    """
    del train  # Deterministic and stateless.
    kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
    x = x.astype(self.dtype)
    for i, filters in enumerate((32, 64)):
      x = nn.Conv(filters, (5, 5), padding='SAME',
                  kernel_init=nn.initializers.he_normal(),
                  name=f'conv{i + 1}', **kw)(x)
      x = PReLU(self.dtype, name=f'prelu{i + 1}')(x)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.hidden_dim, name='hidden', **kw)(x)
    x = PReLU(self.dtype, name='prelu_hidden')(x)
    features = nn.Dense(self.feature_dim, name='features', **kw)(x)
    logits = nn.Dense(self.num_classes, name='classifier', **kw)(features)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits
