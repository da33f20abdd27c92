"""ResNet-18 (basic blocks) and ResNet-50 (bottlenecks), after the flax examples.

The stem adapts to the input: the ImageNet stem (7x7/2 conv + 3x3/2 max-pool)
for images of at least 64 px, the CIFAR stem (3x3/1 conv, no pool) for smaller
ones. Parameters for 1000 classes: ResNet-18 ~11.7M, ResNet-50 ~25.6M.
"""

import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
ModuleDef = Any


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, ReLU."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-init the last BN scale: each block starts as the identity
    # (Goyal et al., 2017), as in the flax ImageNet example.
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides,
                           name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN + shortcut, ReLU."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides,
                           name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet v1.

  Attributes:
    num_classes: Number of output logits.
    stage_sizes: Blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    num_filters: Channels of the first stage; doubled per stage.
    stem: 'auto' (ImageNet stem if the input is >= 64 px), 'imagenet' or 'cifar'.
    bn_momentum: BatchNorm running-average momentum.
    dtype: Compute dtype; parameters are kept in float32.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: Callable[..., nn.Module] = BasicBlock
  num_filters: int = 64
  stem: str = 'auto'
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ()

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images, already normalised.
      train: Training mode (batch statistics).
      return_features: Also return the pooled penultimate features.

    Returns:
      Float32 logits ``[B, num_classes]``, or ``(logits, features)``.
    """
    if self.stem not in ('auto', 'imagenet', 'cifar'):
      raise ValueError(f"stem must be 'auto', 'imagenet' or 'cifar', "
                       f'got {self.stem!r}.')
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init,
                             dtype=self.dtype, param_dtype=jnp.float32)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, epsilon=1e-5,
                             dtype=self.dtype, param_dtype=jnp.float32)
    imagenet_stem = (self.stem == 'imagenet' or
                     (self.stem == 'auto' and min(x.shape[1:3]) >= 64))
    x = x.astype(self.dtype)
    if imagenet_stem:
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)],
               name='conv_init')(x)
    else:
      x = conv(self.num_filters, (3, 3), name='conv_init')(x)
    x = nn.relu(norm(name='bn_init')(x))
    if imagenet_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm,
                           strides=2 if (i > 0 and j == 0) else 1,
                           name=f'stage{i + 1}_block{j + 1}')(x)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, name='classifier')(features)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                             block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                             block_cls=BottleneckBlock)
