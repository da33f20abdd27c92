r"""FlexMatch on MNIST with 100 labels (10 per class), the MNIST MLP.

docs/algorithms.md, "FlexMatch". The method's settings are USB's
(configs/flexmatch_cifar10.py): τ = 0.95 with the curriculum thresholds
(convex mapping, thresh_warmup), λu = 1, hard pseudo-labels. Everything else is
configs/fixmatch_mnist.py's (the shared MNIST protocol, the `mlp_mnist` MLP,
32 labeled + 224 unlabeled images per step, the FixMatch RandAugment M = 10
then cutout, SGD Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on
the kernels, EMA 0.995, 6000 steps), so the two compare.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/flexmatch_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/flexmatch_mnist

Smoke variant: `--config configs/flexmatch_mnist.py:runlocal`.
"""

from configs import fixmatch_mnist
from r2d2_jax.methods import flexmatch


def get_config(arg: str | None = None):
  c = fixmatch_mnist.get_config(arg)
  c.method = "flexmatch"
  del c.fixmatch
  # τ = 0.95, λu = 1, hard labels, thresh_warmup
  c.flexmatch = flexmatch.default_block()
  return c
