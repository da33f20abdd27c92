r"""Noisy Student on ImageNet with 10 % of the labels: ResNet-50 teacher and two ResNet-50 rounds.

The stages of configs/noisy_student_digits.py (docs/algorithms.md, "Noisy
Student") on ImageNet, for a Cloud TPU pod or GPUs. From the paper (Xie et
al. 2020; google-research/noisystudent): the noise — RandAugment of its code
(`policy='mpl'`, N = 2, M = 27, translate 100 px and cutout 40 px at 224 px,
its 15 ops with SolarizeAdd and without Cutout, fill gray 128), dropout 0.5
before the classifier, stochastic depth with survival 0.8 at the last block;
unlabeled : labeled batch 3 : 1; soft pseudo-labels of the unnoised teacher
on centre-cropped images, confidence filter 0.3, classes balanced to an equal
count (duplicate the rarer, keep the most confident of the commoner); the
student from scratch; label smoothing 0.1.

Our choices: ResNet-50 throughout (the paper's networks are EfficientNets,
each round's larger or equal; ResNet-50 is the network of the 10 % ImageNet
semi-supervised tables); the standard ResNet-50 optimizer (SGD Nesterov 0.9,
lr 0.1 per 256 labeled images with 5 warm-up epochs and cosine decay, weight
decay 1e-4 on everything but BatchNorm) instead of the paper's RMSProp for
EfficientNets; two rounds (the paper iterates three times: add a stage
'round3' like 'round2'); the teacher 100 epochs of the 128k labeled images,
each round 50 epochs of the unlabeled set (1.28M images, the labeled ones
included, as the paper's unlabeled set is a superset); EMA 0.9999 as the
EfficientNet code.

Cloud TPU pod (every worker runs the same command; see launch/):
  python -m r2d2_jax.main --config configs/noisy_student_imagenet10.py \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets \
      --workdir gs://BUCKET/r2d2_jax/noisy_student_imagenet10

Smoke variant (cnn_small at 64 px, a few steps per stage, no filter;
ImageNet must be prepared): `--config configs/noisy_student_imagenet10.py:runlocal`.
"""

import ml_collections

from configs import common
from configs import noisy_student_cifar10
from configs import noisy_student_digits


def get_config(arg: str | None = None):
  if arg not in (None, "", "runlocal"):
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  c = common.base_config()
  common.imagenet_data(c, labeled_fraction=0.1, batch_size=256,
                       uratio=3)
  c.data.augment.strong = ml_collections.ConfigDict(dict(
      policy="mpl", num_ops=2, magnitude=27,
      ops=noisy_student_cifar10.NOISY_STUDENT_OPS, translate_const=100,
      cutout_const=40, cutout=0))
  c.label_smoothing = 0.1
  c.optimizer.update(name="sgd", lr=0.1, momentum=0.9, nesterov=True,
                     weight_decay=1e-4, decay_mask="no_bn")
  c.ema_decay = 0.9999
  c.log_every_steps = 500
  c.eval_every_steps = 10_000
  c.checkpoint_every_steps = 2000
  c.stage_order = ("teacher", "round1", "round2")
  c.run_stages = ""
  resnet = dict(name="resnet50", kwargs=noisy_student_cifar10.noise())
  block = noisy_student_digits.round_block(
      "soft", teacher_model="resnet50", teacher_kwargs={})
  # 5 warm-up epochs: 5 x 128k / 512 (teacher) and 5 x 1.28M / 768 (rounds).
  c.stages = ml_collections.ConfigDict({
      "teacher": dict(method="supervised", total_epochs=100.0,
                      model=resnet, supervised=dict(view="strong"),
                      data=dict(batch_size=512, uratio=0),
                      optimizer=dict(lr=0.2, schedule=dict(
                          name="cosine", warmup_steps=1250))),
      "round1": dict(method="noisy_student", total_epochs=50.0, model=resnet,
                     optimizer=dict(lr=0.1, schedule=dict(
                         name="cosine", warmup_steps=8340)),
                     noisy_student=block),
      "round2": dict(method="noisy_student", total_epochs=50.0, model=resnet,
                     optimizer=dict(lr=0.1, schedule=dict(
                         name="cosine", warmup_steps=8340)),
                     noisy_student=block),
  })
  if arg == "runlocal":
    common.runlocal_stages(c)
    c.data.image_size = 64
    c.data.shuffle_buffer = 100
    for name, stage in c.stages.items():
      stage.model = ml_collections.ConfigDict(dict(name="cnn_small",
                                                   kwargs={}))
      stage.data = dict(stage.get("data", {}), batch_size=8)
      stage.optimizer.schedule.warmup_steps = 1
      if name != "teacher":
        stage.noisy_student.update(teacher_model="cnn_small",
                                   teacher_kwargs={}, threshold=0.0)
  return c
