r"""SoftMatch on scikit-learn's embedded digits, 50 labels (5 per class).

One stage of 2000 steps, a few minutes on a 2-core CPU. The method's
settings are USB's (docs/algorithms.md, "SoftMatch";
configs/softmatch_cifar10.py): uniform distribution alignment, truncated-
Gaussian weights with n = 2 and EMA momentum 0.999, hard pseudo-labels of the
unaligned prediction, λu = 1.
Everything else is configs/fixmatch_digits.py (only the method block
differs, so the two compare): cnn_small, 16 labeled + 48 unlabeled images
per step (μ = 3), the FixMatch RandAugment (`policy='fixmatch'`, M = 4) then
cutout 4 px, SGD Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on
the kernels only, EMA 0.99.

  python -m r2d2_jax.main --config configs/softmatch_digits.py \
      --workdir /tmp/r2d2_jax/softmatch_digits

The supervised baseline on the same split, network, optimizer and schedule:
`--config configs/softmatch_digits.py --config.method=supervised` (it reads
the labeled stream only). Smoke variant:
`--config configs/softmatch_digits.py:runlocal`.
"""

from configs import fixmatch_digits
from r2d2_jax.methods import softmatch


def get_config(arg: str | None = None):
  c = fixmatch_digits.get_config(arg)
  c.method = "softmatch"
  del c.fixmatch
  c.softmatch = softmatch.default_block()   # USB's settings (docstring)
  return c
