"""Wide ResNet (WRN-28-k) as used by FixMatch / UDA / Meta Pseudo Labels.

Follows the FixMatch reference (google-research/fixmatch ``libml/models.py``):
pre-activation residual blocks, BatchNorm with momentum 0.999 / epsilon 1e-3,
LeakyReLU(0.1), kaiming-normal (fan_out) convolutions, Glorot-normal classifier.
WRN-28-2 has ~1.47M parameters for 10 classes.

`bn_momentum` is in flax terms (the weight of the old running average): FixMatch
uses 0.999; the Meta Pseudo Labels TF reference uses `batch_norm_decay` 0.99
(`flag_utils.py` default, not overridden by its README commands), which
configs/common.py's `cifar10_4k_mpl_setup` sets.

`drop_path_rate` (default 0 = off) adds stochastic depth as in
`r2d2_jax.models.resnet`: block l of the L = 3 n blocks drops its residual
branch per example with rate ``drop_path_rate * l / L`` in training, kept
branches scaled by 1 / (1 - rate); the shortcut is always kept.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from r2d2_jax.models.resnet import DropPath
from r2d2_jax.models.resnet import check_drop_path_rate
from r2d2_jax.models.resnet import linear_drop_rates

# std = sqrt(2 / (k * k * out_channels)), as in the reference implementations.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class WRNBlock(nn.Module):
  """Pre-activation residual block: BN-act-conv3x3-BN-act-conv3x3 (+ shortcut).

  Attributes:
    filters: Output channels.
    strides: Stride of the first convolution (and of the projection shortcut).
    activate_before_residual: If True the shortcut also sees the pre-activated
      input (used for the very first block, right after the stem).
    bn_momentum: BatchNorm running-average momentum.
    drop_path_rate: Stochastic depth: per-example drop rate of the residual
      branch in training (0 = off).
    dtype: Compute dtype; parameters are kept in float32.
  """
  filters: int
  strides: int = 1
  activate_before_residual: bool = False
  bn_momentum: float = 0.999
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    bn = lambda name: nn.BatchNorm(
        use_running_average=not train, momentum=self.bn_momentum,
        epsilon=1e-3, dtype=self.dtype, param_dtype=jnp.float32, name=name)
    conv = lambda f, k, s, name: nn.Conv(
        f, (k, k), strides=s, padding='SAME', use_bias=False,
        kernel_init=conv_init, dtype=self.dtype, param_dtype=jnp.float32,
        name=name)

    shortcut = x
    y = nn.leaky_relu(bn('bn1')(x), 0.1)
    if self.activate_before_residual:
      shortcut = y
    y = conv(self.filters, 3, self.strides, 'conv1')(y)
    y = nn.leaky_relu(bn('bn2')(y), 0.1)
    y = conv(self.filters, 3, 1, 'conv2')(y)
    if shortcut.shape[-1] != self.filters or self.strides != 1:
      shortcut = conv(self.filters, 1, self.strides, 'shortcut')(shortcut)
    if self.drop_path_rate:
      y = DropPath(self.drop_path_rate, name='drop_path')(y, train=train)
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-depth-width for 32x32 inputs.

  Attributes:
    num_classes: Number of output logits.
    depth: Total depth, ``6 * n + 4`` (28 -> 4 blocks per stage).
    width: Widening factor k (channels 16k, 32k, 64k).
    dropout_rate: Dropout before the classifier (MPL's "dense dropout" 0.2).
    bn_momentum: BatchNorm running-average momentum (0.999 = TF decay).
    drop_path_rate: Stochastic depth: drop rate of the last residual block,
      in [0, 1); block l of L drops with ``drop_path_rate * l / L``. 0
      (default) = off; Noisy Student uses 0.2 (survival 0.8).
    dtype: Compute dtype; parameters are kept in float32.
  """
  num_classes: int
  depth: int = 28
  width: int = 2
  dropout_rate: float = 0.0
  bn_momentum: float = 0.999
  drop_path_rate: float = 0.0
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ('dropout',)

  def __post_init__(self):
    check_drop_path_rate('WideResNet', self.drop_path_rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images, already normalised.
      train: Training mode (batch statistics, dropout, stochastic depth).
      return_features: Also return the pooled penultimate features.

    Returns:
      Float32 logits ``[B, num_classes]``, or ``(logits, features)``.
    """
    if (self.depth - 4) % 6:
      raise ValueError(f'WRN depth must be 6n+4, got {self.depth}.')
    blocks_per_stage = (self.depth - 4) // 6
    x = x.astype(self.dtype)
    x = nn.Conv(16, (3, 3), padding='SAME', use_bias=False,
                kernel_init=conv_init, dtype=self.dtype,
                param_dtype=jnp.float32, name='stem')(x)
    rates = iter(linear_drop_rates(self.drop_path_rate, 3 * blocks_per_stage))
    for stage, mult in enumerate((1, 2, 4)):
      for i in range(blocks_per_stage):
        x = WRNBlock(
            filters=16 * mult * self.width,
            strides=2 if (stage > 0 and i == 0) else 1,
            activate_before_residual=(stage == 0 and i == 0),
            bn_momentum=self.bn_momentum, drop_path_rate=next(rates),
            dtype=self.dtype,
            name=f'stage{stage + 1}_block{i + 1}')(x, train=train)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                     epsilon=1e-3, dtype=self.dtype, param_dtype=jnp.float32,
                     name='bn_final')(x)
    x = nn.leaky_relu(x, 0.1)
    features = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    logits = nn.Dense(self.num_classes,
                      kernel_init=nn.initializers.xavier_normal(),
                      dtype=self.dtype, param_dtype=jnp.float32,
                      name='classifier')(x)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits
