r"""SemiMeta on scikit-learn's embedded digits, 50 labels (5 per class).

One stage, about a minute on a 2-core CPU. The method's settings are the
reference's (docs/algorithms.md, "SemiMeta": mixup Beta(1, 1), consistency weight 1 ramped
in, the label step of the reference code, meta forwards with BatchNorm in eval
mode); the network (cnn_small, whose dropout makes the training-mode
prediction differ from the pseudo-label), the batch (16 labeled + 48
unlabeled) and the step count are scaled down to digits and are our choices.

  python -m r2d2_jax.main --config configs/semimeta_digits.py \
      --workdir /tmp/r2d2_jax/semimeta_digits

Meta-gradient: `--config.semimeta.mode=first_order` (default; one jvp) or
`exact` (`jax.grad` through the inner SGD step). Smoke variant:
`--config configs/semimeta_digits.py:runlocal`.

Weight decay on every parameter (`optimizer.decay_mask='all'`): the reference,
Sakura03/SemiMeta, builds `SGD(model.parameters(), ..., weight_decay=...)`
(`train_meta.py`, `train_meta_imagenet.py`).
"""

from configs import common
from r2d2_jax.methods import semimeta


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "semimeta"
  common.digits_setup(c)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=False,
                     weight_decay=2e-4,
                     decay_mask="all")
  c.optimizer.schedule.update(name="cosine", warmup_steps=200)
  c.ema_decay = 0.99
  c.total_steps = 2000
  c.semimeta = semimeta.default_block()
  c.semimeta.update(mode="first_order", label_lr=1.0, mixup_alpha=1.0,
                    weight=1.0, ramp_steps=200, meta_bn="eval")
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
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
