"""CNN-13 ("ConvLarge") of the Temporal Ensembling / Mean Teacher / VAT papers.

    3 x conv128 3x3 -> maxpool 2 -> dropout 0.5
    3 x conv256 3x3 -> maxpool 2 -> dropout 0.5
    conv512 3x3 valid -> conv256 1x1 -> conv128 1x1 -> global avg pool -> dense

every conv followed by BatchNorm + LeakyReLU(0.1). ~3.1M parameters. The papers'
weight normalisation is left out (BatchNorm alone trains as well).

The defaults follow the TF Mean Teacher / Temporal Ensembling setting (element-wise
dropout, BatchNorm momentum 0.999, epsilon 1e-3). SemiMeta's PyTorch reference
(Sakura03/SemiMeta `model.py`, `ConvLarge`) runs it with `nn.Dropout2d()` after
each max-pool (whole channels dropped: ``channel_dropout=True``) and PyTorch's
`nn.BatchNorm2d` defaults, momentum 0.1 = flax ``bn_momentum=0.9`` and
``bn_epsilon=1e-5``; configs/semimeta_cifar10_4k.py sets these.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class ConvLarge(nn.Module):
  """CNN-13 for 32x32 images.

  Attributes:
    num_classes: Number of output logits.
    dropout_rate: Dropout after each of the two max-pools (0.5 in the papers).
    input_noise_std: Std of Gaussian input noise in training (0.15 in Temporal
      Ensembling's Pi-model; 0 disables). Drawn from the 'dropout' rng.
    bn_momentum: BatchNorm running-average momentum in flax terms (the weight
      of the old average: 0.999 = TF decay 0.999 = PyTorch momentum 0.001).
    bn_epsilon: BatchNorm epsilon (1e-3 TF Mean Teacher; 1e-5 PyTorch).
    channel_dropout: Drop whole feature maps (PyTorch's `Dropout2d`, one
      Bernoulli draw per example and channel) instead of single activations.
    dtype: Compute dtype; parameters are kept in float32.
  """
  num_classes: int
  dropout_rate: float = 0.5
  input_noise_std: float = 0.0
  bn_momentum: float = 0.999
  bn_epsilon: float = 1e-3
  channel_dropout: bool = False
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ('dropout',)

  def _conv_bn(self, x: jnp.ndarray, filters: int, kernel: int, padding: str,
               name: str, train: bool) -> jnp.ndarray:
    x = nn.Conv(filters, (kernel, kernel), padding=padding, use_bias=False,
                kernel_init=conv_init, dtype=self.dtype,
                param_dtype=jnp.float32, name=f'conv{name}')(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=self.bn_epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, name=f'bn{name}')(x)
    return nn.leaky_relu(x, 0.1)

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images (32x32), already normalised.
      train: Training mode (batch statistics, dropout, input noise).
      return_features: Also return the pooled 128-D features.

    Returns:
      Float32 logits ``[B, num_classes]``, or ``(logits, features)``.
    """
    if train and self.input_noise_std > 0:
      noise = jax.random.normal(self.make_rng('dropout'), x.shape, x.dtype)
      x = x + self.input_noise_std * noise
    x = x.astype(self.dtype)
    for stage, filters in ((1, 128), (2, 256)):
      for layer in 'abc':
        x = self._conv_bn(x, filters, 3, 'SAME', f'{stage}{layer}', train)
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      # NHWC: broadcasting the mask over H and W drops whole channels.
      x = nn.Dropout(self.dropout_rate, deterministic=not train,
                     broadcast_dims=(1, 2) if self.channel_dropout else ())(x)
    x = self._conv_bn(x, 512, 3, 'VALID', '3a', train)
    x = self._conv_bn(x, 256, 1, 'VALID', '3b', train)
    x = self._conv_bn(x, 128, 1, 'VALID', '3c', train)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, name='classifier')(features)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits
