"""ResNet-18 (basic blocks) and ResNet-50 (bottlenecks), after the flax examples.

The stem adapts to the input: the ImageNet stem (7x7/2 conv + 3x3/2 max-pool)
for images of at least 64 px, the CIFAR stem (3x3/1 conv, no pool) for smaller
ones. Parameters for 1000 classes: ResNet-18 ~11.7M, ResNet-50 ~25.6M.

Stochastic depth (Huang et al., 2016; as Noisy Student trains its
EfficientNets), off by default: `drop_path_rate` is the drop rate 1 - p_L of the
last residual block; block l of the L blocks of the network (1-based, in
forward order over all stages) drops with rate ``drop_path_rate * l / L``
(Huang et al.'s linear rule, `linear_drop_rates`). In training each example's
residual branch is dropped with that rate and kept branches are scaled by
1 / (1 - rate), before the shortcut is added (`DropPath`); in eval mode, and
with rate 0, blocks are unchanged. `wide_resnet` uses the same helpers.
"""

import functools
from typing import Any, Callable, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
ModuleDef = Any


def check_drop_path_rate(model: str, rate: Any) -> None:
  """Raises ValueError unless `rate` is a number in [0, 1).

  Args:
    model: The model's name for the message, e.g. 'ResNet'.
    rate: The value of the model's `drop_path_rate` attribute.
  """
  ok = (isinstance(rate, (int, float)) and not isinstance(rate, bool) and
        0.0 <= rate < 1.0)
  if not ok:
    raise ValueError(
        f'{model} drop_path_rate={rate!r}: the stochastic depth drop rate of '
        'the last residual block must be a number in [0, 1) (0 = off); set '
        'config.model.kwargs.drop_path_rate to e.g. 0.2 (survival '
        'probability 0.8, as in Noisy Student) or 0.')


def linear_drop_rates(rate: float, num_blocks: int) -> list[float]:
  """Drop rates of blocks 1..L under the linear rule: ``rate * l / L``.

  Huang et al. (2016): survival p_l = 1 - (l / L) (1 - p_L), where
  ``rate = 1 - p_L`` is the drop rate of the last block.

  Args:
    rate: Drop rate of the last block, in [0, 1).
    num_blocks: L, the number of residual blocks of the network.

  Returns:
    ``[rate * 1 / L, rate * 2 / L, ..., rate]`` (all 0.0 for rate 0).
  """
  return [rate * l / num_blocks for l in range(1, num_blocks + 1)]


class DropPath(nn.Module):
  """Stochastic depth on a residual branch: drops it per example.

  In training returns ``branch * m / keep`` with ``keep = 1 - rate`` and one
  Bernoulli(keep) draw m per example (row of the batch), from the 'dropout'
  rng; dropped rows are exactly zero, kept rows are scaled by 1 / keep, so the
  expectation is the branch itself. In eval mode, or with rate 0, the branch
  is returned unchanged and no rng is drawn.

  Attributes:
    rate: Probability that an example's branch is dropped, in [0, 1).
  """
  rate: float

  @nn.compact
  def __call__(self, branch: jax.Array, *, train: bool) -> jax.Array:
    if not train or self.rate == 0.0:
      return branch
    keep = 1.0 - self.rate
    shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, branch / keep, jnp.zeros_like(branch))


class BasicBlock(nn.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN (-DropPath) + shortcut, ReLU."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
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
    if self.drop_path_rate:
      y = DropPath(self.drop_path_rate, name='drop_path')(y, train=train)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN (-DropPath).

  Plus shortcut, ReLU.
  """
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides,
                           name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    if self.drop_path_rate:
      y = DropPath(self.drop_path_rate, name='drop_path')(y, train=train)
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
    dropout_rate: Dropout on the pooled features before the classifier, in
      [0, 1) (0, default: none; Noisy Student's students: 0.5).
    drop_path_rate: Stochastic depth: drop rate of the last residual block,
      in [0, 1); block l of L drops with ``drop_path_rate * l / L`` (see the
      module docstring). 0 (default) = off.
    dtype: Compute dtype; parameters are kept in float32.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: Callable[..., nn.Module] = BasicBlock
  num_filters: int = 64
  stem: str = 'auto'
  bn_momentum: float = 0.9
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  # 'dropout': stochastic depth and dropout (unused when both rates are 0).
  rng_names: ClassVar[tuple[str, ...]] = ('dropout',)

  def __post_init__(self):
    check_drop_path_rate('ResNet', self.drop_path_rate)
    if not (isinstance(self.dropout_rate, (int, float)) and
            not isinstance(self.dropout_rate, bool) and
            0.0 <= self.dropout_rate < 1.0):
      raise ValueError(f'ResNet dropout_rate={self.dropout_rate!r} must be a '
                       'number in [0, 1) (0 = off).')
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images, already normalised.
      train: Training mode (batch statistics, stochastic depth).
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
    rates = iter(linear_drop_rates(self.drop_path_rate,
                                   sum(self.stage_sizes)))
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        x = self.block_cls(self.num_filters * 2**i, conv=conv, norm=norm,
                           strides=2 if (i > 0 and j == 0) else 1,
                           drop_path_rate=next(rates),
                           name=f'stage{i + 1}_block{j + 1}')(x, train=train)
    features = jnp.mean(x, axis=(1, 2))
    pooled = features
    if self.dropout_rate:
      # Noisy Student's students: dropout on the final layer's input.
      pooled = nn.Dropout(self.dropout_rate, deterministic=not train)(pooled)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, name='classifier')(pooled)
    logits = logits.astype(jnp.float32)
    if return_features:
      return logits, features.astype(jnp.float32)
    return logits


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2),
                             block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3),
                             block_cls=BottleneckBlock)
