r"""R2-D2 on ImageNet with 10 % of the labels, ResNet-18, sharded pseudo-label table.

The table is 1.28M x 1000 float32 logits (about 5 GB): it is sharded along its
example axis over every device of every host (`r2d2_jax.table`), so each of N
devices holds 1/N of it. The paper reports top-1 / top-5 error 41.55 / 19.52.

the paper gives no ImageNet schedule for R2-D2. The four stages keep the
CIFAR-10 structure (supervised → D2 → R2 with four lr blocks and reprediction at
each → finetune on argmax Y), with epochs shortened for ImageNet: these are our
choices, not the paper's; expect to tune them.

Cloud TPU pod (every worker runs the same command; see launch/):
  python -m r2d2_jax.main --config configs/r2d2_imagenet10.py \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
      --workdir /mnt/shared/r2d2/r2d2_imagenet10

Smoke variant (tiny model, a few steps; ImageNet must be prepared):
`--config configs/r2d2_imagenet10.py:runlocal`.

Weight decay on every parameter (`optimizer.decay_mask='all'`): the reference,
DoctorKey/R2D2.pytorch, builds `torch.optim.SGD(model.parameters(), ...,
weight_decay=...)` in every stage (`src/semi_supervised/*.py`). The finetune
stage trains on labels repredicted by the R2 network (`r2d2.finetune_labels=
'repredict'`, `finetune_all_by_pseudo_label.py`).
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.model.name = "resnet18"
  c.data.dataset = "imagenet2012"
  c.data.labeled_fraction = 0.1
  c.data.eval_batch_size = 1024
  c.data.augment.weak.translate = 0   # random-resized crop in the input pipeline
  c.data.augment.weak.flip = True
  c.optimizer.update(name="sgd", momentum=0.9, nesterov=True,
                     weight_decay=1e-4,
                     decay_mask="all")
  c.ema_decay = 0.0
  c.log_every_steps = 500
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  common.r2d2_stages(
      c,
      supervised=dict(total_epochs=100.0, data=dict(batch_size=512, uratio=0),
                      optimizer=dict(lr=0.2, schedule=dict(
                          name="cosine", warmup_steps=1000))),
      d2=dict(total_epochs=30.0, data=dict(batch_size=128, uratio=3),
              optimizer=dict(lr=0.12, schedule=dict(name="constant")),
              r2d2=dict(repredict_epochs=(0.0,))),
      r2=dict(total_epochs=30.0, data=dict(batch_size=128, uratio=3),
              optimizer=dict(lr=0.12, schedule=dict(
                  name="piecewise", boundary_fractions=(0.25, 0.5, 0.75),
                  scales=(2 / 3, 1 / 2, 1 / 10))),
              r2d2=dict(repredict_epochs=(0.0, 7.5, 15.0, 22.5))),
      finetune=dict(total_epochs=10.0, data=dict(batch_size=128, uratio=4),
                    optimizer=dict(lr=0.01, schedule=dict(name="cosine"))))
  if arg == "runlocal":
    common.runlocal_stages(c)
    c.data.image_size = 64
    c.data.shuffle_buffer = 100
    for stage in c.stages.values():
      stage.data.batch_size = 8
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
