r"""AdaMatch (semi-supervised) on CIFAR-10 with 40, 250 or 4000 labels, WRN-28-2: USB's settings.

docs/algorithms.md, "AdaMatch". The values are those of USB
(microsoft/Semi-supervised-learning `config/classic_cv/adamatch/
adamatch_cifar10_{40,250,4000}_0.yaml`); the setup (network, batches, views,
optimizer, schedule, EMA, evaluation) is USB's classic-CV CIFAR-10 one,
shared with configs/softmatch_cifar10.py (its docstring lists it). AdaMatch:
distribution alignment to the EMA of the labeled prediction (momentum
`ema_p` 0.999), relative threshold τ · mean max p_l with τ = `p_cutoff`
0.95 (USB's configs; the AdaMatch paper: 0.9), hard pseudo-labels of the
aligned prediction, λu = 1 constant (`ulb_loss_ratio`; the paper's cosine
warm-up is `config.adamatch.weight_schedule='cosine_warmup'`).

  python -m r2d2_jax.main --config configs/adamatch_cifar10.py:4000 \
      --workdir /mnt/shared/r2d2/adamatch_cifar10_4000
  python -m r2d2_jax.main --config configs/adamatch_cifar10.py:250 \
      --workdir /mnt/shared/r2d2/adamatch_cifar10_250
  python -m r2d2_jax.main --config configs/adamatch_cifar10.py:40 \
      --workdir /mnt/shared/r2d2/adamatch_cifar10_40

Arguments (comma-separated): the label count, 40, 250 or 4000 (default
4000), and 'runlocal' for a smoke run of a few steps on a small network:
`--config configs/adamatch_cifar10.py:runlocal` or `...:40,runlocal`.

Differences with USB: those of configs/softmatch_cifar10.py.
"""

from configs import common
from configs import softmatch_cifar10
from r2d2_jax.methods import adamatch


def get_config(arg: str | None = None):
  labels, runlocal = softmatch_cifar10.parse_arg(arg)
  c = common.base_config()
  c.method = "adamatch"
  common.usb_cifar10(c, labels, runlocal)
  # τ = 0.95 relative, λu = 1 constant, hard labels, m = 0.999; alignment on.
  c.adamatch = adamatch.default_block()
  return c
