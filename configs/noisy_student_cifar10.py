r"""Noisy Student on CIFAR-10 with 4000 labels: WRN-28-2 teacher, two rounds (WRN-28-2, then WRN-28-8).

The stages of configs/noisy_student_digits.py (docs/algorithms.md, "Noisy
Student") at CIFAR-10 scale, for an accelerator. From the paper (Xie et al.
2020, and google-research/noisystudent): the noise — RandAugment of its code
(`policy='mpl'`: the EfficientNet RandAugment, each op's level M / 10 of its
range, not clipped, applied with a probability drawn from U(0.2, 0.8);
N = 2, M = 27; its 15 ops, SolarizeAdd in, Cutout out; fill gray 128),
dropout 0.5 before the classifier, stochastic depth with survival 0.8 at the
last block (linear); unlabeled : labeled batch 3 : 1; soft pseudo-labels of
the unnoised teacher, confidence filter 0.3, classes balanced (duplicate the
rarer, keep the most confident of the commoner); each student from scratch,
the last one larger. The paper's teacher is also trained with this noise.

Our choices (the paper has no CIFAR-10 recipe): WRN-28-2 for the teacher
and round 1, WRN-28-8 for round 2; translate/cutout constants for 32 px
images as configs/mpl_cifar10_4k.py's (its RandAugment at 32 px); SGD
Nesterov 0.9, lr 0.03, cosine to 0, weight decay 5e-4 on the kernels (the
FixMatch CIFAR setting), EMA 0.999; the teacher 100k steps of 256 labeled
images, each round 200k steps of 64 labeled + 192 pseudo-labeled; no
validation split (`num_val = 0`, as the CIFAR-10 configs of the other
methods; set `--config.data.num_val=1000` to select on one).

  python -m r2d2_jax.main --config configs/noisy_student_cifar10.py \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
      --workdir gs://BUCKET/r2d2_jax/noisy_student_cifar10

Smoke variant (cnn_small, a few steps per stage, no filter; CIFAR-10 must be
prepared): `--config configs/noisy_student_cifar10.py:runlocal`.
"""

import ml_collections

from configs import common
from configs import noisy_student_digits

# google-research/noisystudent randaugment.py `available_ops` (cutout_op off).
NOISY_STUDENT_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate",
                     "Posterize", "Solarize", "Color", "Contrast",
                     "Brightness", "Sharpness", "ShearX", "ShearY",
                     "TranslateX", "TranslateY", "SolarizeAdd")


def noise(drop_path_rate: float = 0.2, dropout_rate: float = 0.5) -> dict:
  """The paper's model noise as module attributes."""
  return dict(drop_path_rate=drop_path_rate, dropout_rate=dropout_rate)


def get_config(arg: str | None = None):
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  c = common.base_config()
  c.model.name = "wrn28_2"
  c.model.kwargs = ml_collections.ConfigDict(dict(bn_momentum=0.999))
  c.data.dataset = "cifar10"
  c.data.num_labels = 4000
  c.data.num_val = 0
  c.data.unlabeled = "all"
  c.data.batch_size = 64
  c.data.uratio = 3
  c.data.eval_batch_size = 1000
  c.data.augment.weak.update(flip=True, translate=4, pad_mode="reflect")
  c.data.augment.strong = ml_collections.ConfigDict(dict(
      policy="mpl", num_ops=2, magnitude=27, ops=NOISY_STUDENT_OPS,
      translate_const=10, cutout_const=8, cutout=0))
  c.optimizer.update(name="sgd", lr=0.03, momentum=0.9, nesterov=True,
                     weight_decay=5e-4, decay_mask="kernels")
  c.optimizer.schedule.update(name="cosine", warmup_steps=0, decay_steps=0)
  c.ema_decay = 0.999
  c.log_every_steps = 500
  c.checkpoint_every_steps = 5000
  c.stage_order = ("teacher", "round1", "round2")
  c.run_stages = ""
  wrn = lambda width: dict(name=f"wrn28_{width}", kwargs=dict(
      bn_momentum=0.999, **noise()))
  block = lambda teacher_width: noisy_student_digits.round_block(
      "soft", teacher_model=f"wrn28_{teacher_width}",
      teacher_kwargs=dict(bn_momentum=0.999))
  c.stages = ml_collections.ConfigDict({
      "teacher": dict(method="supervised", total_steps=100_000,
                      eval_every_steps=5000, model=wrn(2),
                      supervised=dict(view="strong"),
                      data=dict(batch_size=256, uratio=0)),
      "round1": dict(method="noisy_student", total_steps=200_000,
                     eval_every_steps=5000, model=wrn(2),
                     noisy_student=block(2)),
      "round2": dict(method="noisy_student", total_steps=200_000,
                     eval_every_steps=5000, model=wrn(8),
                     noisy_student=block(2)),
  })
  if arg == "runlocal":
    common.runlocal_stages(c)
    c.model.kwargs = ml_collections.ConfigDict()
    for name, stage in c.stages.items():
      stage.model = ml_collections.ConfigDict(dict(name="cnn_small",
                                                   kwargs={}))
      stage.data = dict(stage.get("data", {}), batch_size=8)
      if name != "teacher":
        stage.noisy_student.update(teacher_model="cnn_small",
                                   teacher_kwargs={}, threshold=0.0)
  return c
