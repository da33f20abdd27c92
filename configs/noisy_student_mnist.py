r"""Noisy Student on MNIST with 100 labels (10 per class), the small CNN.

The stages of configs/noisy_student_digits.py (docs/algorithms.md, "Noisy
Student") at MNIST's size: a noised teacher (cnn_small on the 100 labels,
RandAugment and dropout 0.25; 3000 steps of 64 images), then two rounds of a
noised student on 32 labeled + 96 pseudo-labeled images per step (3 : 1, the
paper's ratio), 4000 steps each: soft pseudo-labels of the unnoised teacher
on the whole unlabeled pool (59 000 images: the train split less the 1000
validation images), the paper's confidence filter 0.3 and class balancing;
round1's student as large as the teacher (dropout 0.5), round2's larger
(cnn_small 48-96-192). Augmentation as configs/fixmatch_mnist.py
(translate by 2 px; RandAugment of the FixMatch code, 2 ops, magnitude 10,
then an 8 px cutout); SGD Nesterov 0.9, lr 0.03 cosine, weight decay 5e-4 on
the kernels, EMA 0.99 (the next round's teacher is the EMA network).

  python -m r2d2_jax.main --config configs/noisy_student_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/noisy_student_mnist

(MNIST is read by tensorflow-datasets; `data.manual_dir` points at the four
original MNIST files, no download.) Variants as configs/noisy_student_digits.py:
'hard', 'nofilter', 'runlocal' (comma-separated).
"""

from configs import common
from configs import noisy_student_digits


def get_config(arg: str | None = None):
  c = noisy_student_digits.get_config(arg)
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 32
  c.data.uratio = 3
  c.data.eval_batch_size = 1000
  c.data.augment.strong.update(policy="fixmatch", num_ops=2, magnitude=10)
  c.checkpoint_every_steps = 1000
  c.log_every_steps = 200
  runlocal = "runlocal" in (arg or "")
  if not runlocal:
    c.stages.teacher.update(total_steps=3000, eval_every_steps=150)
    c.stages.teacher.data.batch_size = 64
    for name in ("round1", "round2"):
      c.stages[name].update(total_steps=4000, eval_every_steps=200)
  return c
