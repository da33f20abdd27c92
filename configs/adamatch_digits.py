r"""AdaMatch on scikit-learn's embedded digits, 50 labels (5 per class).

One stage of 2000 steps, a few minutes on a 2-core CPU. The method's
settings are USB's (docs/algorithms.md, "AdaMatch";
configs/adamatch_cifar10.py): distribution alignment to the EMA (0.999) of
the labeled prediction, relative threshold 0.95 · mean max p_l, hard
pseudo-labels of the aligned prediction, λu = 1 constant.
Everything else is configs/fixmatch_digits.py (only the method block
differs, so the two compare): cnn_small, 16 labeled + 48 unlabeled images
per step (μ = 3), the FixMatch RandAugment (`policy='fixmatch'`, M = 4) then
cutout 4 px, SGD Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on
the kernels only, EMA 0.99.

  python -m r2d2_jax.main --config configs/adamatch_digits.py \
      --workdir /tmp/r2d2_jax/adamatch_digits

The supervised baseline on the same split, network, optimizer and schedule:
`--config configs/adamatch_digits.py --config.method=supervised` (it reads
the labeled stream only). Smoke variant:
`--config configs/adamatch_digits.py:runlocal`.
"""

from configs import fixmatch_digits
from r2d2_jax.methods import adamatch


def get_config(arg: str | None = None):
  c = fixmatch_digits.get_config(arg)
  c.method = "adamatch"
  del c.fixmatch
  c.adamatch = adamatch.default_block()   # USB's settings (docstring)
  return c
