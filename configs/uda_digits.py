r"""UDA on scikit-learn's embedded digits, 50 labels (5 per class).

One stage of 2000 steps, a few minutes on a 2-core CPU. The loss is UDA's
(docs/algorithms.md, "UDA"): labeled CE with label smoothing, plus the
confidence-masked CE of the sharpened weak-view prediction on the strong view,
its weight ramped in; the same UDA settings as the teacher of
configs/mpl_digits.py (λ = 2 ramped over 300 steps, τ = 0.7, threshold 0.6
on the unsharpened softmax — the UDA paper's code — RandAugment of the MPL
code at M = 10 with a 2-px cutout), so that UDA alone is the MPL teacher
without the meta signal. Network, split, batch (16 labeled + 48 unlabeled),
optimizer and 2000 steps as the other digits configs (our choices).

  python -m r2d2_jax.main --config configs/uda_digits.py \
      --workdir /tmp/r2d2_jax/uda_digits

Smoke variant: `--config configs/uda_digits.py:runlocal`.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "uda"
  common.digits_setup(c)
  c.data.augment.strong.update(policy="mpl", num_ops=2, magnitude=10,
                               cutout=2)
  c.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="no_bn")
  c.optimizer.schedule.update(name="cosine", wait_steps=0, warmup_steps=100,
                              decay_steps=0)
  c.ema_decay = 0.99
  c.total_steps = 2000
  c.uda = common.uda_block(weight=2.0, ramp_steps=300, temperature=0.7,
                           threshold=0.6, label_smoothing=0.1,
                           mask_on="unsharpened")
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 6
    c.optimizer.schedule.warmup_steps = 1
    c.uda.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
