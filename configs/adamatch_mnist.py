r"""AdaMatch on MNIST with 100 labels (10 per class), the MNIST MLP.

The method's settings are USB's (docs/algorithms.md, "AdaMatch";
configs/adamatch_cifar10.py): distribution alignment to the EMA (0.999) of
the labeled prediction, relative threshold 0.95 · mean max p_l, hard
pseudo-labels of the aligned prediction, λu = 1 constant.
Everything else is configs/fixmatch_mnist.py (only the method block
differs): μ = 7, the FixMatch RandAugment (`policy='fixmatch'`, M = 10) then
cutout; SGD Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on the
kernels only. The MNIST protocol is the shared one (`common.mnist_data`:
translate 2 px, no flips, cutout 8 px, 1000 validation images) and the
network the 1200-600-300-150-150 BatchNorm MLP of the MNIST configs
(`mlp_mnist`), so it compares with configs/mpl_mnist.py and
configs/semimeta_mnist.py; 32 labeled + 224 unlabeled images per step,
6000 steps and EMA 0.995 are our choices.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/adamatch_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/adamatch_mnist

The supervised baseline on the same split: `--config.method=supervised`.
Smoke variant: `--config configs/adamatch_mnist.py:runlocal`.
"""

from configs import fixmatch_mnist
from r2d2_jax.methods import adamatch


def get_config(arg: str | None = None):
  c = fixmatch_mnist.get_config(arg)
  c.method = "adamatch"
  del c.fixmatch
  c.adamatch = adamatch.default_block()   # USB's settings (docstring)
  return c
