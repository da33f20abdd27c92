r"""Mean Teacher on MNIST with 100 labels (10 per class), the MNIST MLP.

The method's settings are the reference's (docs/algorithms.md, "Mean Teacher":
EMA teacher in train mode on a second view, MSE between softmaxes on every
image, sigmoid ramp-up, EMA decay 0.99 during the ramp-up and 0.999 after, the
teacher evaluated as `ema`). The MNIST protocol is the shared one
(`common.mnist_data`: translate 2 px, no flips, 1000 validation images) and the
network the 1200-600-300-150-150 BatchNorm MLP of the MNIST configs
(`mlp_mnist`; no dropout: the noise is the translations and the batch's
BatchNorm statistics), so it compares with configs/fixmatch_mnist.py and
configs/semimeta_mnist.py. 32 labeled + 96 unlabeled images per step, SGD
Nesterov with a cosine schedule, 6000 steps, the weight 30 ramped over 1500
steps are our choices, not tuned on MNIST.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/mean_teacher_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/mean_teacher_mnist

The supervised baseline on the same split: `--config.method=supervised`.
Smoke variant: `--config configs/mean_teacher_mnist.py:runlocal`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mean_teacher"
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 32
  c.data.uratio = 3
  c.data.eval_batch_size = 1000
  c.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                     weight_decay=1e-4, decay_mask="all")
  c.optimizer.schedule.update(name="cosine", warmup_steps=0)
  c.ema_decay = 0.999         # after the ramp-up (the paper; TF default)
  c.mean_teacher = ml_collections.ConfigDict(dict(
      weight=30.0, ramp_steps=1500, ema_decay_rampup=0.99, ema_warmup=False,
      consistency_on_labeled=True))
  c.total_steps = 6000
  c.log_every_steps = 200
  c.eval_every_steps = 250    # 24 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 6
    c.mean_teacher.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
