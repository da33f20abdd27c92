r"""Pseudo-Label (Lee 2013) on MNIST with 100 labels (10 per class), the MNIST MLP.

Lee's method (docs/algorithms.md, "Pseudo-Label"): argmax labels of the
network's own train-mode prediction, α(t) = 0 until T1, linear to α_f = 3 at
T2, 3 after, no confidence threshold; Lee's T1 = 100 and T2 = 600 epochs are
scaled to T1 = 600 and T2 = 2400 of the 6000 steps (10 % and 40 %, as
configs/pseudo_label_digits.py). Lee's 10.49 % error on MNIST-100 used
dropout and denoising-autoencoder pretraining; this config has neither.
The MNIST protocol is the shared one (`common.mnist_data`: translate 2 px,
1000 validation images), the network the BatchNorm MLP of the MNIST configs
(`mlp_mnist`), the optimizer configs/fixmatch_mnist.py's; 32 labeled + 96
unlabeled images per step and EMA 0.995 are our choices.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/pseudo_label_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/pseudo_label_mnist

Smoke variant: `--config configs/pseudo_label_mnist.py:runlocal`.
"""

from configs import common
from r2d2_jax.methods import pseudo_label


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "pseudo_label"
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 32
  c.data.uratio = 3
  c.data.eval_batch_size = 1000
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="kernels",
                     grad_clip_norm=0.0)
  c.optimizer.schedule.update(name="fixmatch_cosine", warmup_steps=0,
                              wait_steps=0, decay_steps=0)
  c.ema_decay = 0.995
  c.total_steps = 6000
  c.pseudo_label = pseudo_label.default_block()
  c.pseudo_label.update(weight=3.0, ramp_start_steps=600,
                        ramp_end_steps=2400, threshold=0.0)
  c.log_every_steps = 200
  c.eval_every_steps = 250    # 24 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    c.total_steps = 6
    c.pseudo_label.update(ramp_start_steps=1, ramp_end_steps=3)
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
