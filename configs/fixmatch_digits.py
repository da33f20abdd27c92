r"""FixMatch on scikit-learn's embedded digits, 50 labels (5 per class).

One stage of 2000 steps, a few minutes on a 2-core CPU. The method's settings
are the paper's (docs/algorithms.md, "FixMatch"; configs/fixmatch_cifar10.py):
τ = 0.95, λu = 1, hard pseudo-labels, RandAugment of the FixMatch code
(`policy='fixmatch'`: 2 ops, each level drawn from 1..M−1, each op applied
with probability 1/2) then cutout of half the side (4 px; 16 px on CIFAR);
SGD Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on the kernels
only. Scaled down to digits, our choices: cnn_small, 16 labeled + 48
unlabeled images per step (μ = 3), RandAugment magnitude M = 4 (levels 1..3:
the ops translate by whole pixels, so the paper's M = 10 would shift an 8x8
digit by up to 9 px; 3 px is 37 % of the side, CIFAR's 9 px 28 %), EMA 0.99
and 2000 steps.

  python -m r2d2_jax.main --config configs/fixmatch_digits.py \
      --workdir /tmp/r2d2_jax/fixmatch_digits

The supervised baseline on the same split, network, optimizer and schedule:
`--config configs/fixmatch_digits.py --config.method=supervised` (it reads
the labeled stream only). Smoke variant:
`--config configs/fixmatch_digits.py:runlocal`. With the reference's default
strong view, CTAugment (2 ops, threshold 0.80, decay 0.99, learned from a
probe of the labeled batch; then the same 4 px cutout):
`--config configs/fixmatch_digits.py:cta` (`cta,runlocal` for a smoke run).
"""

from configs import common
from r2d2_jax.methods import fixmatch


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "fixmatch"
  common.digits_setup(c)
  c.data.augment.strong.update(policy="fixmatch", num_ops=2, magnitude=4,
                               cutout=4)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="kernels",
                     grad_clip_norm=0.0)
  c.optimizer.schedule.update(name="fixmatch_cosine", warmup_steps=0,
                              wait_steps=0, decay_steps=0)
  c.ema_decay = 0.99
  c.total_steps = 2000
  c.fixmatch = fixmatch.default_block()   # τ = 0.95, λu = 1, hard labels
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
  c.checkpoint_every_steps = 1000
  parts = common.variant_parts(arg, ("runlocal", "cta"))
  if "cta" in parts:
    c.data.augment.strong = common.ctaugment_strong(cutout=4)
  if "runlocal" in parts:
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  return c
