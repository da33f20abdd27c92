r"""VAT on permutation-invariant MNIST with 100 labels (10 per class): the TPAMI setting.

docs/algorithms.md, "VAT". The paper (Miyato et al., TPAMI 2018) reports
1.36 ± 0.03 % test error. What this config follows, and where it comes from:

- the network 784-1200-600-300-150-10 with Gaussian noise (std 0.5) on each
  hidden layer, and ε = 5.0: the first author, takerum/vat issue #3 ("we use
  different network architecture (784-1200-600-300-150-10), and also add
  gaussian noise (mean=0, stddev=0.5) on each hidden layer ... The optimal
  epsilon on this setting is epsilon=5.0. Please see Appendix C");
- ξ = 1e-6, one power iteration, VAT weight 1, no entropy term: vat_tf
  `vat.py` and the MNIST code of takerum/vat (`xi=1e-6`);
- BatchNorm after every dense layer with decay 0.99 (vat_tf `layers.py`);
  only the labeled forward updates its running statistics, the unlabeled
  forwards use their own batch statistics (r2d2_jax/methods/vat.py);
- Adam, the lr constant and then decayed linearly to 0 (vat_tf
  `train_semisup.py`'s schedule: `lr · (E − ep) / (E − E0)` per epoch of 400
  steps), 48 000 steps (120 × 400, decay over the last 40 × 400 = 16 000):
  vat_tf's defaults `num_epochs=120, epoch_decay_start=80,
  num_iter_per_epoch=400`;
- no augmentation (permutation invariant), no weight decay, no EMA (the raw
  network is evaluated); the unlabeled pool is every train image outside the
  validation split, the labeled ones included (`data.unlabeled='all'`, as
  takerum/vat's `load_mnist_for_semi_sup`).

Inputs are per-channel standardised (mean 33.3, std 78.6 on 0..255), the
references' are in [0, 1]: a perturbation of norm 5.0 there is 5.0 · 255 /
78.6 = 16.22 here, and ξ scales alike (`PIXEL_TO_INPUT`).

Not verified against the paper's Appendix C (not readable here): the batch
sizes (64 labeled + 256 unlabeled here; takerum/vat's ICLR-2016 MNIST code
uses 100 + 250: the `:batch100` variant), the lr (0.002, the MNIST
code's; vat_tf's CIFAR/SVHN default is 0.001) and the length (vat_tf's
default). A later check should read Appendix C and fix these.

The noise is added after each hidden BatchNorm, before the ReLU (the issue's
words, "on each hidden layer", do not place it; this is where the Ladder
network, whose PI-MNIST setting the TPAMI paper shares, adds it); the logits
are batch-normalised too (`top_bn`).

Differences from the reference (also in docs/algorithms.md):
- BatchNorm ε 1e-5 (flax's; vat_tf 1e-6), the running variance biased
  (vat_tf: × n/(n − 1)); no dense biases before BatchNorm (its β is the bias);
- Adam's β1 stays 0.9 in the decay phase (vat_tf: 0.5 from the first decay
  epoch; the `:b1_decay` variant): the 3-seed table in docs/results.md was
  measured so, and the switch is measured as an ablation beside it;
- flax's default (LeCun normal) dense initialisation.

  python -m r2d2_jax.main --config configs/vat_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/vat_mnist

Smoke variant: `--config configs/vat_mnist.py:runlocal`. The baselines on the same
setting (network with its noise, data, batches, optimizer, length):
`:supervised` (the labeled term alone) and `:pseudo_label` (Lee 2013's α(t),
T1 and T2 at 10 % and 40 % of the steps as configs/pseudo_label_mnist.py);
combine with `runlocal` as `:pseudo_label,runlocal`. The ablations of
docs/results.md ("what limits it"), each one change: `:b1_decay` (vat_tf's
β1 = 0.5 from step 32 000, the first decay epoch) and `:batch100` (100
labeled + 250 unlabeled images a step, takerum/vat's ICLR-2016 MNIST code;
the same 48 000 steps) and `:bn_unlabeled` (every evaluation, validation
included, uses BatchNorm statistics re-estimated on the unlabeled pool, as
takerum/vat's ICLR-2016 code does once after training; the weights train
exactly as the default's).
"""

import ml_collections

from configs import common
from configs import vat_cifar10
from r2d2_jax.methods import pseudo_label

# `supervised` / `pseudo_label`: the same network, data, optimizer and length
# with another method (the baselines beside VAT in docs/results.md).
VARIANTS = ("supervised", "pseudo_label", "b1_decay", "batch100",
            "bn_unlabeled", "runlocal")

# A length of 1 in [0, 1] pixel units, in the standardised inputs' units.
PIXEL_TO_INPUT = 255.0 / 78.6


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "vat"
  c.model.name = "mlp_mnist"
  c.model.kwargs = ml_collections.ConfigDict(dict(
      widths=(1200, 600, 300, 150), bn_momentum=0.99, noise_std=0.5,
      top_bn=True))
  common.mnist_data(c, num_labels=100)
  c.data.unlabeled = "all"
  c.data.augment.weak.translate = 0   # permutation invariant: no augmentation
  c.data.batch_size = 64
  c.data.uratio = 4
  c.data.eval_batch_size = 1000
  vat_cifar10.adam(c, lr=0.002)
  vat_cifar10.linear_decay(c, epochs=120, decay_start_epoch=80,
                           steps_per_epoch=400)
  c.ema_decay = 0.0
  c.vat = vat_cifar10.vat_block(epsilon=5.0 * PIXEL_TO_INPUT,
                                xi=1e-6 * PIXEL_TO_INPUT)
  c.log_every_steps = 400
  c.eval_every_steps = 2000   # 24 evaluations
  c.checkpoint_every_steps = 4000
  parts = [p for p in (arg or "").split(",") if p]
  for part in parts:
    if part not in VARIANTS:
      raise ValueError(f"Unknown variant {part!r}; use any of {VARIANTS} "
                       "joined by commas, or nothing.")
  if "supervised" in parts:
    c.method = "supervised"
  if "pseudo_label" in parts:
    # Lee's T1 = 100 and T2 = 600 epochs as 10 % and 40 % of the steps, as
    # configs/pseudo_label_mnist.py; α_f = 3, no threshold.
    c.method = "pseudo_label"
    c.pseudo_label = pseudo_label.default_block()
    c.pseudo_label.update(weight=3.0, ramp_start_steps=c.total_steps // 10,
                          ramp_end_steps=4 * c.total_steps // 10,
                          threshold=0.0)
  if "b1_decay" in parts:
    vat_cifar10.decay_b1(c, decay_start_epoch=80, steps_per_epoch=400)
  if "batch100" in parts:
    c.data.batch_size = 100
    # 250 unlabeled images a step: μ = 2.5 (the base config's μ is an int
    # field, so it is replaced by a float one).
    del c.data["uratio"]
    c.data.uratio = 2.5
  if "bn_unlabeled" in parts:
    c.eval_bn_stats = "unlabeled"
  if "runlocal" in parts:
    c.model.kwargs.widths = (32,)
    c.data.batch_size = 16
    vat_cifar10.linear_decay(c, epochs=6, decay_start_epoch=3,
                             steps_per_epoch=1)
    if c.optimizer.get("b1_schedule") is not None:
      vat_cifar10.decay_b1(c, decay_start_epoch=3, steps_per_epoch=1)
    if c.get("pseudo_label") is not None:
      c.pseudo_label.update(ramp_start_steps=1, ramp_end_steps=3)
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 3
  return c
