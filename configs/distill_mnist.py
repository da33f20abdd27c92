r"""DeiT-style distillation on MNIST with 100 labels (10 per class).

The two stages of configs/distill_digits.py (docs/algorithms.md, "DeiT-style
distillation") at MNIST's size:

  teacher   cnn_small trained on the 100 labels alone (translations by 2 px;
            3000 steps of 64 labeled images, SGD Nesterov 0.9, lr 0.03 cosine,
            weight decay 2e-4, EMA 0.99)
  distill   a small ViT student (`vit_mnist`: patch 4, width 128, depth 6,
            4 heads; `vit_mnist_distilled` for kind 'token') from scratch, on
            the labels and the frozen teacher's targets over 32 labeled + 96
            unlabeled images per step (the teacher sees the weak view, the
            student the strong one: RandAugment of the FixMatch code, 2 ops,
            magnitude 10, 8 px cutout); 4000 steps, AdamW lr 1e-3, weight
            decay 0.05 (not on norms and biases), cosine with 200 warm-up
            steps

The kind is the argument: 'soft' (τ = 3, α = 0.1), 'hard' (default, α = ½) or
'token' (evaluated on the mean of the two heads' softmaxes, and each head):

  python -m r2d2_jax.main --config configs/distill_mnist.py:token \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/distill_mnist_token

(MNIST is read by tensorflow-datasets; `data.manual_dir` points at the four
original MNIST files.) The student without a teacher:
`--config.stages.distill.distill.alpha=0`. Smoke variant: add ',runlocal'.
"""

from configs import common
from configs import distill_digits


def get_config(arg: str | None = None):
  c = distill_digits.get_config(arg)
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 32
  c.data.uratio = 3
  c.data.eval_batch_size = 1000
  c.data.augment.strong.update(policy="fixmatch", num_ops=2, magnitude=10)
  c.log_every_steps = 200
  c.checkpoint_every_steps = 1000
  distilled = c.stages.distill.model.name.endswith("_distilled")
  c.stages.distill.model.name = ("vit_mnist_distilled" if distilled
                                 else "vit_mnist")
  if "runlocal" not in (arg or ""):
    c.stages.teacher.update(total_steps=3000, eval_every_steps=150)
    c.stages.teacher.data.batch_size = 64
    c.stages.teacher.optimizer.schedule.decay_steps = 3500
    c.stages.distill.update(total_steps=4000, eval_every_steps=200)
    c.stages.distill.optimizer.schedule.warmup_steps = 200
  return c
