r"""R2-D2 on CIFAR-10 with 4000 labels, Shake-Shake-26 2x96d: the paper's schedule.

docs/algorithms.md, "R2-D2", all four stages in one command:
1. supervised on the 4000 labels: 300 epochs, batch 40, lr 0.05 with a cosine
   rampdown scheduled for 350 epochs, Nesterov 0.9, wd 2e-4, translate 4 + flip
   + cutout 16;
2. D2: table initialised by prediction, 300 epochs (one epoch = one pass over
   the 46000 unlabeled images), batch 512 = 128 labeled + 384 unlabeled, lr 0.12
   constant, translate + flip; α = 0.1, β = 0.03, λ = 4000 at batch 512
   (label_lr = 7.8125);
3. R2: 300 more epochs, reprediction at their epochs 0, 75, 150, 225 (the
   paper's 300, 375, 450, 525), lr 0.12, 0.08, 0.04, 0.004 over the four blocks;
4. finetune: CE on all 50000 images with argmax Y, batch 512, lr 0.01 cosine
   over 50 epochs, cutout, Nesterov, wd 2e-4.
Reported: 5.72 ± 0.06 % error.

  python -m r2d2_jax.main --config configs/r2d2_cifar10_4k.py \
      --workdir /mnt/shared/r2d2/r2d2_cifar10_4k

Smoke variant (CIFAR-10 must be available to tfds):
`--config configs/r2d2_cifar10_4k.py:runlocal`.

Weight decay on every parameter (`optimizer.decay_mask='all'`): the reference,
DoctorKey/R2D2.pytorch, builds `torch.optim.SGD(model.parameters(), ...,
weight_decay=...)` in every stage (`src/semi_supervised/*.py`). The finetune
stage trains on labels repredicted by the R2 network (`r2d2.finetune_labels=
'repredict'`, `finetune_all_by_pseudo_label.py`).
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.base_config()
  c.model.name = "shake_shake26_2x96d"
  c.data.dataset = "cifar10"
  c.data.num_labels = 4000
  c.data.eval_batch_size = 1000
  c.data.augment.weak.translate = 4
  c.data.augment.weak.flip = True
  c.optimizer.update(name="sgd", momentum=0.9, nesterov=True,
                     weight_decay=2e-4,
                     decay_mask="all")
  c.ema_decay = 0.999
  c.log_every_steps = 200
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 2000
  common.r2d2_stages(
      c,
      supervised=dict(
          total_epochs=300.0, data=dict(batch_size=40, uratio=0,
                                        augment=dict(weak=dict(cutout=16))),
          # 100 steps per epoch over 4000 labels at batch 40: 350 epochs.
          optimizer=dict(lr=0.05, schedule=dict(name="cosine",
                                                decay_steps=35000))),
      d2=dict(total_epochs=300.0, data=dict(batch_size=128, uratio=3),
              optimizer=dict(lr=0.12, schedule=dict(name="constant")),
              r2d2=dict(repredict_epochs=(0.0,))),
      r2=dict(total_epochs=300.0, data=dict(batch_size=128, uratio=3),
              optimizer=dict(lr=0.12, schedule=dict(
                  name="piecewise", boundary_fractions=(0.25, 0.5, 0.75),
                  scales=(2 / 3, 1 / 2, 1 / 10))),
              r2d2=dict(repredict_epochs=(0.0, 75.0, 150.0, 225.0))),
      finetune=dict(total_epochs=50.0, data=dict(
          batch_size=128, uratio=4, augment=dict(weak=dict(cutout=16))),
                    optimizer=dict(lr=0.01, schedule=dict(name="cosine"))))
  if arg == "runlocal":
    common.runlocal_stages(c)
  elif arg:
    raise ValueError(f"Unknown variant {arg!r}; use 'runlocal' or nothing.")
  return c
