r"""FixMatch on MNIST with 100 labels (10 per class), the MNIST MLP.

The method's settings are the paper's (docs/algorithms.md, "FixMatch";
configs/fixmatch_cifar10.py): τ = 0.95, λu = 1, hard pseudo-labels, μ = 7,
the FixMatch RandAugment (`policy='fixmatch'`, M = 10: levels 1..9) then
cutout; SGD Nesterov 0.9, lr 0.03 · cos(7πk/16K), weight decay 5e-4 on the
kernels only. The MNIST protocol is the shared one (`common.mnist_data`:
translate 2 px, no flips, cutout 8 px, 1000 validation images) and the
network the 1200-600-300-150-150 BatchNorm MLP of the MNIST configs
(`mlp_mnist`), so it compares with configs/mpl_mnist.py and
configs/semimeta_mnist.py; 32 labeled + 224 unlabeled images per step,
6000 steps and EMA 0.995 are our choices.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/fixmatch_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/fixmatch_mnist

The supervised baseline on the same split: `--config.method=supervised`.
Smoke variant: `--config configs/fixmatch_mnist.py:runlocal`. With the
reference's default strong view, CTAugment (2 ops, threshold 0.80, decay
0.99, learned from a probe of the labeled batch; then the same 8 px cutout):
`--config configs/fixmatch_mnist.py:cta` (`cta,runlocal` for a smoke run).
"""

from configs import common
from r2d2_jax.methods import fixmatch


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "fixmatch"
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 32
  c.data.uratio = 7
  c.data.eval_batch_size = 1000
  c.data.augment.strong.update(policy="fixmatch", num_ops=2, magnitude=10)
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="kernels",
                     grad_clip_norm=0.0)
  c.optimizer.schedule.update(name="fixmatch_cosine", warmup_steps=0,
                              wait_steps=0, decay_steps=0)
  c.ema_decay = 0.995
  c.total_steps = 6000
  c.fixmatch = fixmatch.default_block()   # τ = 0.95, λu = 1, hard labels
  c.log_every_steps = 200
  c.eval_every_steps = 250    # 24 evaluations
  c.checkpoint_every_steps = 1000
  parts = common.variant_parts(arg, ("runlocal", "cta"))
  if "cta" in parts:
    c.data.augment.strong = common.ctaugment_strong(cutout=c.data.augment.strong.cutout)
  if "runlocal" in parts:
    c.total_steps = 6
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  return c
