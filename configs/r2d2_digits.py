r"""R2-D2 on scikit-learn's embedded digits, 50 labels (5 per class).

Four stages in one command (supervised → D2 → R2 → finetune); the supervised
stage is the supervised-only baseline on the same labels, so its result and the
finetune result side by side are the comparison.

  python -m r2d2_jax.main --config configs/r2d2_digits.py \
      --workdir /tmp/r2d2_jax/r2d2_digits

Smoke variant: `--config configs/r2d2_digits.py:runlocal`. A subset of stages:
`--config.run_stages=d2,r2`.

The epochs are scaled down from the CIFAR-10 schedule (300 + 300 + 300 + 50
epochs) so that the whole pipeline runs in about two minutes on a 2-core CPU;
the structure (lr blocks, reprediction every quarter of R2) is the paper's.

Weight decay on every parameter (`optimizer.decay_mask='all'`): the reference,
DoctorKey/R2D2.pytorch, builds `torch.optim.SGD(model.parameters(), ...,
weight_decay=...)` in every stage (`src/semi_supervised/*.py`). The finetune
stage trains on labels repredicted by the R2 network (`r2d2.finetune_labels=
'repredict'`, `finetune_all_by_pseudo_label.py`).
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  common.digits_setup(c)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=2e-4,
                     decay_mask="all")
  c.ema_decay = 0.99
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500

  d2_epochs, r2_epochs = 40.0, 40.0
  block = r2_epochs // 4
  common.r2d2_stages(
      c,
      supervised=dict(
          total_steps=1500, eval_every_steps=50,
          data=dict(batch_size=32, uratio=0),
          optimizer=dict(lr=0.03, schedule=dict(name="cosine",
                                                decay_steps=1750))),
      # Evaluations every 40 steps: 25 in each 1000-step stage, for the
      # median of the last 20 and the best validation step.
      d2=dict(total_epochs=d2_epochs, eval_every_steps=40,
              optimizer=dict(lr=0.03, schedule=dict(name="constant")),
              r2d2=dict(repredict_epochs=(0,))),
      r2=dict(total_epochs=r2_epochs, eval_every_steps=40,
              # The paper's 0.12, 0.08, 0.04, 0.004 over four equal blocks.
              optimizer=dict(lr=0.03, schedule=dict(
                  name="piecewise", boundary_fractions=(0.25, 0.5, 0.75),
                  scales=(2 / 3, 1 / 2, 1 / 10))),
              r2d2=dict(repredict_epochs=(0.0, block, 2 * block, 3 * block))),
      finetune=dict(total_epochs=10.0, eval_every_steps=8,
                    data=dict(batch_size=16, uratio=4),
                    optimizer=dict(lr=0.01, schedule=dict(name="cosine")),
                    ema_decay=0.99))
  if arg == "runlocal":
    c.stages.supervised.total_steps = 10
    c.stages.d2.total_epochs = 1.0
    c.stages.r2.total_epochs = 2.0
    c.stages.r2.r2d2.repredict_epochs = (0.0, 1.0)
    c.stages.finetune.total_epochs = 0.5
    c.log_every_steps = 5
    c.checkpoint_every_steps = 10
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
