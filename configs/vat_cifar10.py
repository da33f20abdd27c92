r"""VAT + EntMin on CIFAR-10 with 4000 labels, ConvLarge: takerum/vat_tf's setting.

docs/algorithms.md, "VAT". The README command of takerum/vat_tf for CIFAR-10
with augmentation + entropy minimisation (its author: "the hyperparameters in
the README are the exact hyperparameters for reproducing the results in the
paper", vat_tf issue #3; VAT+EntMin 10.55 % in the paper):
`--num_epochs=500 --epoch_decay_start=460 --aug_flip=True --aug_trans=True
--epsilon=8.0 --method=vatent`, with `train_semisup.py`'s defaults: 32
labeled + 128 unlabeled images per step, 400 steps an "epoch" (200k steps),
Adam lr 0.001 (β1 0.9, then 0.5 from the first decay epoch on: `mom1`,
`mom2`), the lr decayed linearly to 0 over the last 40 epochs
(per epoch: lr · (500 − ep) / 40), `vat.py`'s ξ = 1e-6 and one power
iteration, VAT and entropy weights 1, no weight decay, no EMA (the raw network
is evaluated). `cnn.py`'s ConvLarge: 3×conv128, max-pool, dropout 0.5, 3×conv256,
max-pool, dropout 0.5, conv512 (valid), conv256 1×1, conv128 1×1, global
average pool, dense; BatchNorm after every convolution (`layers.py`: decay
0.99, ε 1e-6) and LeakyReLU 0.1; no BatchNorm on the logits (`top_bn` is off
for CIFAR-10). The unlabeled pool is the whole train split
(`unlabeled_train.tfrecords` holds all 50 000 images): `data.unlabeled='all'`.
Augmentation: translate by 2 (zero padding = the mean of the whitened images:
gray here) and horizontal flips (`dataset_utils.transform`).

Differences from vat_tf (also in docs/algorithms.md):
- inputs: per-channel standardised, not ZCA-whitened ((x − 127.5)/255, then
  ZCA); ε = 8 is vat_tf's value in ZCA units, kept as the reference's number:
  in these units it is a different size, to be chosen again on the validation
  split (`data.num_val`) before comparing;
- Adam's bias correction with β1 = 0.5 reads 1 − 0.5^t (TF's: 1 − 0.9^k·0.5^j,
  the product of the β1s fed): both are 1 in float32 at the switch (step
  184 000);
- initialisation: He-normal fan-out convolutions and flax's default dense init
  (vat_tf: He fan-in truncated normal everywhere);
- the BatchNorm running variance is the biased batch variance (vat_tf
  multiplies it by n/(n − 1));
- the validation split: 5000 train images here (`num_val`); vat_tf trains on
  all 50 000 and reports the final test error.

  python -m r2d2_jax.main --config configs/vat_cifar10.py \
      --workdir /mnt/shared/r2d2/vat_cifar10

Smoke variant (CIFAR-10 must be available to tfds):
`--config configs/vat_cifar10.py:runlocal`.
"""

import ml_collections

from configs import common


def linear_decay(c: ml_collections.ConfigDict, *, epochs: int,
                 decay_start_epoch: int, steps_per_epoch: int) -> None:
  """vat_tf's lr schedule: constant, then per epoch lr · (E − ep) / (E − E0).

  Written as a piecewise schedule: at the first step of each epoch ep > E0 the
  lr is multiplied by (E − ep) / (E − ep + 1). Sets `c.total_steps`.
  """
  eps = range(decay_start_epoch + 1, epochs)
  c.optimizer.schedule = ml_collections.ConfigDict(dict(
      name="piecewise", warmup_steps=0, wait_steps=0, decay_steps=0,
      boundaries=tuple(ep * steps_per_epoch for ep in eps),
      scales=tuple((epochs - ep) / (epochs - ep + 1) for ep in eps)))
  c.total_steps = epochs * steps_per_epoch


def decay_b1(c: ml_collections.ConfigDict, *, decay_start_epoch: int,
             steps_per_epoch: int, b1: float = 0.5) -> None:
  """vat_tf's momentum switch: Adam's β1 = `b1` (`mom2`) from the first decay epoch."""
  c.optimizer.b1_schedule = ml_collections.ConfigDict(dict(
      boundaries=(decay_start_epoch * steps_per_epoch,), values=(b1,)))


def adam(c: ml_collections.ConfigDict, lr: float) -> None:
  """vat_tf's optimizer: Adam (β1 0.9, β2 0.999), no weight decay or clipping."""
  c.optimizer.update(name="adam", lr=lr, weight_decay=0.0, grad_clip_norm=0.0)
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999


def vat_block(epsilon: float, *, xi: float = 1e-6, num_iters: int = 1,
              weight: float = 1.0, entmin_weight: float = 0.0,
              ramp_steps: int = 0) -> ml_collections.ConfigDict:
  """The `config.vat` block (r2d2_jax/methods/vat.py); vat_tf's defaults."""
  return ml_collections.ConfigDict(dict(
      epsilon=epsilon, xi=xi, num_iters=num_iters, weight=weight,
      entmin_weight=entmin_weight, ramp_steps=ramp_steps))


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "vat"
  c.model.name = "cnn13"
  c.model.kwargs = ml_collections.ConfigDict(dict(
      dropout_rate=0.5, bn_momentum=0.99, bn_epsilon=1e-6,
      channel_dropout=False))
  c.data.dataset = "cifar10"
  c.data.num_labels = 4000
  c.data.num_val = 5000
  c.data.unlabeled = "all"
  c.data.batch_size = 32
  c.data.uratio = 4
  c.data.eval_batch_size = 1000
  c.data.augment.weak.update(translate=2, flip=True, pad_mode="constant",
                             pad_fill=128.0)
  adam(c, lr=1e-3)
  linear_decay(c, epochs=500, decay_start_epoch=460, steps_per_epoch=400)
  decay_b1(c, decay_start_epoch=460, steps_per_epoch=400)
  c.ema_decay = 0.0           # vat_tf evaluates the raw weights
  c.vat = vat_block(epsilon=8.0, entmin_weight=1.0)
  c.log_every_steps = 400
  c.eval_every_steps = 4000   # every 10 epochs (vat_tf: every 5, test only)
  c.checkpoint_every_steps = 4000
  if arg == "runlocal":
    c.model.name = "cnn_small"
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.batch_size = 8
    c.data.num_val = 100
    linear_decay(c, epochs=4, decay_start_epoch=2, steps_per_epoch=1)
    decay_b1(c, decay_start_epoch=2, steps_per_epoch=1)
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
