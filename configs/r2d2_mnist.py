r"""R2-D2 on MNIST with 100 labels (10 per class): supervised-only vs D2 vs R2-D2.

One command runs the four stages; the supervised stage is the supervised-only
baseline, the d2 stage is "D2 alone" (table initialised by prediction, no
reprediction afterwards) and the finetune stage is the full R2-D2.

The network is the 1200-600-300-150-150 MLP with BatchNorm of the
permutation-invariant MNIST literature (VAT, Ladder), and by default there is no
augmentation, so the numbers are comparable with docs/algorithms.md, "Reference results on MNIST-100"
(supervised 25.8 %, Pseudo-Label 10.5 %, VAT 1.36 %). `:translate` adds ±2 pixel
translations (no longer permutation-invariant).

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/r2d2_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/r2d2_mnist

Results for 3 seeds: `python -m benchmarks.mnist_results` (docs/results.md).
Smoke variant: `--config configs/r2d2_mnist.py:runlocal`.

Weight decay on every parameter (`optimizer.decay_mask='all'`): the reference,
DoctorKey/R2D2.pytorch, builds `torch.optim.SGD(model.parameters(), ...,
weight_decay=...)` in every stage (`src/semi_supervised/*.py`). The finetune
stage trains on labels repredicted by the R2 network (`r2d2.finetune_labels=
'repredict'`, `finetune_all_by_pseudo_label.py`).
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.augment.weak.translate = 0
  c.data.eval_batch_size = 1000
  c.optimizer.update(name="sgd", momentum=0.9, nesterov=True,
                     weight_decay=2e-4,
                     decay_mask="all")
  c.ema_decay = 0.999
  c.log_every_steps = 500
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2000
  d2_epochs, r2_epochs = 10.0, 16.0
  common.r2d2_stages(
      c,
      # About 25 evaluations per stage (test 10000 + val 1000 images each),
      # for the median of the last 20 and the best validation step.
      supervised=dict(total_steps=2000, eval_every_steps=80,
                      data=dict(batch_size=32, uratio=0),
                      optimizer=dict(lr=0.03, schedule=dict(name="cosine"))),
      d2=dict(total_epochs=d2_epochs, eval_every_steps=250,
              data=dict(batch_size=32, uratio=3),
              optimizer=dict(lr=0.03, schedule=dict(name="constant")),
              r2d2=dict(repredict_epochs=(0.0,))),
      r2=dict(total_epochs=r2_epochs, eval_every_steps=400,
              data=dict(batch_size=32, uratio=3),
              optimizer=dict(lr=0.03, schedule=dict(
                  name="piecewise", boundary_fractions=(0.25, 0.5, 0.75),
                  scales=(2 / 3, 1 / 2, 1 / 10))),
              r2d2=dict(repredict_epochs=tuple(
                  r2_epochs / 4 * k for k in range(4)))),
      finetune=dict(total_epochs=3.0, eval_every_steps=60,
                    data=dict(batch_size=32, uratio=4),
                    optimizer=dict(lr=0.01, schedule=dict(name="cosine"))))
  if arg == "translate":
    c.data.augment.weak.translate = 2
  elif arg == "runlocal":
    common.runlocal_stages(c, model="mlp_mnist")
  elif arg:
    raise ValueError(
        f"Unknown variant {arg!r}; use 'translate', 'runlocal' or nothing.")
  return c
