r"""Meta Pseudo Labels on ImageNet with 10 % of the labels, ResNet-50.

docs/algorithms.md, "Meta Pseudo Labels": batch 1024 labeled + μ·1024 = 15·1024 unlabeled, 700k steps;
student lr 0.4 (0 for 20k steps, then 5k warmup, cosine), teacher lr 0.6 (5k
warmup, cosine); teacher UDA weight 20 ramped over 50k steps, τ = 0.5,
threshold 0.6; label smoothing 0.1; grad-norm clip 5; EMA 0.999; wd 1e-4;
RandAugment magnitude 17. Paper: 73.89 % top-1.

Not reproduced: dropout 0.1 (this library's ResNet-50 has no dropout layer).
Our choices where the paper gives none: SGD Nesterov 0.9 for both
networks, 2 RandAugment ops and no cutout, and the finetune stage (labeled only,
batch 1024, lr 3e-5 constant, wd 0, 10k steps).

Cloud TPU pod (every worker runs the same command; see launch/):
  python -m r2d2_jax.main --config configs/mpl_imagenet10.py \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
      --workdir /mnt/shared/r2d2/mpl_imagenet10

Smoke variant (tiny model, a few steps; ImageNet must be prepared):
`--config configs/mpl_imagenet10.py:runlocal`.

Reference details: as configs/mpl_cifar10_4k.py (decay_mask 'no_bn', UDA mask
on the sharpened softmax, baseline subtracted after its update, finetune from
the EMA student without dropout; docs/algorithms.md, "Configs and their
references").
"""


import ml_collections

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mpl"
  c.model.name = "resnet50"
  # BatchNorm decay 0.99: the MPL code's `batch_norm_decay` flag default.
  c.model.kwargs = ml_collections.ConfigDict(dict(bn_momentum=0.99))
  c.data.dataset = "imagenet2012"
  c.data.labeled_fraction = 0.1
  c.data.batch_size = 1024
  c.data.uratio = 15
  c.data.eval_batch_size = 1024
  c.data.augment.weak.translate = 0  # random-resized crop in the pipeline
  c.data.augment.weak.flip = True
  # `augment.RandAugment(magnitude=17)` with its class defaults (pixels at
  # 224 px): translate_const 100, cutout_const 40; no extra cutout.
  c.data.augment.strong.update(policy="mpl", num_ops=2, magnitude=17,
                               cutout=0, translate_const=100, cutout_const=40)
  c.label_smoothing = 0.1
  # The student's optimizer.
  c.optimizer.update(name="sgd", lr=0.4, momentum=0.9, nesterov=True,
                     weight_decay=1e-4, grad_clip_norm=5.0,
                     decay_mask="no_bn")
  c.optimizer.schedule.update(name="cosine", wait_steps=20_000,
                              warmup_steps=5000, decay_steps=0)
  c.ema_decay = 0.999
  c.total_steps = 700_000
  c.log_every_steps = 500
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  common.mpl_stages(
      c, teacher_lr=0.6, teacher_warmup_steps=5000,
      uda=common.uda_block(weight=20.0, ramp_steps=50000,
                           temperature=0.5, threshold=0.6,
                           label_smoothing=0.1,
                           mask_on="sharpened"),
      finetune_steps=10000, finetune_batch=1024,
      finetune_lr=3e-05)
  if arg == "runlocal":
    common.runlocal_stages(c)
    c.data.image_size = 64
    c.data.shuffle_buffer = 100
    c.optimizer.schedule.update(wait_steps=1, warmup_steps=1)
    c.mpl.teacher_optimizer.schedule.warmup_steps = 1
    c.uda.ramp_steps = 2
    for stage in c.stages.values():
      stage.data = dict(stage.get("data", {}), batch_size=8)
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
