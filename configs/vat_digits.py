r"""VAT on scikit-learn's embedded digits, 50 labels (5 per class).

One stage, a few minutes on a 2-core CPU. The method's settings are vat_tf's
(docs/algorithms.md, "VAT": one power iteration, ξ = 1e-6, VAT weight 1, no
entropy term, Adam with the lr constant then decayed linearly to 0 over the
last third); the network, the data and the batch are the digits family's
(`common.digits_setup`: cnn_small, 16 labeled + 48 unlabeled images per step,
±1 px translations, 200 validation images) and the length (2000 steps), Adam's
lr (0.002, the MNIST code's) are ours.

ε = EPSILON is in the standardised inputs' units (an 8x8 image has 64 inputs of
unit variance). It was chosen on the validation split only (seed 0, the best
validation accuracy of the raw weights over the run's 25 evaluations, ties
broken by the final one): ε = 0.5, 1, 2, 4, 8 gave 0.990, 0.990, 0.980,
0.980, 0.975 (final 0.970, 0.985, ...), so ε = 1; ξ = 1e-3 instead of the
reference's 1e-6 at ε = 1 gave 0.990 (final 0.975), so ξ stays 1e-6. Each by
`python -m benchmarks.results --config configs/vat_digits.py --seeds 0
--root DIR --override vat.epsilon=E [--override vat.xi=X]`; the test split
played no part.

  python -m r2d2_jax.main --config configs/vat_digits.py \
      --workdir /tmp/r2d2_jax/vat_digits

The supervised-only baseline on the same split, network and optimizer:
`--config.method=supervised`. VAT + EntMin: `--config.vat.entmin_weight=1`.
Smoke variant: `--config configs/vat_digits.py:runlocal`.
"""

from configs import common
from configs import vat_cifar10

EPSILON = 1.0


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "vat"
  common.digits_setup(c)
  vat_cifar10.adam(c, lr=0.002)
  vat_cifar10.linear_decay(c, epochs=20, decay_start_epoch=13,
                           steps_per_epoch=100)   # 2000 steps
  c.ema_decay = 0.99          # a diagnostic: the headline is the raw network
  c.vat = vat_cifar10.vat_block(epsilon=EPSILON)
  c.log_every_steps = 100
  c.eval_every_steps = 80     # 25 evaluations
  c.checkpoint_every_steps = 1000
  if arg == "runlocal":
    vat_cifar10.linear_decay(c, epochs=6, decay_start_epoch=3,
                             steps_per_epoch=1)
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
