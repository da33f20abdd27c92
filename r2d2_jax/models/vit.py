"""Vision Transformer (ViT / DeiT), with an optional distillation token.

docs/algorithms.md, "ViT" and "DeiT-style distillation". The network:

  tokens = Conv(kernel = stride = patch)(x)          [B, (H/p)(W/p), D]
  z_0    = [cls; dist (if distilled); tokens] + E_pos (learned)
  z_l'   = z_{l-1} + DropPath(MHSA(LN(z_{l-1})))      pre-norm blocks,
  z_l    = z_l'    + DropPath(MLP(LN(z_l')))          MLP = D -> 4D -> D, GELU
  y      = LN(z_L)
  Z_cls  = head(y[:, 0]);  Z_dist = head_dist(y[:, 1])  (distilled only)

as DeiT's `VisionTransformer` / `DistilledVisionTransformer` (timm): qkv with
bias, LayerNorm epsilon 1e-6, truncated-normal(0.02) initialisation of the
tokens, position embeddings and dense kernels, zero biases; stochastic depth
rates rising linearly from 0 to `drop_path_rate` over the blocks.

Outputs (the model contract of `r2d2_jax.models`, plus `heads`):

* ``model.apply(v, x, train=...)``: float32 ``[B, C]`` logits. Without the
  distillation token: Z_cls. With it (``distilled=True``), in train AND eval
  mode: ``log((softmax(Z_cls) + softmax(Z_dist)) / 2)``, the log of the mean of
  the two heads' softmaxes: argmax, top-5 and cross-entropy of these logits are
  those of the averaged prediction (DeiT averages the two heads' logits; see
  the deliberate differences in docs/algorithms.md).
* ``heads=True`` (distilled only): the pair ``(Z_cls, Z_dist)`` of raw float32
  logits; what DeiT's training reads.
* ``return_features=True``: ``(output, features)``, features the class token's
  final-LayerNorm output ``[B, D]`` (the class head's input).
* One head at evaluation: `with_head(variables, 'class' | 'distill')` adds a
  ``heads`` collection to the variables that makes the plain call return that
  head's logits instead of the average (the trainer evaluates whatever
  variables a method's `eval_variables` returns with the plain call; the
  'distill' method reports each head this way).

An image side that `patch_size` does not divide is an `R2D2Error` naming both.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from r2d2_jax.errors import R2D2Error
from r2d2_jax.models.resnet import DropPath  # stochastic depth, shared

trunc_init = nn.initializers.truncated_normal(stddev=0.02)

# `with_head` names -> the value of the `heads` collection's `select` entry.
HEADS = {'average': 0, 'class': 1, 'distill': 2}


def with_head(variables: dict[str, Any], head: str) -> dict[str, Any]:
  """`variables` made to return one head of a distilled ViT (see module doc).

  Args:
    variables: the model's variables ({'params': ...}).
    head: 'average' (the default output), 'class' or 'distill'.

  Returns:
    A copy of `variables` with the ``heads`` collection.
  """
  if head not in HEADS:
    raise R2D2Error(f'head={head!r}; choose one of {sorted(HEADS)}.')
  return {**variables, 'heads': {'select': jnp.asarray(HEADS[head],
                                                       jnp.int32)}}


def average_heads(z_cls: jax.Array, z_dist: jax.Array) -> jax.Array:
  """log((softmax(z_cls) + softmax(z_dist)) / 2), computed stably."""
  both = jnp.stack([jax.nn.log_softmax(z_cls), jax.nn.log_softmax(z_dist)])
  return jax.nn.logsumexp(both, axis=0) - jnp.log(2.0).astype(z_cls.dtype)


class EncoderBlock(nn.Module):
  """Pre-norm transformer block: LN -> MHSA -> residual, LN -> MLP -> residual."""
  num_heads: int
  mlp_ratio: float
  dropout_rate: float
  attention_dropout_rate: float
  drop_path_rate: float
  epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    width = x.shape[-1]
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype,
                                     param_dtype=jnp.float32,
                                     kernel_init=trunc_init,
                                     bias_init=nn.initializers.zeros,
                                     name=name)
    y = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, name='norm1')(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=trunc_init, bias_init=nn.initializers.zeros,
        dropout_rate=self.attention_dropout_rate, deterministic=not train,
        name='attn')(y, y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    x = x + DropPath(self.drop_path_rate, name='drop_path1')(y, train=train)
    y = nn.LayerNorm(epsilon=self.epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, name='norm2')(x)
    y = dense(int(round(self.mlp_ratio * width)), 'fc1')(y)
    y = nn.gelu(y, approximate=False)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = dense(width, 'fc2')(y)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    return x + DropPath(self.drop_path_rate, name='drop_path2')(y, train=train)


class ViT(nn.Module):
  """ViT / DeiT classifier; the defaults are DeiT-Ti (patch 16, 192, 12, 3).

  Attributes:
    num_classes: Number of output logits.
    patch_size: Side of the square patches (conv kernel = stride); must divide
      both image sides.
    width: Token dimension D.
    depth: Number of blocks.
    num_heads: Attention heads (must divide `width`).
    mlp_ratio: MLP hidden width / D (4 in ViT and DeiT).
    distilled: Add DeiT's distillation token and its head (`head_dist`).
    dropout_rate: Dropout after the position embeddings, the attention output
      and in the MLP (0 in DeiT).
    attention_dropout_rate: Dropout on the attention weights (0 in DeiT).
    drop_path_rate: Stochastic depth of the last block (linear from 0 at the
      first; DeiT trains with 0.1, its model default is 0).
    layer_norm_epsilon: LayerNorm epsilon (1e-6 in DeiT).
    dtype: Compute dtype; parameters and logits are float32.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_ratio: float = 4.0
  distilled: bool = False
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ('dropout',)

  def _check(self, x: jax.Array) -> None:
    h, w = x.shape[1], x.shape[2]
    p = self.patch_size
    if p < 1 or h % p or w % p:
      divisors = [d for d in range(1, min(h, w) + 1) if h % d == 0 and
                  w % d == 0]
      raise R2D2Error(
          f'ViT patch_size={p} does not divide the {h}x{w} input images: set '
          f'config.model.kwargs.patch_size to one of {divisors} (a divisor '
          'of both sides), or use images whose sides it divides.')
    if self.width % self.num_heads:
      raise R2D2Error(
          f'ViT width={self.width} is not a multiple of num_heads='
          f'{self.num_heads}: change config.model.kwargs.width or num_heads.')

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool,
               return_features: bool = False, heads: bool = False):
    """Runs the network.

    Args:
      x: Float32 NHWC images, already normalised.
      train: Training mode (dropout, stochastic depth).
      return_features: Also return the class token's features [B, D].
      heads: Return (Z_cls, Z_dist) instead of one logits array (distilled
        models only).

    Returns:
      Float32 logits [B, C] (see the module docstring), or (Z_cls, Z_dist)
      with `heads`; with `return_features`, (that, features).
    """
    self._check(x)
    if heads and not self.distilled:
      raise R2D2Error('heads=True needs a ViT with a distillation token '
                      '(distilled=True, e.g. a *_distilled model name).')
    b = x.shape[0]
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID',
                dtype=self.dtype, param_dtype=jnp.float32,
                name='patch_embed')(x.astype(self.dtype))
    x = x.reshape((b, -1, self.width))
    tokens = [self.param('cls_token', trunc_init, (1, 1, self.width),
                         jnp.float32)]
    if self.distilled:
      tokens.append(self.param('dist_token', trunc_init, (1, 1, self.width),
                               jnp.float32))
    tokens = [jnp.broadcast_to(t.astype(self.dtype), (b, 1, self.width))
              for t in tokens]
    x = jnp.concatenate(tokens + [x], axis=1)
    pos = self.param('pos_embed', trunc_init, (1, x.shape[1], self.width),
                     jnp.float32)
    x = x + pos.astype(self.dtype)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    rates = np.linspace(0.0, self.drop_path_rate, self.depth)
    for i in range(self.depth):
      x = EncoderBlock(
          num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          drop_path_rate=float(rates[i]), epsilon=self.layer_norm_epsilon,
          dtype=self.dtype, name=f'block{i}')(x, train=train)
    x = nn.LayerNorm(epsilon=self.layer_norm_epsilon, dtype=self.dtype,
                     param_dtype=jnp.float32, name='norm')(x)
    head = lambda name: nn.Dense(self.num_classes, dtype=self.dtype,
                                 param_dtype=jnp.float32,
                                 kernel_init=trunc_init,
                                 bias_init=nn.initializers.zeros, name=name)
    features = x[:, 0]
    z_cls = head('head')(features).astype(jnp.float32)
    if self.distilled:
      z_dist = head('head_dist')(x[:, 1]).astype(jnp.float32)
      if heads:
        out = (z_cls, z_dist)
      else:
        out = average_heads(z_cls, z_dist)
        if self.has_variable('heads', 'select'):
          select = self.get_variable('heads', 'select')
          out = jnp.where(select == HEADS['class'], z_cls,
                          jnp.where(select == HEADS['distill'], z_dist, out))
    else:
      out = z_cls
    if return_features:
      return out, features.astype(jnp.float32)
    return out
