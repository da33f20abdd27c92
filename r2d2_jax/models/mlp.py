"""A multi-layer perceptron with BatchNorm: the permutation-invariant MNIST network.

`mlp_mnist` is the 1200-600-300-150-150 ReLU network with BatchNorm that VAT and
the Ladder network use for permutation-invariant MNIST (the setting of the 1.36 %
and 0.89 % results in docs/algorithms.md, "Reference results on MNIST-100"). On
CPU it is far cheaper than a CNN.

Two options serve VAT's TPAMI setting (configs/vat_mnist.py): `noise_std`, Gaussian
noise added in train mode to every hidden layer after its BatchNorm (before the
ReLU, where the Ladder network adds it: the normalised pre-activation has unit
scale), drawn from the 'dropout' rng stream; and `top_bn`, BatchNorm on the
logits as well (takerum/vat's MNIST networks normalise every layer), with the
classifier's bias then left out (BatchNorm's β is the bias).
"""

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten → [Dense → BatchNorm (+ noise) → ReLU] × len(widths) → Dense (→ BatchNorm).

  Attributes:
    num_classes: number of logits.
    widths: hidden layer sizes.
    bn_momentum: BatchNorm running-average momentum.
    noise_std: std of the Gaussian noise added after each hidden BatchNorm in
      train mode (0: none).
    top_bn: BatchNorm on the logits (and no classifier bias).
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int
  widths: Sequence[int] = (1200, 600, 300, 150, 150)
  bn_momentum: float = 0.9
  noise_std: float = 0.0
  top_bn: bool = False
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ('dropout',)

  def __post_init__(self):
    if not self.noise_std >= 0.0:
      raise ValueError(f"MLP noise_std={self.noise_std!r}: use a number >= 0.")
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False):
    """Returns float32 logits [B, num_classes] (and the last hidden layer)."""
    x = x.reshape(x.shape[0], -1).astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = nn.Dense(width, use_bias=False, dtype=self.dtype,
                   param_dtype=jnp.float32, name=f"dense{i + 1}")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                       dtype=self.dtype, param_dtype=jnp.float32,
                       name=f"bn{i + 1}")(x)
      if train and self.noise_std > 0:
        noise = jax.random.normal(self.make_rng("dropout"), x.shape, x.dtype)
        x = x + self.noise_std * noise
      x = nn.relu(x)
    logits = nn.Dense(self.num_classes, use_bias=not self.top_bn,
                      dtype=self.dtype, param_dtype=jnp.float32,
                      name="classifier")(x)
    if self.top_bn:
      logits = nn.BatchNorm(use_running_average=not train,
                            momentum=self.bn_momentum, dtype=self.dtype,
                            param_dtype=jnp.float32, name="bn_top")(logits)
    if return_features:
      return logits.astype(jnp.float32), x.astype(jnp.float32)
    return logits.astype(jnp.float32)
