r"""Meta Pseudo Labels on MNIST with 100 labels (10 per class), the MNIST MLP.

Two stages (mpl → finetune) with the paper's structure (docs/algorithms.md, "Meta Pseudo Labels") at a
modest CPU scale: the 1200-600-300-150-150 BatchNorm MLP (`mlp_mnist`), 32
labeled + 96 unlabeled images per step, 6000 MPL steps, then a labeled-only
finetune. The sizes, step counts and learning rates are our choices, not the
paper's. MPL needs a weak and a strong view, so unlike `r2d2_mnist.py` the
images are augmented (translate 2; RandAugment + cutout 8 for the strong
view): the numbers are not permutation-invariant results.

Offline, from the four original MNIST files:
  python -m r2d2_jax.main --config configs/mpl_mnist.py \
      --config.data.manual_dir=../shared/data/mnist \
      --workdir /tmp/r2d2_jax/mpl_mnist

Smoke variant: `--config configs/mpl_mnist.py:runlocal`.

Reference details: as configs/mpl_cifar10_4k.py (decay_mask 'no_bn', UDA mask
on the sharpened softmax, baseline subtracted after its update, finetune from
the EMA student without dropout; docs/algorithms.md, "Configs and their
references").
"""


from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.method = "mpl"
  c.model.name = "mlp_mnist"
  common.mnist_data(c, num_labels=100)
  c.data.batch_size = 32
  c.data.uratio = 3
  c.data.eval_batch_size = 1000
  c.data.augment.strong.update(policy="mpl", num_ops=2, magnitude=10,
                               cutout=8)
  c.label_smoothing = 0.1
  c.optimizer.update(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                     weight_decay=5e-4,
                     decay_mask="no_bn")
  c.optimizer.schedule.update(name="cosine", wait_steps=300, warmup_steps=300,
                              decay_steps=0)
  c.ema_decay = 0.995
  c.total_steps = 6000
  c.log_every_steps = 200
  c.eval_every_steps = 250    # 24 evaluations of the mpl stage
  c.checkpoint_every_steps = 2000
  common.mpl_stages(
      c, teacher_lr=0.05, teacher_warmup_steps=300,
      uda=common.uda_block(weight=4.0, ramp_steps=1000,
                           temperature=0.7, threshold=0.6,
                           label_smoothing=0.1,
                           mask_on="sharpened"),
      finetune_steps=500, finetune_batch=100,
      finetune_lr=0.001)
  c.stages.finetune.eval_every_steps = 20  # 25 evaluations
  if arg == "runlocal":
    common.runlocal_stages(c, model="mlp_mnist")
    c.optimizer.schedule.update(wait_steps=1, warmup_steps=1)
    c.mpl.teacher_optimizer.schedule.warmup_steps = 1
    c.uda.ramp_steps = 2
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
