"""Model zoo: image classifiers by name.

Contract shared by every model returned by `get_model`:

* Call it as ``model.apply(variables, x, train=..., return_features=False,
  rngs=..., mutable=...)``; the module's signature is
  ``__call__(self, x, *, train: bool, return_features: bool = False)``.
* ``x`` is a float32 NHWC batch, already normalised.
* It returns float32 logits ``[B, num_classes]`` (cast at the end, whatever the
  compute dtype), or ``(logits, features)`` when ``return_features=True``, where
  ``features`` is the float32 penultimate representation ``[B, D]`` (the input
  of the last dense layer; D = 2 for ``lenet_2d``).
* Attributes: ``num_classes``; ``dtype`` (compute dtype, default float32, e.g.
  bfloat16 for mixed precision; parameters are always float32; the trainer
  takes it from ``config.model.dtype``, validated by `compute_dtype`); dropout
  rates where the papers use dropout; ``drop_path_rate`` (stochastic depth of
  the last residual block, linear over the blocks) for the ResNets, Wide
  ResNets and ViTs.
* BatchNorm uses ``use_running_average=not train`` and the ``batch_stats``
  collection: in training pass ``mutable=['batch_stats']``.
* Randomness in training comes from the rng names listed in the class attribute
  ``rng_names``: ``'dropout'`` for dropout and stochastic depth (and ConvLarge's input noise),
  ``'shake'`` for Shake-Shake. Passing a name a model does not use is harmless;
  eval mode needs no rngs.
* Distilled ViTs (``*_distilled``, ``vit`` with ``distilled=True``) return
  the log of the mean of their two heads' softmaxes, and the pair of heads'
  logits with ``heads=True`` (`r2d2_jax.models.vit`).

Registry names:

================================  ===============================================
``lenet_2d``                      LeNet, 28x28x1, 2-D feature layer (MNIST plots)
``cnn_small``                     small CNN for 8x8 / 28x28 digits
``mlp_mnist``                     1200-600-300-150-150 MLP + BN (PI MNIST, VAT)
``cnn13`` / ``convlarge``         CNN-13 of Temporal Ensembling / Mean Teacher
``wrn28_2``, ``wrn28_8``          WRN-28-k of FixMatch / MPL
``wide_resnet``                   WRN with ``depth`` / ``width`` kwargs
``shake_shake26_2x96d``           Shake-Shake-26 2x96d
``shake_shake``                   Shake-Shake with ``width`` (and ``depth``) kwargs
``resnet18``, ``resnet50``        ResNet v1, ImageNet or CIFAR stem by input size
``vit``                           ViT with ``patch_size`` / ``width`` / ``depth``
                                  / ``num_heads`` / ``distilled`` kwargs
                                  (defaults: DeiT-Ti)
``vit_digits``                    ViT for 8x8: patch 2, width 64, depth 4, 4 heads
``vit_mnist``                     ViT for 28x28: patch 4, 128, depth 6, 4 heads
``vit_cifar``                     ViT for 32x32: patch 4, 192, depth 9, 3 heads
``deit_tiny``                     DeiT-Ti, 224x224: patch 16, 192, 12, 3 heads
``deit_small``                    DeiT-S, 224x224: patch 16, 384, 12, 6 heads
``<vit name>_distilled``          the same with DeiT's distillation token and
                                  head (all five sizes above)
================================  ===============================================
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from r2d2_jax.errors import R2D2Error, unknown_name
from r2d2_jax.models.cnn_small import CNNSmall
from r2d2_jax.models.convlarge import ConvLarge
from r2d2_jax.models.lenet import LeNet
from r2d2_jax.models.mlp import MLP
from r2d2_jax.models.resnet import ResNet, ResNet18, ResNet50
from r2d2_jax.models.shake_shake import ShakeShake
from r2d2_jax.models.vit import ViT
from r2d2_jax.models.wide_resnet import WideResNet

MODELS: dict[str, Callable[..., nn.Module]] = {
    'lenet_2d': functools.partial(LeNet, feature_dim=2),
    'cnn_small': CNNSmall,
    'mlp_mnist': MLP,
    'cnn13': ConvLarge,
    'convlarge': ConvLarge,
    'wrn28_2': functools.partial(WideResNet, depth=28, width=2),
    'wrn28_8': functools.partial(WideResNet, depth=28, width=8),
    'wide_resnet': WideResNet,
    'shake_shake26_2x96d': functools.partial(ShakeShake, depth=26, width=96),
    'shake_shake': ShakeShake,
    'resnet18': ResNet18,
    'resnet50': ResNet50,
    'vit': ViT,
}

# ViT sizes: (patch_size, width, depth, num_heads); each also as `_distilled`.
VIT_SIZES = {
    'vit_digits': (2, 64, 4, 4),
    'vit_mnist': (4, 128, 6, 4),
    'vit_cifar': (4, 192, 9, 3),
    'deit_tiny': (16, 192, 12, 3),
    'deit_small': (16, 384, 12, 6),
}
for _name, (_p, _w, _d, _h) in VIT_SIZES.items():
  for _suffix, _distilled in (('', False), ('_distilled', True)):
    MODELS[_name + _suffix] = functools.partial(
        ViT, patch_size=_p, width=_w, depth=_d, num_heads=_h,
        distilled=_distilled)
del _name, _p, _w, _d, _h, _suffix, _distilled


# `config.model.dtype` values: the compute dtype ('' = float32). Parameters,
# logits, losses and optimizer state stay float32 whatever is chosen. float16
# is left out: it needs loss scaling, which this library does not do.
COMPUTE_DTYPES: dict[str, Any] = {
    '': jnp.float32,
    'float32': jnp.float32,
    'bfloat16': jnp.bfloat16,
}


class UnknownModelError(R2D2Error, ValueError):
  """A model name that is not in `MODELS`."""


class UnknownDtypeError(R2D2Error, ValueError):
  """A compute dtype that is not in `COMPUTE_DTYPES`."""


def compute_dtype(dtype: Any) -> jnp.dtype:
  """Validates a compute dtype given by name (e.g. `config.model.dtype`) or type.

  Args:
    dtype: A key of `COMPUTE_DTYPES` ('' or None = float32), or a dtype such as
      ``jnp.bfloat16``.

  Returns:
    The numpy dtype, float32 or bfloat16.

  Raises:
    UnknownDtypeError: (an `R2D2Error` and a `ValueError`) for anything else;
      the message lists the valid names.
  """
  if dtype is None:
    dtype = ''
  if isinstance(dtype, str):
    if dtype not in COMPUTE_DTYPES:
      raise UnknownDtypeError(
          f'Unknown model dtype {dtype!r}. Valid dtypes: '
          f"{', '.join(repr(k) for k in COMPUTE_DTYPES)} ('' = float32).")
    return jnp.dtype(COMPUTE_DTYPES[dtype])
  try:
    out = jnp.dtype(dtype)
  except TypeError:
    out = None
  if out is None or out not in {jnp.dtype(d) for d in COMPUTE_DTYPES.values()}:
    raise UnknownDtypeError(
        f'Unsupported model dtype {dtype!r}: use float32 or bfloat16.')
  return out


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds a registered model.

  Args:
    name: A key of `MODELS`, e.g. 'wrn28_2'.
    num_classes: Number of output logits.
    **kwargs: Further module attributes, e.g. ``dtype=jnp.bfloat16`` (or
      ``dtype='bfloat16'``; see `compute_dtype`), ``dropout_rate=0.2`` or
      ``depth=16, width=4`` for 'wide_resnet'.

  Returns:
    The (unbound) flax module.

  Raises:
    ValueError: (an `R2D2Error` too) if `name` or `dtype` is unknown; the
      message lists the valid ones.
  """
  if name not in MODELS:
    raise UnknownModelError(str(unknown_name('model', name, MODELS)))
  if 'dtype' in kwargs:
    kwargs['dtype'] = compute_dtype(kwargs['dtype'])
  return MODELS[name](num_classes=num_classes, **kwargs)


__all__ = [
    'COMPUTE_DTYPES', 'MODELS', 'compute_dtype', 'get_model',
    'UnknownDtypeError', 'UnknownModelError', 'CNNSmall', 'ConvLarge',
    'LeNet', 'ResNet', 'ResNet18', 'ResNet50', 'ShakeShake', 'ViT',
    'WideResNet',
]
