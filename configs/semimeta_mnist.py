r"""SemiMeta on MNIST with 100 labels (10 per class), a modest CPU schedule.

The 1200-600-300-150-150 MLP with BatchNorm of the permutation-invariant MNIST
literature and no augmentation, so the result is comparable with ALGORITHMS.md
§5. The method's hyper-parameters are the CIFAR-10 reference's (mixup Beta(1, 1),
consistency weight 1, reference label step); the schedule is ours and short
(64 + 64 images per step, 6000 steps, lr 0.05 with 500 warmup steps then
cosine): it has not been tuned.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/semimeta_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/semimeta_mnist

Smoke variant: `--config configs/semimeta_mnist.py:runlocal`.
"""

from configs import common
from r2d2_jax.methods import semimeta


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "semimeta"
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.augment.weak.translate = 0
  c.data.batch_size = 64
  c.data.uratio = 1
  c.data.eval_batch_size = 1000
  c.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=False,
                     weight_decay=1e-4)
  c.optimizer.schedule.update(name="cosine", warmup_steps=500)
  c.total_steps = 6000
  c.semimeta = semimeta.default_block()
  c.semimeta.update(mode="first_order", label_lr=1.0, mixup_alpha=1.0,
                    weight=1.0, ramp_steps=500)
  c.log_every_steps = 200
  c.eval_every_steps = 1000
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 6
    c.optimizer.schedule.warmup_steps = 2
    c.semimeta.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
