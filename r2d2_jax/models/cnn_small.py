"""A small, fast CNN for 8x8 (sklearn digits) or 28x28 (MNIST) images.

Three 3x3 convolutions (32, 64/2, 128/2) with BatchNorm + ReLU, global average
pooling and a dropout-regularised linear classifier: ~93k parameters, runs in
milliseconds on CPU. Global pooling makes it input-size agnostic.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class CNNSmall(nn.Module):
  """Small CNN for digits.

  Attributes:
    num_classes: Number of output logits.
    widths: Channels of the three conv layers (the last two have stride 2).
    dropout_rate: Dropout on the pooled features before the classifier.
    bn_momentum: BatchNorm running-average momentum.
    dtype: Compute dtype; parameters are kept in float32.
  """
  num_classes: int
  widths: tuple[int, ...] = (32, 64, 128)
  dropout_rate: float = 0.25
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ('dropout',)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images, already normalised.
      train: Training mode (batch statistics, dropout).
      return_features: Also return the pooled penultimate features.

    Returns:
      Float32 logits ``[B, num_classes]``, or ``(logits, features)``.
    """
    x = x.astype(self.dtype)
    for i, filters in enumerate(self.widths):
      x = nn.Conv(filters, (3, 3), strides=1 if i == 0 else 2, padding='SAME',
                  use_bias=False, kernel_init=conv_init, dtype=self.dtype,
                  param_dtype=jnp.float32, name=f'conv{i + 1}')(x)
      x = nn.BatchNorm(use_running_average=not train,
                       momentum=self.bn_momentum, dtype=self.dtype,
                       param_dtype=jnp.float32, name=f'bn{i + 1}')(x)
      x = nn.relu(x)
    features = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, name='classifier')(x)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits
