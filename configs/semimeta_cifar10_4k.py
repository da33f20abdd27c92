r"""SemiMeta on CIFAR-10 with 4000 labels, ConvLarge (CNN-13): the paper's setting.

docs/algorithms.md, "SemiMeta": 128 labeled + 128 unlabeled images per step, SGD momentum 0.9
without Nesterov, lr 0.1 with 4000 linear warmup steps, ×0.1 at steps 300k and
350k, 400k steps, weight decay 1e-4, unlabeled (consistency) weight 1 ramped
linearly over 4000 steps, mixup Beta(1, 1) with a per-sample λ (as drawn, no
max(λ, 1 − λ)). The label step is the reference's: inner lr = the current lr,
`label_lr = 1` (see `r2d2_jax/methods/semimeta.py`). Reported error: 7.78 %
(the raw network, `accuracy/test/raw`; the EMA is logged beside it as a diagnostic).

The reference code's (Sakura03/SemiMeta) details: standard augmentation =
`RandomCrop(32, padding=4)` + horizontal flip (`dataloader.py`), i.e. a random
translation by up to 4 pixels with a black (0) border (`pad_mode='constant'`,
`pad_fill=0`); ConvLarge with `nn.Dropout2d()` after each max-pool
(`channel_dropout=True`) and PyTorch's BatchNorm defaults, momentum 0.1 =
flax `bn_momentum=0.9`, epsilon 1e-5 (`model.py`); weight decay on every
parameter (`optimizer.decay_mask='all'`: `SGD(model.parameters(), ...)` in
`train_meta.py`).

Our choices, not stated in the paper: the label gradient by the
first-order jvp (the reference's finite difference without its ε error). The
meta forwards use BatchNorm in eval mode, as the reference code does
(`semimeta.meta_bn = 'eval'`, the default).

  python -m r2d2_jax.main --config configs/semimeta_cifar10_4k.py \
      --workdir /mnt/shared/r2d2/semimeta_cifar10_4k

Smoke variant (CIFAR-10 must be available to tfds):
`--config configs/semimeta_cifar10_4k.py:runlocal`.
"""

import ml_collections

from configs import common
from r2d2_jax.methods import semimeta


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "semimeta"
  c.model.name = "cnn13"
  c.model.kwargs = ml_collections.ConfigDict(dict(
      bn_momentum=0.9, bn_epsilon=1e-5, channel_dropout=True))
  c.data.dataset = "cifar10"
  c.data.num_labels = 4000
  c.data.batch_size = 128
  c.data.uratio = 1
  c.data.eval_batch_size = 1000
  c.data.augment.weak.translate = 4
  c.data.augment.weak.flip = True
  c.data.augment.weak.pad_mode = "constant"
  c.data.augment.weak.pad_fill = 0.0
  c.optimizer.update(name="sgd", lr=0.1, momentum=0.9, nesterov=False,
                     weight_decay=1e-4, decay_mask="all")
  c.optimizer.schedule.update(name="piecewise", warmup_steps=4000)
  c.optimizer.schedule.boundaries = (300_000, 350_000)
  c.optimizer.schedule.scales = (0.1, 0.1)
  c.total_steps = 400_000
  c.semimeta = semimeta.default_block()
  c.semimeta.update(mode="first_order", label_lr=1.0, mixup_alpha=1.0,
                    weight=1.0, ramp_steps=4000)
  c.log_every_steps = 200
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  if arg == "runlocal":
    c.model.name = "cnn_small"
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.batch_size = 8
    c.total_steps = 4
    c.optimizer.schedule.update(warmup_steps=2)
    c.optimizer.schedule.boundaries = (3, 4)
    c.semimeta.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
