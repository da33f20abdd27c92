r"""MixMatch on CIFAR-10 with 250 or 4000 labels, WRN-28-2: the paper's settings.

docs/algorithms.md, "MixMatch"; the values are those of the reference code
(google-research/mixmatch `mixmatch.py`, `libml/`) with the flags of its
`runs/table5.sh` (`--wd=0.02 --beta=0.75 --w_match=75`, `cifar10.{seed}@{size}-1`):
WRN-28-2 (`arch=resnet`, 32 filters, 4 blocks per stage, LeakyReLU 0.1,
BatchNorm decay 0.999); B = 64 labeled + 64 unlabeled images per step (μ = 1),
K = 2 weak views (flip + translate 4 px, reflect padding, `augment_cifar10`),
T = 0.5, MixUp α = 0.75; λu = 75 ramped linearly over 1024 kimg = 16384 steps
(`warmup_kimg=1024`); Adam lr 0.002 (constant, TF's β = 0.9, 0.999) with the
kernels (convolutions, dense) shrunk after each step by (1 − 0.02·0.002)
(`wd *= lr`, `v ← v·(1 − wd)`: `optimizer.weight_decay_mode='after_update'`,
`decay_mask='kernels'`); EMA 0.999 of the parameters; 2^16 kimg = 2^20
steps (1024 "epochs" of 64 kimg). The reference reports the median test
accuracy of the EMA model over its last 20 checkpoints, one per 64 kimg
(1024 steps): hence an evaluation every 1024 steps. Paper error: 11.08 %
(250), 6.24 % (4000).

  python -m r2d2_jax.main --config configs/mixmatch_cifar10.py:4000 \
      --workdir /mnt/shared/r2d2/mixmatch_cifar10_4000
  python -m r2d2_jax.main --config configs/mixmatch_cifar10.py:250 \
      --workdir /mnt/shared/r2d2/mixmatch_cifar10_250

Arguments (comma-separated): the label count, '250' or '4000' (default
4000), and 'runlocal' for a smoke run of a few steps on a small network:
`--config configs/mixmatch_cifar10.py:runlocal` or `...:250,runlocal`
(CIFAR-10 must be available to tfds).
"""

import ml_collections

from configs import common

LABELS = (250, 4000)


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  labels, runlocal = 4000, False
  for p in parts:
    if p == "runlocal":
      runlocal = True
    elif p.isdigit() and int(p) in LABELS:
      labels = int(p)
    else:
      raise ValueError(f"Unknown variant {p!r}; use 250 or 4000 and/or "
                       "'runlocal', comma-separated.")
  c = common.base_config()
  c.method = "mixmatch"
  c.model.name = "wrn28_2"
  c.model.kwargs = ml_collections.ConfigDict(dict(bn_momentum=0.999))
  c.data.dataset = "cifar10"
  c.data.num_labels = labels
  c.data.batch_size = 64
  c.data.uratio = 1
  c.data.eval_batch_size = 1000
  c.data.augment.weak.update(flip=True, translate=4, pad_mode="reflect")
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=0.002, b1=0.9, b2=0.999, weight_decay=0.02,
      weight_decay_mode="after_update", decay_mask="kernels",
      grad_clip_norm=0.0, schedule=dict(name="constant", warmup_steps=0,
                                        wait_steps=0, decay_steps=0)))
  c.ema_decay = 0.999
  c.total_steps = 1 << 20
  c.mixmatch = ml_collections.ConfigDict(dict(
      weight=75.0, ramp_steps=16384, temperature=0.5, alpha=0.75,
      num_views=2, interleave=True))
  c.log_every_steps = 1024
  c.eval_every_steps = 1024
  c.checkpoint_every_steps = 16384
  if runlocal:
    c.model.name = "cnn_small"
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.batch_size = 8
    c.total_steps = 4
    c.mixmatch.ramp_steps = 2
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
  return c
