r"""UDA alone on CIFAR-10 with 4000 labels, WRN-28-2: the MPL teacher's settings.

docs/algorithms.md, "UDA" (the MPL teacher's auxiliary loss, used alone)
with §2's CIFAR-10 teacher: WRN-28-2 with dense dropout 0.2, 300k steps,
B = 128, μ = 7, strong view RandAugment(2, 16) + cutout 16, labeled CE with
label smoothing 0.15, UDA weight 8 ramped over 5000 steps, τ = 0.7,
threshold 0.6; lr 0.05 (5000 warmup, cosine), Nesterov 0.9, wd 5e-4, EMA 0.995.

  python -m r2d2_jax.main --config configs/uda_cifar10_4k.py \
      --workdir /mnt/shared/r2d2/uda_cifar10_4k

Smoke variant (CIFAR-10 must be available to tfds):
`--config configs/uda_cifar10_4k.py:runlocal`.

The settings are those of the Meta Pseudo Labels repository's UDA baseline
(google-research/google-research `meta_pseudo_labels/training_utils.py`, class
`UDA`), whose README command gives τ = 0.7, threshold 0.6, weight 8: so are its
details. The confidence mask reads the temperature-sharpened softmax
(`uda.mask_on='sharpened'`: `build_uda_cross_entropy` thresholds
`softmax(logits / uda_temp)`; the UDA paper's own code, google-research/uda
`image/main.py`, thresholds the unsharpened softmax: `--config.uda.mask_on=
unsharpened`). Weight decay on all but BatchNorm (`optimizer.decay_mask=
'no_bn'`, `common_utils.get_l2_loss`) and WRN BatchNorm decay 0.99 (the
`batch_norm_decay` flag default), both set by `common.cifar10_4k_mpl_setup`.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "uda"
  common.cifar10_4k_mpl_setup(c)
  c.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, grad_clip_norm=0.0)
  c.optimizer.schedule.update(name="cosine", wait_steps=0, warmup_steps=5000,
                              decay_steps=0)
  c.ema_decay = 0.995
  c.total_steps = 300_000
  c.log_every_steps = 200
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  c.uda = common.uda_block(weight=8.0, ramp_steps=5000, temperature=0.7,
                           threshold=0.6, label_smoothing=0.15,
                           mask_on="sharpened")
  if arg == "runlocal":
    c.model.name = "cnn_small"
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.batch_size = 8
    c.total_steps = 4
    c.optimizer.schedule.warmup_steps = 1
    c.uda.ramp_steps = 2
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
