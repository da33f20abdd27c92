r"""Pseudo-Label (Lee 2013) on scikit-learn's embedded digits, 50 labels (5 per class).

One stage of 2000 steps, a few minutes on a 2-core CPU. The method's settings
are Lee's (docs/algorithms.md, "Pseudo-Label"): the argmax of the network's
own train-mode prediction on the (weakly augmented) unlabeled image is its
label, with weight α(t) = 0 until T1, linear to α_f = 3 at T2, 3 after, and
no confidence threshold. Lee's T1 = 100 and T2 = 600 epochs are scaled to
this run: T1 = 200 steps (10 %: the network first fits the labels) and
T2 = 800 steps (40 %, where the later codes, USB and google-research/fixmatch
`pseudo_label.py`, end their linear warm-up). The network (cnn_small, with
dropout 0.25 as Lee's dropout), the batch (16 labeled + 48 unlabeled), the
optimizer (configs/fixmatch_digits.py's, itself the FixMatch code's: the
fixmatch code's `pseudo_label.py` uses the same) and the step count are the
digits experiments' and our choices.

  python -m r2d2_jax.main --config configs/pseudo_label_digits.py \
      --workdir /tmp/r2d2_jax/pseudo_label_digits

USB's variant (weight 1 ramped from step 0 to 40 %, threshold 0.95):
`--config.pseudo_label.weight=1 --config.pseudo_label.ramp_start_steps=0
--config.pseudo_label.threshold=0.95`. The supervised baseline on the same
split: `--config configs/fixmatch_digits.py --config.method=supervised`
(the same network, optimizer, schedule and labeled batches). Smoke variant:
`--config configs/pseudo_label_digits.py:runlocal`.
"""

from configs import common
from r2d2_jax.methods import pseudo_label


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "pseudo_label"
  common.digits_setup(c)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="kernels",
                     grad_clip_norm=0.0)
  c.optimizer.schedule.update(name="fixmatch_cosine", warmup_steps=0,
                              wait_steps=0, decay_steps=0)
  c.ema_decay = 0.99
  c.total_steps = 2000
  c.pseudo_label = pseudo_label.default_block()
  c.pseudo_label.update(weight=3.0, ramp_start_steps=200, ramp_end_steps=800,
                        threshold=0.0)
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 6
    c.pseudo_label.update(ramp_start_steps=1, ramp_end_steps=3)
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
