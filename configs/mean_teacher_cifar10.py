r"""Mean Teacher on CIFAR-10 with 4000 labels, ConvLarge: the paper's ConvNet setting.

The TF reference (CuriousAI/mean-teacher `tensorflow/experiments/
cifar10_final_eval.py` on `mean_teacher/model.py`'s defaults), whose
ConvNet result the paper reports for 4000 labels: 12.31 ± 0.28 % test error
(Table 2; the repository's NIPS poster), 10 runs. The ResNet result (6.28 %) is
the pytorch version's (Shake-Shake-26 with two output heads and a logit
distance cost, SGD): not this config.

  python -m r2d2_jax.main --config configs/mean_teacher_cifar10.py \
      --workdir /mnt/shared/r2d2/mean_teacher_cifar10

Smoke variant (CIFAR-10 must be available to tfds):
`--config configs/mean_teacher_cifar10.py:runlocal`.

Followed (reference value → here):
* ConvLarge (CNN-13): `convlarge`, dropout 0.5 after both max-pools, Gaussian
  input noise σ = 0.15 in training, LeakyReLU 0.1; the teacher has its own
  dropout and noise (`teacher_dropout_probability` 0.5).
* Batches of 100 images, `n_labeled_per_batch='vary'` (drawn from all 50000:
  8 labeled on average) → 8 labeled + 96 unlabeled (μ = 12: `data.uratio` is
  an integer, and 104 splits over 1, 2, 4 or 8 devices).
* Consistency: MSE of the softmaxes on every image (`apply_consistency_to_
  labeled` True), `max_consistency_cost` 100·4000/50000 = 8, with the labeled
  CE summed over the labeled rows and divided by the whole batch. Here the CE
  is a mean over the 8 labeled rows and the MSE a mean over all 104, so the
  same weight of each labeled CE relative to each image's MSE is
  8·104/8 = 104 (the objective's overall scale, which Adam ignores, aside);
  sigmoid ramp-up over `rampup_length` 40000 steps.
* EMA decay 0.999 during and after the ramp-up (`ema_decay_during_rampup` set
  to 0.999 by the final-eval script; the model's default is 0.99).
* Adam, max lr 0.003, β2 0.999 (`adam_beta_2_during_rampup` 0.999), ε 1e-8,
  no weight decay, 150000 steps; translations by 2 px (reflect) and flips.

Approximated, because the shared optimizer has no such schedules:
* lr ramp-up: exp(−5(1 − t/40000)²) → linear warmup over 40000 steps;
* lr ramp-down over the last 25000 steps, exp(−12.5 p²) → piecewise constant,
  five 5000-step blocks at the curve's midpoint values;
* Adam β1 0.9 → 0.5 during the ramp-down → kept at 0.9.

Different: BatchNorm instead of weight normalisation + mean-only BatchNorm
(r2d2_jax/models/convlarge.py), per-channel standardisation instead of ZCA
whitening, and the EMA update after the student's step (TF: with it, from the
weights before it).
"""

import ml_collections

from configs import common

RAMPUP, RAMPDOWN, TOTAL = 40_000, 25_000, 150_000


def rampdown_scales() -> tuple[tuple[int, ...], tuple[float, ...]]:
  """Piecewise-constant approximation of exp(−12.5 p²) over the last 25000 steps."""
  blocks = 5
  length = RAMPDOWN // blocks
  boundaries = tuple(TOTAL - RAMPDOWN + k * length for k in range(blocks))
  mids = [(k + 0.5) / blocks for k in range(blocks)]
  values = [2.718281828459045 ** (-12.5 * p * p) for p in mids]
  scales = tuple([values[0]] + [b / a for a, b in zip(values, values[1:])])
  return boundaries, scales


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mean_teacher"
  c.model.name = "convlarge"
  c.model.kwargs = ml_collections.ConfigDict(dict(
      dropout_rate=0.5, input_noise_std=0.15, bn_momentum=0.999))
  c.data.dataset = "cifar10"
  c.data.num_labels = 4000
  c.data.batch_size = 8
  c.data.uratio = 12          # 8 + 96 images per step (the reference: 100)
  c.data.eval_batch_size = 1000
  c.data.augment.weak.translate = 2
  c.data.augment.weak.flip = True
  c.data.augment.weak.pad_mode = "reflect"
  boundaries, scales = rampdown_scales()
  c.optimizer.update(name="adam", lr=0.003, b1=0.9, b2=0.999,
                     weight_decay=0.0, grad_clip_norm=0.0)
  c.optimizer.schedule = ml_collections.ConfigDict(dict(
      name="piecewise", warmup_steps=RAMPUP, wait_steps=0, decay_steps=0,
      boundaries=boundaries, scales=scales))
  c.ema_decay = 0.999
  c.total_steps = TOTAL
  c.mean_teacher = ml_collections.ConfigDict(dict(
      weight=8.0 * 104 / 8, ramp_steps=RAMPUP, ema_decay_rampup=0.999,
      ema_warmup=False, consistency_on_labeled=True))
  c.log_every_steps = 500
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  if arg == "runlocal":
    c.model.name = "cnn_small"
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.batch_size = 8
    c.data.uratio = 2
    c.total_steps = 4
    c.optimizer.schedule.update(warmup_steps=1, boundaries=(3,), scales=(0.5,))
    c.mean_teacher.ramp_steps = 2
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
    c.eval_every_steps = 0
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
