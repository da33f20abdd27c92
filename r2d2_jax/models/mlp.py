"""A multi-layer perceptron with BatchNorm: the permutation-invariant MNIST network.

`mlp_mnist` is the 1200-600-300-150-150 ReLU network with BatchNorm that VAT and
the Ladder network use for permutation-invariant MNIST (the setting of the 1.36 %
and 0.89 % results in docs/algorithms.md, "Reference results on MNIST-100"). On CPU it is far cheaper than a CNN.
"""

from typing import Any, ClassVar, Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten → [Dense → BatchNorm → ReLU] × len(widths) → Dense.

  Attributes:
    num_classes: number of logits.
    widths: hidden layer sizes.
    bn_momentum: BatchNorm running-average momentum.
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int
  widths: Sequence[int] = (1200, 600, 300, 150, 150)
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  rng_names: ClassVar[tuple[str, ...]] = ()

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
      x = nn.relu(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype,
                      param_dtype=jnp.float32, name="classifier")(x)
    if return_features:
      return logits.astype(jnp.float32), x.astype(jnp.float32)
    return logits.astype(jnp.float32)
