"""Blocks shared by the configs: one place for defaults, each config overrides."""

import ml_collections


def base_config() -> ml_collections.ConfigDict:
  """Defaults of every experiment; configs override what their paper sets."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.method = "supervised"
  c.model = ml_collections.ConfigDict(
      dict(name="cnn_small", dtype="", kwargs=ml_collections.ConfigDict()))
  c.data = ml_collections.ConfigDict(dict(
      dataset="digits",
      data_dir=ml_collections.FieldReference(None, field_type=str),
      manual_dir=ml_collections.FieldReference(None, field_type=str),
      num_labels=50,          # class-balanced; -1 for every example
      # Class-balanced validation examples carved from the train split (never
      # from test), drawn before the labels and outside the labeled set and
      # the unlabeled pool; results select on them. 0: no validation set (the
      # papers' configs, whose unlabeled pools are the papers'), and the
      # selected figures are n/a.
      num_val=0,
      # The labeled examples listed in a file (one a line: train-split
      # indices, or for folder: datasets names relative to train/), instead of
      # drawing num_labels; validation rows are drawn from the rest.
      labeled_split_file=ml_collections.FieldReference(None, field_type=str),
      # Images are resized to (H, W) (an int S: S x S). tfds:/folder:/npz:
      # datasets: None keeps their size (then all images must have one size).
      # imagenet2012: the crop size, None = 224. Other registered datasets
      # ignore it.
      image_size=ml_collections.FieldReference(None, field_type=object),
      # Streamed datasets (imagenet2012) only:
      labeled_fraction=ml_collections.FieldReference(None, field_type=float),
      shuffle_buffer=10_000,
      label_cache=ml_collections.FieldReference(None, field_type=str),
      split_seed=ml_collections.FieldReference(None, field_type=int),
      unlabeled="rest",       # 'rest' or 'all'
      batch_size=64,          # labeled examples per step (global)
      uratio=0,               # unlabeled examples per labeled one (μ)
      eval_batch_size=500,
      train_limit=0,          # >0: only the first N train examples (quick runs)
      test_limit=0,           # >0: only the first N test examples
      augment=dict(
          weak=dict(flip=ml_collections.FieldReference(None, field_type=bool),
                    translate=2),
          # RandAugment policy: 'mpl' (MPL / UDA TF code), 'fixmatch' or
          # 'legacy' (r2d2_jax/data/randaugment.py, docs/algorithms.md).
          strong=dict(policy="mpl", num_ops=2, magnitude=10, cutout=4)),
  ))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4,
      decay_mask="all",       # 'all' | 'kernels' | 'no_bn' | 'no_bn_bias'
      grad_clip_norm=0.0,
      schedule=dict(name="cosine", warmup_steps=0, wait_steps=0,
                    decay_steps=0)))
  c.label_smoothing = 0.0
  c.ema_decay = 0.999
  c.total_steps = 1000
  c.total_epochs = 0.0
  c.log_every_steps = 100
  c.eval_every_steps = 0      # 0: at the end only
  # BatchNorm statistics at evaluation: 'trained' (the running averages) or
  # 'unlabeled' (re-estimated on the unlabeled pool at every evaluation, in
  # full batches of eval_bn_batch_size, 0: the unlabeled batch size; the state
  # keeps the running averages). docs/algorithms.md, "Evaluation".
  c.eval_bn_stats = "trained"
  c.eval_bn_batch_size = 0
  c.checkpoint_every_steps = 500
  c.checkpoint_keep = 2
  # Also keep the state at the best validation accuracy (WORKDIR/best_checkpoint).
  c.checkpoint_best = True
  c.checkpoint_async = True
  c.init_from = ml_collections.FieldReference(None, field_type=str)
  return c


def digits_setup(c: ml_collections.ConfigDict) -> None:
  """The digits experiments' network and data, shared by every method on them.

  cnn_small on sklearn's digits with 50 labels (5 per class) and a validation
  set of 200 (20 per class, 14 % of the 1437 train images; the test split is
  the other 360); 16 labeled + 48 unlabeled images per step; translations by 1
  pixel as the weak view.
  """
  c.model.name = "cnn_small"
  c.data.dataset = "digits"
  c.data.num_labels = 50
  c.data.num_val = 200
  c.data.batch_size = 16      # mixed batch: 16 labeled + 48 unlabeled (25 %)
  c.data.uratio = 3
  c.data.eval_batch_size = 360
  c.data.augment.weak.translate = 1


def mnist_data(c: ml_collections.ConfigDict, num_labels: int = 100) -> None:
  """MNIST: 28x28x1, translate by 2, no flips; 1000 validation images (100 per class)."""
  c.data.dataset = "mnist"
  c.data.num_labels = num_labels
  c.data.num_val = 1000
  c.data.augment.weak.translate = 2
  c.data.augment.strong.cutout = 8


def imagenet_data(c: ml_collections.ConfigDict, labeled_fraction: float,
                  batch_size: int, uratio: int) -> None:
  """ImageNet with ResNet-50: the labeled fraction, batch sizes, the weak view.

  The weak view is the input pipeline's random-resized crop and a flip (no
  translation here); evaluation batches of 1024.
  """
  c.model.name = "resnet50"
  c.data.dataset = "imagenet2012"
  c.data.labeled_fraction = labeled_fraction
  c.data.batch_size = batch_size
  c.data.uratio = uratio
  c.data.eval_batch_size = 1024
  c.data.augment.weak.translate = 0   # random-resized crop in the pipeline
  c.data.augment.weak.flip = True


def r2d2_block(c: ml_collections.ConfigDict) -> None:
  """R2-D2's hyper-parameters (docs/algorithms.md, "R2-D2"): α = 0.1, β = 0.03.

  label_lr = λ / n, the label step per unit of (α/n)-scaled gradient: the paper's
  λ = 4000 at a mixed batch of n = 512 is 7.8125, i.e. a per-visit step
  λα/n ≈ 0.78 on each unlabeled row, whatever the batch size.
  finetune_labels = 'repredict': the finetune stage first repredicts the
  unlabeled rows with the R2 network (eval mode), as DoctorKey/R2D2.pytorch's
  `finetune_all_by_pseudo_label.py` does (`'prediction': True` in
  `semi_4000_4_finetune.py`); 'table' trains on the table as R2 left it.
  """
  c.r2d2 = ml_collections.ConfigDict(dict(
      alpha=0.1, beta=0.03, label_lr=4000 / 512, label_grad="closed_form",
      repredict_epochs=(0,), finetune_labels="repredict"))


def r2d2_stages(c: ml_collections.ConfigDict, *, supervised: dict,
                d2: dict, r2: dict, finetune: dict) -> None:
  """The four-stage R2-D2 pipeline: supervised → D2 → R2 → finetune.

  Each argument is that stage's overrides of the base config `c`. The D2 stage
  initialises the table by prediction (reprediction at its epoch 0); the R2
  stage repredicts at the epochs in its `r2d2.repredict_epochs`; finetune trains
  on argmax Y over every training image.
  """
  r2d2_block(c)
  c.stage_order = ("supervised", "d2", "r2", "finetune")
  c.run_stages = ""
  c.stages = ml_collections.ConfigDict({
      "supervised": merged(dict(method="supervised", data=dict(uratio=0)),
                            supervised),
      "d2": merged(dict(method="r2d2"), d2),
      "r2": merged(dict(method="r2d2"), r2),
      "finetune": merged(dict(method="r2d2_finetune",
                               data=dict(unlabeled="all")), finetune),
  })


def variant_parts(arg: str | None, allowed: tuple[str, ...]) -> list[str]:
  """The comma-separated variants of `arg`; ValueError naming any unknown one.

  `allowed` is listed in the error in its own order.
  """
  parts = [p for p in (arg or "").split(",") if p]
  unknown = set(parts) - set(allowed)
  if unknown:
    names = " and/or ".join(repr(a) for a in allowed)
    raise ValueError(f"Unknown variant {sorted(unknown)}; use {names}, "
                     "comma-separated, or nothing.")
  return parts


def ctaugment_strong(cutout: int) -> ml_collections.ConfigDict:
  """FixMatch's CTAugment strong view (2 ops, threshold 0.80, decay 0.99), then cutout.

  google-research/fixmatch's defaults (docs/algorithms.md, "FixMatch").
  """
  return ml_collections.ConfigDict(dict(
      policy="ctaugment", num_ops=2, threshold=0.80, decay=0.99,
      cutout=cutout))


def merged(defaults: dict, overrides: dict) -> dict:
  """`defaults` updated by `overrides`, nested dicts merged key by key."""
  out = dict(defaults)
  for k, v in overrides.items():
    if isinstance(v, dict) and isinstance(out.get(k), dict):
      out[k] = merged(out[k], v)
    else:
      out[k] = v
  return out


def runlocal_stages(c: ml_collections.ConfigDict, model: str = "cnn_small"
                    ) -> None:
  """Shrinks a staged config to a smoke test: a small model, a few steps each."""
  c.model.name = model
  for name in c.stage_order:
    stage = c.stages[name]
    stage.total_steps = 4
    if "total_epochs" in stage:
      stage.total_epochs = 0.0
    if "r2d2" in stage:
      stage.r2d2.repredict_epochs = (0.0,)
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2


def uda_block(weight: float, ramp_steps: int, temperature: float,
              threshold: float, label_smoothing: float,
              mask_on: str = "unsharpened") -> ml_collections.ConfigDict:
  """UDA's loss settings (docs/algorithms.md, "Meta Pseudo Labels" and "UDA"), read by 'uda' and MPL's teacher.

  mask_on: the softmax the confidence mask thresholds, 'unsharpened' (the UDA
  paper's code) or 'sharpened' by τ (the MPL code; the MPL configs pass it).
  """
  return ml_collections.ConfigDict(dict(
      weight=weight, ramp_steps=ramp_steps, temperature=temperature,
      threshold=threshold, label_smoothing=label_smoothing, mask_on=mask_on))


def mpl_stages(c: ml_collections.ConfigDict, *, teacher_lr: float,
               teacher_warmup_steps: int, uda: ml_collections.ConfigDict,
               finetune_steps: int, finetune_batch: int,
               finetune_lr: float) -> None:
  """Meta Pseudo Labels then student finetuning on the labels, as two stages.

  The teacher's optimizer copies the student's (`c.optimizer`: momentum,
  Nesterov, weight decay and its mask, clipping) with its own lr and warmup, and
  no wait; the finetune stage uses the labeled data only, with weight decay 0
  and a constant lr. The MPL step subtracts the baseline after its update
  (`baseline='updated'`, the official code's order); the finetune starts from
  the EMA student with the model's dropout off (`finetune_from='ema'`,
  kekmodel/MPL-pytorch's `finetune`), for models that have a `dropout_rate`.
  """
  teacher = c.optimizer.to_dict()
  teacher.update(lr=teacher_lr)
  teacher["schedule"] = dict(teacher["schedule"], wait_steps=0,
                             warmup_steps=teacher_warmup_steps)
  c.mpl = ml_collections.ConfigDict(dict(
      mode="first_order", h="difference", sample_labels=False,
      temperature=1.0, baseline_decay=0.01, baseline="updated",
      finetune_from="ema", teacher_optimizer=teacher))
  c.uda = uda
  c.stage_order = ("mpl", "finetune")
  c.run_stages = ""
  finetune = dict(
      method="mpl_finetune", total_steps=finetune_steps,
      data=dict(batch_size=finetune_batch, uratio=0),
      optimizer=dict(lr=finetune_lr, weight_decay=0.0,
                     schedule=dict(name="constant", wait_steps=0,
                                   warmup_steps=0)))
  if _has_dropout(c.model.name):
    finetune["model"] = dict(kwargs=dict(dropout_rate=0.0))
  c.stages = ml_collections.ConfigDict({
      "mpl": dict(method="mpl"),
      "finetune": finetune,
  })


def _has_dropout(model_name: str) -> bool:
  """Whether the registered model has a `dropout_rate` attribute."""
  from r2d2_jax import models  # pylint: disable=g-import-not-at-top
  cls = models.MODELS.get(model_name)
  cls = getattr(cls, "func", cls)  # functools.partial
  return "dropout_rate" in getattr(cls, "__dataclass_fields__", {})


def cifar10_4k_mpl_setup(c: ml_collections.ConfigDict) -> None:
  """MPL's CIFAR-10-4000 model and data (docs/algorithms.md, "Meta Pseudo Labels"), shared with UDA.

  WRN-28-2 with dense dropout 0.2 and BatchNorm decay 0.99 (the MPL code's
  `batch_norm_decay` flag default, `flag_utils.py`; flax momentum 0.99); B = 128
  labeled, μ = 7; weak view translate 4 + flip; strong view RandAugment(2 ops,
  magnitude 16) + cutout 16; weight decay on all but BatchNorm (`no_bn`, the MPL
  code's `common_utils.add_weight_decay` / `get_l2_loss`).
  """
  c.model.name = "wrn28_2"
  c.model.kwargs = ml_collections.ConfigDict(dict(dropout_rate=0.2,
                                                  bn_momentum=0.99))
  c.optimizer.decay_mask = "no_bn"
  c.data.dataset = "cifar10"
  c.data.num_labels = 4000
  c.data.batch_size = 128
  c.data.uratio = 7
  c.data.eval_batch_size = 1000
  c.data.augment.weak.translate = 4
  c.data.augment.weak.flip = True
  # `_flip_and_jitter(x, 128)`: gray padding; the strong view is flipped and
  # jittered again after RandAugment + cutout (`data_utils.cifar10_4000_uda`).
  c.data.augment.weak.pad_mode = "constant"
  c.data.augment.strong.update(policy="mpl", num_ops=2, magnitude=16,
                               cutout=16, weak_after=True)


def usb_cifar10(c: ml_collections.ConfigDict, labels: int,
                runlocal: bool) -> None:
  """USB's classic-CV CIFAR-10 setup, shared by its algorithms' configs.

  microsoft/Semi-supervised-learning `config/classic_cv/<algorithm>/
  <algorithm>_cifar10_<labels>_0.yaml` and `semilearn/core/utils/build.py`:
  WRN-28-2, B 64, μ 7, weak flip + reflect crop 4 px, strong USB RandAugment
  (3 ops and its own cutout), SGD Nesterov 0.03 with the 7π/16 cosine,
  weight decay 5e-4 without BatchNorm and biases, EMA 0.999, 2^20 steps,
  an evaluation every 5120 steps. The method block is the caller's.
  """
  c.model.name = "wrn28_2"
  c.model.kwargs = ml_collections.ConfigDict(dict(bn_momentum=0.999,
                                                  dropout_rate=0.0))
  c.data.dataset = "cifar10"
  c.data.num_labels = labels
  c.data.num_val = 0
  c.data.unlabeled = "all"
  c.data.batch_size = 64
  c.data.uratio = 7
  c.data.eval_batch_size = 256
  c.data.augment.weak.update(flip=True, translate=4, pad_mode="reflect")
  c.data.augment.strong.update(policy="usb", num_ops=3, cutout=0)
  c.optimizer = ml_collections.ConfigDict(dict(
      name="sgd", lr=0.03, momentum=0.9, nesterov=True, weight_decay=5e-4,
      decay_mask="kernels", grad_clip_norm=0.0,
      schedule=dict(name="fixmatch_cosine", warmup_steps=0, wait_steps=0,
                    decay_steps=0)))
  c.label_smoothing = 0.0
  c.ema_decay = 0.999
  c.total_steps = 1 << 20
  c.log_every_steps = 256
  c.eval_every_steps = 5120
  c.checkpoint_every_steps = 5120
  if runlocal:
    c.model.name = "cnn_small"
    c.model.kwargs = ml_collections.ConfigDict()
    c.data.batch_size = 8
    c.data.uratio = 2
    c.total_steps = 4
    c.log_every_steps = 2
    c.eval_every_steps = 0
    c.checkpoint_every_steps = 2
