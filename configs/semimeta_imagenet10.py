r"""SemiMeta on ImageNet with 10 % of the labels, ResNet-18.

docs/algorithms.md, "SemiMeta" gives only the result (top-1 / top-5 error 44.87 / 18.88) and
no ImageNet schedule. The schedule here follows the reference code's
`run_imagenet.sh` / `train_meta_imagenet.py` (not the paper; unverified by
us): 8 GPUs × 64 = 512 labeled + 512 unlabeled images per step, SGD momentum
0.9 (no Nesterov), lr 0.1, cosine over 600 epochs of the unlabeled set with 5
warmup epochs (≈ 11k steps at ~2250 steps per epoch), weight decay 1e-4, mixup
Beta(1, 1), consistency weight 1 with no ramp. 600 epochs is about 1.35M
steps: budget for it, or shorten `total_epochs` (our suggestion, untested).

Cloud TPU pod (every worker runs the same command; see launch/):
  python -m r2d2_jax.main --config configs/semimeta_imagenet10.py \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
      --workdir /mnt/shared/r2d2/semimeta_imagenet10

Smoke variant (tiny model, a few steps; ImageNet must be prepared):
`--config configs/semimeta_imagenet10.py:runlocal`.

Weight decay on every parameter (`optimizer.decay_mask='all'`): the reference,
Sakura03/SemiMeta, builds `SGD(model.parameters(), ..., weight_decay=...)`
(`train_meta.py`, `train_meta_imagenet.py`).
"""

import ml_collections

from configs import common
from r2d2_jax.methods import semimeta


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "semimeta"
  c.model.name = "resnet18"
  # torchvision's resnet18 BatchNorm: momentum 0.1 (flax 0.9), epsilon 1e-5,
  # which are this ResNet's defaults.
  c.model.kwargs = ml_collections.ConfigDict(dict(bn_momentum=0.9))
  c.data.dataset = "imagenet2012"
  c.data.labeled_fraction = 0.1
  c.data.batch_size = 512
  c.data.uratio = 1
  c.data.eval_batch_size = 1024
  c.data.augment.weak.translate = 0   # random-resized crop in the input pipeline
  c.data.augment.weak.flip = True
  c.optimizer.update(name="sgd", lr=0.1, momentum=0.9, nesterov=False,
                     weight_decay=1e-4,
                     decay_mask="all")
  c.optimizer.schedule.update(name="cosine", warmup_steps=11_000)
  c.total_epochs = 600.0
  c.ema_decay = 0.0
  c.semimeta = semimeta.default_block()
  c.semimeta.update(mode="first_order", label_lr=1.0, mixup_alpha=1.0,
                    weight=1.0, ramp_steps=0)
  c.log_every_steps = 500
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  if arg == "runlocal":
    c.model.name = "cnn_small"
    c.data.image_size = 64
    c.data.shuffle_buffer = 100
    c.data.batch_size = 8
    c.total_epochs = 0.0
    c.total_steps = 4
    c.optimizer.schedule.warmup_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
