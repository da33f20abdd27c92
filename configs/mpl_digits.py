r"""Meta Pseudo Labels on scikit-learn's embedded digits, 50 labels (5 per class).

Two stages in one command (mpl → finetune), about a minute or two on a 2-core
CPU. The structure is the paper's CIFAR-10 recipe (docs/algorithms.md, "Meta Pseudo Labels": the
student waits, then warms up; the teacher trains on UDA + the MPL signal;
the student's EMA is evaluated; then a labeled-only finetune); the sizes and
step counts are scaled down to digits and are our choices.

  python -m r2d2_jax.main --config configs/mpl_digits.py \
      --workdir /tmp/r2d2_jax/mpl_digits

Teacher gradient: `--config.mpl.mode=first_order` (default; the paper's),
`exact` (`jax.grad` through the student's SGD step) or `official_compat`
(the released code's behaviour, comparison only). Smoke variant:
`--config configs/mpl_digits.py:runlocal`.

Reference details: as configs/mpl_cifar10_4k.py (decay_mask 'no_bn', UDA mask
on the sharpened softmax, baseline subtracted after its update, finetune from
the EMA student without dropout; docs/algorithms.md, "Configs and their
references").
"""


from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mpl"
  common.digits_setup(c)
  c.data.augment.strong.update(policy="mpl", num_ops=2, magnitude=10,
                               cutout=2)
  c.label_smoothing = 0.1
  c.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                     weight_decay=5e-4,
                     decay_mask="no_bn")
  c.optimizer.schedule.update(name="cosine", wait_steps=100, warmup_steps=100,
                              decay_steps=0)
  c.ema_decay = 0.99
  c.total_steps = 3000
  c.log_every_steps = 100
  c.eval_every_steps = 100    # 30 evaluations of the mpl stage
  c.checkpoint_every_steps = 1000
  common.mpl_stages(
      c, teacher_lr=0.05, teacher_warmup_steps=100,
      uda=common.uda_block(weight=2.0, ramp_steps=300,
                           temperature=0.7, threshold=0.6,
                           label_smoothing=0.1,
                           mask_on="sharpened"),
      finetune_steps=200, finetune_batch=50,
      finetune_lr=0.001)
  c.stages.finetune.eval_every_steps = 8  # 25 evaluations
  if arg == "runlocal":
    c.stages.mpl.total_steps = 6
    c.stages.finetune.total_steps = 4
    c.optimizer.schedule.update(wait_steps=1, warmup_steps=1)
    c.mpl.teacher_optimizer.schedule.warmup_steps = 1
    c.uda.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
