r"""Π-model on scikit-learn's embedded digits, 50 labels (5 per class).

One stage, a few minutes on a 2-core CPU. The method is the reference's
(docs/algorithms.md, "Π-model and Temporal Ensembling"; s-laine/tempens): two
stochastic passes of two independently augmented views, MSE between their
softmaxes with the gradient through both, on every image of the batch, the
weight ramped in by exp(−5(1 − t/T)²). The network, batch, optimizer and step
count are those of configs/mean_teacher_digits.py (our choices for digits),
as are the weight 30 and its 500-step ramp (not tuned). Supervised-only on
the same split: `--config.method=supervised`.

  python -m r2d2_jax.main --config configs/pi_model_digits.py \
      --workdir /tmp/r2d2_jax/pi_model_digits

Smoke variant: `--config configs/pi_model_digits.py:runlocal`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "pi_model"
  common.digits_setup(c)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=2e-4, decay_mask="all")
  c.optimizer.schedule.update(name="cosine", warmup_steps=0)
  c.ema_decay = 0.99
  c.total_steps = 2000
  c.pi_model = ml_collections.ConfigDict(dict(weight=30.0, ramp_steps=500))
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 6
    c.pi_model.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
