r"""MixMatch on scikit-learn's embedded digits, 50 labels (5 per class).

One stage of 2000 steps, a couple of minutes on a 2-core CPU. The method's
settings and optimizer are the CIFAR-10 reference's (docs/algorithms.md,
"MixMatch"; configs/mixmatch_cifar10.py): K = 2 weak views, T = 0.5, MixUp
α = 0.75, λu = 75, BatchNorm over interleaved batches; Adam lr 0.002 with the
kernels shrunk by (1 − 0.02·lr) after each step. The network (cnn_small), the
batch (16 labeled + 48 unlabeled), the ramp (400 steps), the EMA decay (0.99)
and the step count are scaled down to digits and are our choices.

  python -m r2d2_jax.main --config configs/mixmatch_digits.py \
      --workdir /tmp/r2d2_jax/mixmatch_digits

The supervised baseline on the same split, network, optimizer and schedule:
`--config configs/mixmatch_digits.py --config.method=supervised`.
Smoke variant: `--config configs/mixmatch_digits.py:runlocal`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mixmatch"
  common.digits_setup(c)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=0.002, b1=0.9, b2=0.999, weight_decay=0.02,
      weight_decay_mode="after_update", decay_mask="kernels",
      grad_clip_norm=0.0, schedule=dict(name="constant", warmup_steps=0,
                                        wait_steps=0, decay_steps=0)))
  c.ema_decay = 0.99
  c.total_steps = 2000
  c.mixmatch = ml_collections.ConfigDict(dict(
      weight=75.0, ramp_steps=400, temperature=0.5, alpha=0.75, num_views=2,
      interleave=True))
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 6
    c.mixmatch.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
