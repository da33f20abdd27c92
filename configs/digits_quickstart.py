r"""Quick start: supervised training on scikit-learn's embedded digits.

1797 real 8x8 handwritten digits ship with scikit-learn, so this runs anywhere
with no download. 50 labels (5 per class) are used; the rest of the train split
is the unlabeled pool of the semi-supervised methods. Test accuracy is printed
at the end.

  python -m r2d2_jax.main --config configs/digits_quickstart.py \
      --workdir /tmp/r2d2_jax/digits_quickstart

Smoke variant (a few steps): `--config configs/digits_quickstart.py:runlocal`.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "supervised"
  c.model.name = "cnn_small"
  c.data.dataset = "digits"
  c.data.num_labels = 50
  c.data.batch_size = 32
  c.data.eval_batch_size = 360
  c.data.augment.weak.translate = 1
  c.optimizer.lr = 0.03
  c.optimizer.weight_decay = 5e-4
  c.ema_decay = 0.99
  c.total_steps = 1500
  c.log_every_steps = 100
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  if arg == "runlocal":
    c.total_steps = 20
    c.log_every_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
