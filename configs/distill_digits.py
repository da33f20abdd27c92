r"""DeiT-style distillation on scikit-learn's embedded digits, 50 labels (5 per class).

Two stages in one command (docs/algorithms.md, "DeiT-style distillation"):

  teacher   cnn_small trained on the 50 labels alone (the supervised stage of
            configs/r2d2_digits.py: 1500 steps, 32 labels per step)
  distill   a small ViT student (`vit_digits`: patch 2, width 64, depth 4, 4
            heads; `vit_digits_distilled` for kind 'token') trained from
            scratch on the labels and on the frozen teacher's targets, on the
            labeled batch and on the unlabeled one (16 labeled + 48 unlabeled
            images per step: the teacher sees the weak view, the student the
            strong one); 2000 steps, AdamW (DeiT's optimizer: lr 1e-3 here,
            weight decay 0.05, not on norms and biases), cosine with 100
            warm-up steps

The distillation kind is the config argument: 'soft' (τ = 3, α = 0.1),
'hard' (default; α = ½) or 'token' (the distillation token's head learns
from the teacher's hard labels, the class head from the labels; evaluated on
the mean of the two heads' softmaxes, and each head alone as raw_cls /
raw_dist / ema_cls / ema_dist):

  python -m r2d2_jax.main --config configs/distill_digits.py:token \
      --workdir /tmp/r2d2_jax/distill_digits_token

The teacher stage of every kind is the same: `--config.run_stages=distill`
reuses a finished one only within the same workdir. The student without a
teacher: `--config.stages.distill.distill.alpha=0` (CE on the labels alone).
Smoke variant (a few steps per stage): `--config
configs/distill_digits.py:runlocal` (or `token,runlocal`).
"""

import ml_collections

from configs import common

KINDS = ("soft", "hard", "token")


def get_config(arg: str | None = None):
  parts = [p for p in (arg or "").split(",") if p]
  unknown = set(parts) - {"runlocal", *KINDS}
  kinds = [p for p in parts if p in KINDS]
  if unknown or len(kinds) > 1:
    raise ValueError(f"Unknown variant {arg!r}; use one of {KINDS} and/or "
                     "'runlocal', comma-separated, or nothing ('hard').")
  kind = kinds[0] if kinds else "hard"

  c = common.base_config()
  common.digits_setup(c)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=2e-4, decay_mask="all")
  c.ema_decay = 0.99
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  c.data.augment.strong.update(policy="fixmatch", num_ops=2, magnitude=4,
                               cutout=4)
  c.stage_order = ("teacher", "distill")
  c.run_stages = ""
  student = "vit_digits_distilled" if kind == "token" else "vit_digits"
  c.stages = ml_collections.ConfigDict({
      "teacher": dict(
          method="supervised", total_steps=1500, eval_every_steps=50,
          data=dict(batch_size=32, uratio=0),
          optimizer=dict(lr=0.03, schedule=dict(name="cosine",
                                                decay_steps=1750))),
      "distill": dict(
          method="distill", total_steps=2000, eval_every_steps=80,
          model=dict(name=student),
          optimizer=dict(name="adamw", lr=1e-3, weight_decay=0.05,
                         decay_mask="no_bn_bias",
                         schedule=dict(name="cosine", warmup_steps=100)),
          distill=dict(kind=kind, tau=3.0,
                       alpha=0.1 if kind == "soft" else 0.5,
                       teacher_model="cnn_small")),
  })
  if "runlocal" in parts:
    c.stages.teacher.total_steps = 10
    c.stages.distill.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.stages.teacher.eval_every_steps = 0
    c.stages.distill.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  return c
