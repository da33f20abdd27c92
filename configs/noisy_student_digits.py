r"""Noisy Student on scikit-learn's embedded digits, 50 labels (5 per class).

A teacher and two rounds in one command (docs/algorithms.md, "Noisy Student"):

  teacher  cnn_small on the 50 labels alone, noised as the paper's teacher
           (RandAugment: the strong view, `config.supervised.view='strong'`;
           dropout 0.25); 1500 steps of 32 labeled images
  round1   a student of the same size (cnn_small, dropout 0.5 before the
           classifier as the paper's students), from scratch, trained with
           noise (RandAugment on labeled and unlabeled images, dropout) on
           16 labeled + 48 pseudo-labeled images per step (3 : 1, the paper's
           ratio) for 2000 steps; the pseudo-labels are the unnoised teacher's
           soft predictions (temperature 1) on the whole unlabeled pool, kept
           where the teacher's confidence is ≥ 0.3 and balanced to an equal
           count per class (duplicating the rarer classes, keeping the most
           confident of the commoner), as the paper does on ImageNet
  round2   round1's student is the teacher; the student is larger (cnn_small
           with widths 48-96-192: 2.2x the parameters), otherwise as round1

Our choices at this scale: the RandAugment of configs/fixmatch_digits.py
(2 ops, magnitude 4, then a 4 px cutout; the paper's M = 27 is for 224 px
images), SGD Nesterov 0.9 with weight decay 5e-4 on the kernels, cosine decay
from lr 0.03, EMA 0.99 (evaluated: raw and EMA; the next round's teacher is
the EMA network).

  python -m r2d2_jax.main --config configs/noisy_student_digits.py \
      --workdir /tmp/r2d2_jax/noisy_student_digits

Variants (comma-separated): 'hard' (hard pseudo-labels), 'nofilter' (no
confidence filter and no balancing: every pool row once), 'runlocal' (a few
steps per stage and no confidence filter: a smoke run).
"""

import ml_collections

from configs import common

VARIANTS = ("hard", "nofilter", "runlocal")
ROUND2_WIDTHS = (48, 96, 192)


def round_block(targets: str = "soft", **overrides) -> dict:
  """The paper's round: soft targets, filter 0.3, balanced classes."""
  block = dict(targets=targets, temperature=1.0, threshold=0.3, balance=True,
               per_class=0, upsample=True, unlabeled_weight=None,
               student_init="scratch", student_at_least_teacher=True,
               teacher_model="cnn_small", teacher_kwargs={},
               teacher_weights="ema")
  block.update(overrides)
  return block


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  unknown = set(parts) - set(VARIANTS)
  if unknown:
    raise ValueError(f"Unknown variant {sorted(unknown)}; use any of "
                     f"{VARIANTS}, comma-separated, or nothing.")
  targets = "hard" if "hard" in parts else "soft"
  filt = ({} if "nofilter" not in parts else
          dict(threshold=0.0, balance=False))

  c = common.base_config()
  common.digits_setup(c)
  c.data.augment.strong.update(policy="fixmatch", num_ops=2, magnitude=4,
                               cutout=4)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="kernels")
  c.ema_decay = 0.99
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.stage_order = ("teacher", "round1", "round2")
  c.run_stages = ""
  student = lambda **kw: dict(name="cnn_small",
                              kwargs=dict(dropout_rate=0.5, **kw))
  c.stages = ml_collections.ConfigDict({
      "teacher": dict(
          method="supervised", total_steps=1500, eval_every_steps=60,
          supervised=dict(view="strong"),
          data=dict(batch_size=32, uratio=0),
          optimizer=dict(schedule=dict(name="cosine", decay_steps=0))),
      "round1": dict(
          method="noisy_student", total_steps=2000, eval_every_steps=80,
          model=student(),
          optimizer=dict(schedule=dict(name="cosine", decay_steps=0)),
          noisy_student=round_block(targets, **filt)),
      "round2": dict(
          method="noisy_student", total_steps=2000, eval_every_steps=80,
          model=student(widths=ROUND2_WIDTHS),
          optimizer=dict(schedule=dict(name="cosine", decay_steps=0)),
          noisy_student=round_block(targets, **filt)),
  })
  if "runlocal" in parts:
    for s in c.stage_order:
      c.stages[s].total_steps = 6
      c.stages[s].eval_every_steps = 0
    for s in ("round1", "round2"):
      # A 6-step teacher is not confident enough for the 0.3 filter.
      c.stages[s].noisy_student.threshold = 0.0
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  return c
