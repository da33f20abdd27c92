r"""FreeMatch on scikit-learn's embedded digits, 50 labels (5 per class).

docs/algorithms.md, "FreeMatch". The method's settings are USB's
(configs/freematch_cifar10.py): λ = 0.999 (`ema_p`), fairness weight λe = 0.001,
λu = 1, hard pseudo-labels. Everything else is
configs/fixmatch_digits.py's, so the two compare on the same split, network,
views, optimizer and schedule: cnn_small, 16 labeled + 48 unlabeled images per
step (μ = 3), the FixMatch RandAugment with M = 4 then cutout 4 px, SGD
Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on the kernels only,
EMA 0.99 and 2000 steps.

  python -m r2d2_jax.main --config configs/freematch_digits.py \
      --workdir /tmp/r2d2_jax/freematch_digits

Smoke variant: `--config configs/freematch_digits.py:runlocal`.
"""

from configs import fixmatch_digits
from r2d2_jax.methods import freematch


def get_config(arg: str | None = None):
  c = fixmatch_digits.get_config(arg)
  c.method = "freematch"
  del c.fixmatch
  # λ = 0.999, λe = 0.001, λu = 1, hard labels
  c.freematch = freematch.default_block()
  return c
