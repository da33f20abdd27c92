r"""FixMatch (RandAugment) on CIFAR-10 with 40, 250 or 4000 labels, WRN-28-2: the paper's settings.

docs/algorithms.md, "FixMatch". The values are those of the reference code,
google-research/fixmatch: `fixmatch.py` (loss, optimizer, EMA, flags) with
the strong view of `ablation/ab_fixmatch_ra.py` (`--augment=d.d.rac`), the
paper's "FixMatch (RA)" rows:
WRN-28-2 (`arch=resnet`, 32 filters, 4 blocks per stage, LeakyReLU 0.1,
BatchNorm decay 0.999); B = 64 labeled + μB = 448 unlabeled images per step
(μ = 7), one train-mode forward over labeled, weak and strong; unlabeled set:
the whole train split (`data.unlabeled='all'`, the reference's `-unlabel`
files hold every train image); weak view flip + translate by 4 px (12.5 %,
reflect padding, `Primitives.ms(4)`), also on the labeled batch; strong view
the weak one, then the FixMatch RandAugment (`policy='fixmatch'`: 2 ops, each
level drawn from 1..9, each applied with probability 1/2, `AugmentPoolRAMC`)
and cutout 16 px; τ = 0.95, λu = 1, hard pseudo-labels; SGD Nesterov
momentum 0.9, lr 0.03 · cos(7πk/16K) (`fixmatch_cosine`), weight decay 5e-4
on the kernels only (`'kernel' in v.name`, coupled: `wd · Σ l2_loss`), no
warmup; K = 2^20 steps (`train_kimg = 2^16` kimg of 64 images); EMA 0.999
of the parameters, evaluated. The reference reports the median EMA test
accuracy of its last 20 evaluations, one per 64 kimg (1024 steps): hence an
evaluation every 1024 steps (`median last 20` in benchmarks/results.py).
Paper error, FixMatch (RA): 13.81 % (40), 5.07 % (250), 4.26 % (4000).

  python -m r2d2_jax.main --config configs/fixmatch_cifar10.py:4000 \
      --workdir /mnt/shared/r2d2/fixmatch_cifar10_4000
  python -m r2d2_jax.main --config configs/fixmatch_cifar10.py:250 \
      --workdir /mnt/shared/r2d2/fixmatch_cifar10_250
  python -m r2d2_jax.main --config configs/fixmatch_cifar10.py:40 \
      --workdir /mnt/shared/r2d2/fixmatch_cifar10_40

Arguments (comma-separated): the label count, 40, 250 or 4000 (default
4000), 'cta' for the reference's default strong view, CTAugment (the paper's
"FixMatch (CTA)" rows: `fixmatch.py` `AugmentPoolCTACutOut`, flags adepth 2,
ath 0.80, adecay 0.99: 2 ops at bins drawn from the learned weights, then
cutout 16 px; the weights learned from a probe view of the labeled batch,
docs/algorithms.md "CTAugment"), and 'runlocal' for a smoke run of a few
steps on a small network: `--config configs/fixmatch_cifar10.py:runlocal`,
`...:40,runlocal` or `...:250,cta` (CIFAR-10 must be available to tfds).

  python -m r2d2_jax.main --config configs/fixmatch_cifar10.py:250,cta \
      --workdir /mnt/shared/r2d2/fixmatch_cta_cifar10_250

Differences with the reference (docs/algorithms.md, "FixMatch"): without
'cta' the strong augmentation is RandAugment (the paper's RA rows), not the
reference's default CTAugment; the EMA model's BatchNorm statistics are an EMA of the running
statistics (`TrainState`), where the reference copies the running statistics
(it averages trainable variables only); on several devices BatchNorm
normalises over the global batch, where the reference's `para_cat` uses each
GPU's shard; the reference's convolution biases are omitted (each is followed
by a BatchNorm: no effect on the function, zero gradient).
"""

import ml_collections

from configs import common
from r2d2_jax.methods import fixmatch

LABELS = (40, 250, 4000)


def get_config(arg: str | None = None):
  labels, runlocal, cta = 4000, False, False
  for part in [p for p in (arg or "").split(",") if p]:
    if part == "runlocal":
      runlocal = True
    elif part == "cta":
      cta = True
    elif part.isdigit() and int(part) in LABELS:
      labels = int(part)
    else:
      raise ValueError(f"Unknown variant {part!r}; use 40, 250 or 4000, "
                       "'cta' and/or 'runlocal', comma-separated.")
  c = common.base_config()
  c.method = "fixmatch"
  c.model.name = "wrn28_2"
  c.model.kwargs = ml_collections.ConfigDict(dict(bn_momentum=0.999,
                                                  dropout_rate=0.0))
  c.data.dataset = "cifar10"
  c.data.num_labels = labels
  c.data.num_val = 0
  c.data.unlabeled = "all"
  c.data.batch_size = 64
  c.data.uratio = 7
  c.data.eval_batch_size = 1000
  c.data.augment.weak.update(flip=True, translate=4, pad_mode="reflect")
  c.data.augment.strong.update(policy="fixmatch", num_ops=2, magnitude=10,
                               cutout=16)
  if cta:
    c.data.augment.strong = common.ctaugment_strong(cutout=16)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4,
      decay_mask="kernels", grad_clip_norm=0.0,
      schedule=dict(name="fixmatch_cosine", warmup_steps=0, wait_steps=0,
                    decay_steps=0)))
  c.label_smoothing = 0.0
  c.ema_decay = 0.999
  c.total_steps = 1 << 20
  c.fixmatch = fixmatch.default_block()   # τ = 0.95, λu = 1, hard labels
  c.log_every_steps = 256
  c.eval_every_steps = 1024
  c.checkpoint_every_steps = 4096
  if runlocal:
    c.model.name = "cnn_small"
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.batch_size = 8
    c.data.uratio = 2
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
  return c
