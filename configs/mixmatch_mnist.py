r"""MixMatch on MNIST with 100 labels (10 per class), the MNIST MLP.

The method's settings and optimizer are the CIFAR-10 reference's
(docs/algorithms.md, "MixMatch"; configs/mixmatch_cifar10.py): K = 2 weak views
(translate 2, no flips), T = 0.5, MixUp α = 0.75, λu = 75, BatchNorm over
interleaved batches; Adam lr 0.002 with the kernels shrunk by (1 − 0.02·lr)
after each step; EMA 0.999 of the parameters. The network (the
1200-600-300-150-150 BatchNorm MLP `mlp_mnist`, as configs/semimeta_mnist.py
and configs/mpl_mnist.py, so they compare), the batch (64 labeled + 64
unlabeled, μ = 1 as the reference), the ramp (1000 steps) and the 6000 steps
are our CPU-sized choices, not the paper's.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/mixmatch_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/mixmatch_mnist

Smoke variant: `--config configs/mixmatch_mnist.py:runlocal`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mixmatch"
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 64
  c.data.uratio = 1
  c.data.eval_batch_size = 1000
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", lr=0.002, b1=0.9, b2=0.999, weight_decay=0.02,
      weight_decay_mode="after_update", decay_mask="kernels",
      grad_clip_norm=0.0, schedule=dict(name="constant", warmup_steps=0,
                                        wait_steps=0, decay_steps=0)))
  c.ema_decay = 0.999
  c.total_steps = 6000
  c.mixmatch = ml_collections.ConfigDict(dict(
      weight=75.0, ramp_steps=1000, temperature=0.5, alpha=0.75, num_views=2,
      interleave=True))
  c.log_every_steps = 200
  c.eval_every_steps = 250    # 24 evaluations
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
