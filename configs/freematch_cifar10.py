r"""FreeMatch on CIFAR-10 with 40, 250 or 4000 labels, WRN-28-2: USB's settings.

docs/algorithms.md, "FreeMatch". The values are those of USB
(microsoft/Semi-supervised-learning `config/classic_cv/freematch/
freematch_cifar10_{40,250,4000}_0.yaml`, `semilearn/algorithms/freematch/`),
with USB's classic-CV CIFAR-10 setup of configs/flexmatch_cifar10.py
(WRN-28-2, B = 64 + μB = 448, unlabeled set the whole train split, weak flip +
reflect crop 4 px, strong USB's RandAugment(3, 5) with its random cutout, SGD
Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on the kernels,
K = 2^20 steps, EMA 0.999, an evaluation every 5120 steps). FreeMatch: EMA
momentum λ = 0.999 (`ema_p`) of τ_t (the mean max probability,
`use_quantile` False, no clipping: `clip_thresh` False), of p̃ and of h̃;
fairness weight λe = 0.001 (`ent_loss_ratio`, the same for 40, 250 and 4000
labels), hard pseudo-labels (T = 0.5 only for soft ones), λu = 1. USB reports
the best EMA test error over training; its `results/classic_cv.csv`,
FreeMatch: 4.97 ± 0.09 % (40), 4.85 ± 0.1 % (250), 4.14 ± 0.19 % (4000).

  python -m r2d2_jax.main --config configs/freematch_cifar10.py:4000 \
      --workdir /mnt/shared/r2d2/freematch_cifar10_4000
  python -m r2d2_jax.main --config configs/freematch_cifar10.py:250 \
      --workdir /mnt/shared/r2d2/freematch_cifar10_250
  python -m r2d2_jax.main --config configs/freematch_cifar10.py:40 \
      --workdir /mnt/shared/r2d2/freematch_cifar10_40

Arguments (comma-separated): the label count, 40, 250 or 4000 (default
4000), and 'runlocal' for a smoke run of a few steps on a small network:
`--config configs/freematch_cifar10.py:runlocal` or `...:40,runlocal`
(CIFAR-10 must be available to tfds).

Differences with USB: those of configs/flexmatch_cifar10.py
(docs/algorithms.md, "FreeMatch").
"""

from configs import common
from configs import flexmatch_cifar10
from r2d2_jax.methods import freematch


def get_config(arg: str | None = None):
  labels, runlocal = flexmatch_cifar10.parse_arg(arg)
  c = common.base_config()
  c.method = "freematch"
  common.usb_cifar10(c, labels, runlocal)
  # λ = 0.999, λe = 0.001, hard labels (T = 0.5 for soft ones), λu = 1.
  c.freematch = freematch.default_block()
  return c
