r"""Supervised-only baseline on MNIST with 100 labels (10 per class).

Online (tensorflow_datasets downloads MNIST):
  python -m r2d2_jax.main --config configs/supervised_mnist.py \
      --workdir /tmp/r2d2_jax/supervised_mnist

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/supervised_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/supervised_mnist

Smoke variant: `--config configs/supervised_mnist.py:runlocal`.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "supervised"
  c.model.name = "cnn_small"
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 64
  c.data.eval_batch_size = 1000
  c.optimizer.lr = 0.03
  c.total_steps = 3000
  c.log_every_steps = 200
  c.eval_every_steps = 125    # 24 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 10
    c.log_every_steps = 5
    c.checkpoint_every_steps = 5
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
