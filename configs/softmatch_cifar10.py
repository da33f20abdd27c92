r"""SoftMatch on CIFAR-10 with 40, 250 or 4000 labels, WRN-28-2: USB's settings.

docs/algorithms.md, "SoftMatch". The values are those of USB
(microsoft/Semi-supervised-learning `config/classic_cv/softmatch/
softmatch_cifar10_{40,250,4000}_0.yaml`, `semilearn/core/utils/build.py`,
`semilearn/datasets/cv_datasets/cifar.py`):
WRN-28-2 (`wrn_28_2`, LeakyReLU 0.1, BatchNorm momentum 0.001 = decay 0.999);
B = 64 labeled + μB = 448 unlabeled images per step (`uratio` 7), one
train-mode forward over labeled, weak and strong (`use_cat`); unlabeled set:
the whole train split (`include_lb_to_ulb`); weak view flip + crop with
reflect padding of 4 px (`crop_ratio` 0.875), also on the labeled batch; strong
view the weak one, then USB's RandAugment(3, 5) with its random cutout
(`policy='usb'`, `num_ops=3`, no extra cutout); SoftMatch: uniform
distribution alignment and truncated-Gaussian weights, n = 2, EMA momentum
`ema_p` 0.999, hard pseudo-labels of the unaligned prediction (T = 0.5 unused),
λu = 1 (`ulb_loss_ratio`); SGD Nesterov (`get_optimizer`'s default) momentum
0.9, lr 0.03 · cos(7πk/16K) (`get_cosine_schedule_with_warmup`, no warmup),
weight decay 5e-4 on the ≥2-D weights only (`bn_wd_skip`: no BatchNorm, no
bias: the convolution and dense kernels); K = 2^20 steps; EMA 0.999 of the
parameters (`ema_m`), evaluated every 5120 steps (`num_eval_iter`). USB
reports the best EMA test error over training.

  python -m r2d2_jax.main --config configs/softmatch_cifar10.py:4000 \
      --workdir /mnt/shared/r2d2/softmatch_cifar10_4000
  python -m r2d2_jax.main --config configs/softmatch_cifar10.py:250 \
      --workdir /mnt/shared/r2d2/softmatch_cifar10_250
  python -m r2d2_jax.main --config configs/softmatch_cifar10.py:40 \
      --workdir /mnt/shared/r2d2/softmatch_cifar10_40

Arguments (comma-separated): the label count, 40, 250 or 4000 (default
4000), and 'runlocal' for a smoke run of a few steps on a small network:
`--config configs/softmatch_cifar10.py:runlocal` or `...:40,runlocal`
(CIFAR-10 must be available to tfds).

Differences with USB (docs/algorithms.md, "SoftMatch"): the EMA model's
BatchNorm statistics are an EMA of the running statistics (USB copies the
running statistics into its EMA model); BatchNorm epsilon 1e-3 (the FixMatch
WRN of this library; USB's PyTorch default 1e-5); on several devices
BatchNorm normalises over the global batch (USB: each GPU's shard).
"""

from configs import common
from r2d2_jax.methods import softmatch

LABELS = (40, 250, 4000)


def parse_arg(arg: str | None) -> tuple[int, bool]:
  labels, runlocal = 4000, False
  for part in [p for p in (arg or "").split(",") if p]:
    if part == "runlocal":
      runlocal = True
    elif part.isdigit() and int(part) in LABELS:
      labels = int(part)
    else:
      raise ValueError(f"Unknown variant {part!r}; use 40, 250 or 4000 "
                       "and/or 'runlocal', comma-separated.")
  return labels, runlocal


def get_config(arg: str | None = None):
  labels, runlocal = parse_arg(arg)
  c = common.base_config()
  c.method = "softmatch"
  common.usb_cifar10(c, labels, runlocal)
  # λu = 1, hard labels, T = 0.5, n = 2, m = 0.999; uniform alignment on.
  c.softmatch = softmatch.default_block()
  return c
