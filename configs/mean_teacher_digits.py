r"""Mean Teacher on scikit-learn's embedded digits, 50 labels (5 per class).

One stage, a few minutes on a 2-core CPU. The method is the reference's
(docs/algorithms.md, "Mean Teacher"; CuriousAI/mean-teacher): an EMA teacher in
train mode on a second, independently augmented view, MSE between the
softmaxes on every image of the batch (labeled ones too), the weight ramped in
by exp(−5(1 − t/T)²), the EMA decay 0.99 during the ramp-up and 0.999 after
(the paper's and the TF code's defaults), the teacher evaluated as `ema`. The
network (cnn_small: its dropout and the translations are the noise), the
batch (16 labeled + 48 unlabeled), SGD-Nesterov with a cosine schedule (the
pytorch reference's optimizer) and the step count are scaled to digits and
are our choices, as are the weight 30 and its 500-step ramp (not tuned).

  python -m r2d2_jax.main --config configs/mean_teacher_digits.py \
      --workdir /tmp/r2d2_jax/mean_teacher_digits

Supervised-only on the same split, optimizer and steps:
`--config.method=supervised`. Smoke variant:
`--config configs/mean_teacher_digits.py:runlocal`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mean_teacher"
  common.digits_setup(c)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=2e-4, decay_mask="all")
  c.optimizer.schedule.update(name="cosine", warmup_steps=0)
  c.ema_decay = 0.999         # after the ramp-up
  c.total_steps = 2000
  c.mean_teacher = ml_collections.ConfigDict(dict(
      weight=30.0, ramp_steps=500, ema_decay_rampup=0.99, ema_warmup=False,
      consistency_on_labeled=True))
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
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
