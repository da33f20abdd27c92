r"""UDA on MNIST with 100 labels (10 per class), the MNIST MLP.

One stage of 6000 steps. The loss is UDA's (docs/algorithms.md, "UDA"):
labeled CE with label smoothing, plus the confidence-masked CE of the
sharpened weak-view prediction on the strong view, its weight ramped in. The
settings are the teacher's of configs/mpl_mnist.py, so that UDA alone is the
MPL teacher without the meta signal (as configs/uda_digits.py on digits):
λ = 4 ramped over 1000 steps, τ = 0.7, threshold 0.6, label smoothing 0.1,
the MPL code's RandAugment (2 ops, M = 10) then cutout 8; SGD Nesterov 0.9,
lr 0.05 with a 300-step warmup then cosine, weight decay 5e-4 on all but
BatchNorm, EMA 0.995; the MNIST protocol and network of the other MNIST
configs (`common.mnist_data`: translate 2 px, no flips, 1000 validation
images; `mlp_mnist`), 32 labeled + 96 unlabeled images per step. One
difference from the MPL teacher, deliberately: the confidence mask
thresholds the unsharpened softmax (`mask_on='unsharpened'`, the UDA paper's
own code, google-research/uda `image/main.py`), as configs/uda_digits.py;
the MPL code's choice is `--config.uda.mask_on=sharpened`. The sizes, steps
and learning rates are our choices (no paper setting on MNIST).

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/uda_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/uda_mnist

Smoke variant: `--config configs/uda_mnist.py:runlocal`.
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "uda"
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 32
  c.data.uratio = 3
  c.data.eval_batch_size = 1000
  c.data.augment.strong.update(policy="mpl", num_ops=2, magnitude=10,
                               cutout=8)
  c.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="no_bn")
  c.optimizer.schedule.update(name="cosine", wait_steps=0, warmup_steps=300,
                              decay_steps=0)
  c.ema_decay = 0.995
  c.total_steps = 6000
  c.uda = common.uda_block(weight=4.0, ramp_steps=1000, temperature=0.7,
                           threshold=0.6, label_smoothing=0.1,
                           mask_on="unsharpened")
  c.log_every_steps = 200
  c.eval_every_steps = 250    # 24 evaluations
  c.checkpoint_every_steps = 2000
  if arg == "runlocal":
    c.total_steps = 6
    c.optimizer.schedule.warmup_steps = 1
    c.uda.ramp_steps = 2
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
