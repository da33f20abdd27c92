r"""The MNIST 2D-FC illustration of R2-D2: LeNet with a 2-unit feature layer.

Each test image's feature is a point in the plane; notebooks/mnist_2dfc.ipynb
plots them, coloured by class, after supervised-only (stage `supervised`), D2
(stage `d2`) and R2-D2 (stage `finetune`) training, with the pseudo-label
accuracy and entropy curves and the reprediction events.

  python -m r2d2_jax.main --config configs/r2d2_mnist_2dfc.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/r2d2_mnist_2dfc

Variants: `:fast` (about 200 steps, a minute or two on a 2-core CPU, for the
notebook's FAST mode and its test), `:runlocal` (a few steps).

Weight decay on every parameter (`optimizer.decay_mask='all'`): the reference,
DoctorKey/R2D2.pytorch, builds `torch.optim.SGD(model.parameters(), ...,
weight_decay=...)` in every stage (`src/semi_supervised/*.py`). The finetune
stage trains on labels repredicted by the R2 network (`r2d2.finetune_labels=
'repredict'`, `finetune_all_by_pseudo_label.py`).
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.model.name = "lenet_2d"
  common.mnist_data(c, num_labels=100)
  c.data.eval_batch_size = 1000
  # No BatchNorm and a 2-unit bottleneck: a small lr and clipping keep the
  # first steps from diverging (lr 0.02 unclipped gives NaN within 5 steps).
  c.optimizer.update(name="sgd", momentum=0.9, nesterov=True,
                     weight_decay=5e-4, grad_clip_norm=5.0,
                     decay_mask="all")
  c.ema_decay = 0.0
  c.log_every_steps = 100
  c.checkpoint_every_steps = 1000
  r2_epochs = 4.0
  common.r2d2_stages(
      c,
      supervised=dict(total_steps=1500, data=dict(batch_size=32, uratio=0),
                      optimizer=dict(lr=0.01, schedule=dict(name="cosine"))),
      d2=dict(total_epochs=2.0, data=dict(batch_size=32, uratio=3),
              optimizer=dict(lr=0.01, schedule=dict(name="constant")),
              r2d2=dict(repredict_epochs=(0.0,))),
      r2=dict(total_epochs=r2_epochs, data=dict(batch_size=32, uratio=3),
              optimizer=dict(lr=0.01, schedule=dict(
                  name="piecewise", boundary_fractions=(0.25, 0.5, 0.75),
                  scales=(2 / 3, 1 / 2, 1 / 10))),
              r2d2=dict(repredict_epochs=tuple(
                  r2_epochs / 4 * k for k in range(4)))),
      finetune=dict(total_epochs=1.0, data=dict(batch_size=32, uratio=4),
                    optimizer=dict(lr=0.005, schedule=dict(name="cosine"))))
  if arg == "fast":
    # Same pipeline, about 200 steps in all, on the first 3000 training and
    # 2000 test images (1000 of the 3000 are the validation set; an epoch of
    # the unlabeled 1900 is 20 steps, so R2 repredicts at steps 0, 10, 20).
    c.data.train_limit = 3000
    c.data.test_limit = 2000
    c.stages.supervised.total_steps = 100
    c.stages.d2.total_epochs = 0.0
    c.stages.d2.total_steps = 30
    c.stages.r2.total_epochs = 0.0
    c.stages.r2.total_steps = 40
    c.stages.r2.r2d2.repredict_epochs = (0.0, 0.5, 1.0)
    c.stages.finetune.total_epochs = 0.0
    c.stages.finetune.total_steps = 25
    c.log_every_steps = 20
    c.checkpoint_every_steps = 0
  elif arg == "runlocal":
    common.runlocal_stages(c, model="lenet_2d")
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'fast', 'runlocal' or "
                     "nothing.")
  return c
