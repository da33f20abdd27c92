"""Using a trained model: load a run's checkpoint and predict classes of images.

`load(workdir, stage=None, which='final', variables='ema', config=None)`
returns a `Predictor`: the network of one checkpoint of a run (a stage of a
staged run), ready to classify uint8 images [N, H, W, C] with a jitted
forward pass, with the image shape, the normalisation and, where known, the
class names. `r2d2_jax.predict` is its command line. The workdir may be a
local folder or a `gs://` URL (`r2d2_jax.paths`; tests/test_gcs.py).

What is loaded:

  * The run's config: `WORKDIR/config.json`, which the trainer writes (the
    config of the last command run in that workdir), or `config=` (a
    `ConfigDict` or a config file path; the command line's `--config`).
  * The checkpoint. `which='final'` is the newest kept checkpoint of the
    stage (the last step of a finished stage). `which='best'` is the state
    the trainer keeps in `STAGE/best_checkpoint` (docs/algorithms.md,
    "Evaluation protocol"): at the evaluation with the highest
    `accuracy/val/raw`, the headline's selection rule, its raw and EMA
    weights alike. A run without that folder (no validation split, or
    `checkpoint_best=False`, or trained before it existed) picks, among the
    kept checkpoints whose step has a row in `eval_history.jsonl` with
    `accuracy/val/<variables>`, the one with the highest (ties: the later
    step); `describe()` names the folder it read.
  * The weights: `variables` names one of the method's `eval_variables`
    ('raw', 'ema'; MPL also 'teacher'; the student is 'raw'/'ema'; a
    distilled ViT also 'raw_cls', 'ema_dist', ...), the networks the trainer
    evaluates.

The state is rebuilt without the training data: the method's state structure
comes from `init_state` traced with a stand-in `Task`, and every array's shape
from the checkpoint itself. Only the arrays of the chosen network are read
from disk (not the optimizer state, a per-example table or a frozen teacher),
unless a method's `eval_variables` computes rather than picks them; then the
whole state is. Inputs are normalised exactly as evaluation does
(`views.normalize` with the dataset's `DatasetInfo` mean and std).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import json
import os
from typing import Any, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r2d2_jax import metrics as metrics_lib
from r2d2_jax import models
from r2d2_jax import optim
from r2d2_jax import paths as paths_lib
from r2d2_jax import sharding
from r2d2_jax.data import sources
from r2d2_jax.data.views import normalize
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import Network, Task, get_method
from r2d2_jax.methods.base import bind

PyTree = Any

CONFIG_FILE = paths_lib.CONFIG_FILE
BEST_CHECKPOINT = paths_lib.BEST_CHECKPOINT
BN_META = paths_lib.BN_META
WEIGHTS = ("final", "best")

# Class names of the datasets whose names are fixed facts (tensorflow-datasets'
# label order). Other datasets: read from a prepared tfds builder, if any.
_DIGITS = tuple(str(i) for i in range(10))
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "digits": _DIGITS,
    "mnist": _DIGITS,
    "svhn_cropped": _DIGITS,
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                "horse", "ship", "truck"),
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


# ---------------------------------------------------------------------------
# The predictor


@dataclasses.dataclass(eq=False)
class Predictor:
  """One trained network, ready to classify uint8 images.

  Attributes:
    info: the dataset's facts (`image_shape`, `mean`, `std`, ...).
    class_names: a name per class, or None when unknown.
    variables: the network's variables ({'params', 'batch_stats', ...}).
    variables_name: which of the method's `eval_variables` they are.
    net: the `Network` (its `model` is the Flax module).
    config: the stage's config.
    stage: the stage's name ('' for a single-stage run).
    step: the checkpoint's step.
    total_steps: the stage's length (step < total_steps: unfinished).
    weights: 'final' or 'best'.
    val_accuracy: the checkpoint's `accuracy/val/<variables_name>` from the
      evaluation history, or None when it has none.
    checkpoint_dir: the checkpoint folder it came from.
    batch_size: images per compiled call (config.data.eval_batch_size).
    bn_stats: 'trained' (the running averages of the checkpoint) or
      'unlabeled' (the statistics re-estimated on the unlabeled pool that the
      run's evaluation at this step used; `eval_bn_stats`).
  """
  info: sources.DatasetInfo
  class_names: tuple[str, ...] | None
  variables: PyTree
  variables_name: str
  net: Network
  config: ml_collections.ConfigDict
  stage: str
  step: int
  total_steps: int
  weights: str
  val_accuracy: float | None
  checkpoint_dir: str
  batch_size: int = 500
  bn_stats: str = "trained"

  def __post_init__(self):
    info, net = self.info, self.net

    def logits_fn(variables, images):
      return net.apply_eval(variables, normalize(images, info)).astype(
          jnp.float32)

    # The compiled forward pass: (variables, uint8 [n, H, W, C]) -> logits.
    self.apply = jax.jit(logits_fn)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the images the network takes."""
    return tuple(self.info.image_shape)

  @property
  def num_classes(self) -> int:
    return self.info.num_classes

  @property
  def mean(self) -> tuple[float, ...]:
    """Per-channel mean (0..255 scale) subtracted before the network."""
    return tuple(self.info.mean)

  @property
  def std(self) -> tuple[float, ...]:
    """Per-channel std (0..255 scale) the centred images are divided by."""
    return tuple(self.info.std)

  def class_name(self, index: int) -> str:
    """The name of class `index` (its number when names are unknown)."""
    if self.class_names is None:
      return str(int(index))
    return self.class_names[int(index)]

  def _check(self, images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim == 3 and self.image_shape[2] == 1 and (
        images.shape[1:] == self.image_shape[:2]):
      images = images[..., None]
    if images.ndim != 4 or images.shape[1:] != self.image_shape:
      raise R2D2Error(
          f"The images have shape {images.shape}; this network takes uint8 "
          f"[N, {', '.join(map(str, self.image_shape))}] (use load_images to "
          "read, convert and resize image files).")
    if images.dtype != np.uint8:
      raise R2D2Error(f"The images are {images.dtype}; pass uint8 images on "
                      "the 0..255 scale (they are normalised here).")
    return images

  def logits(self, images: np.ndarray) -> np.ndarray:
    """Logits float32 [N, num_classes] of uint8 images [N, H, W, C].

    Images go through in chunks of `batch_size`; the last chunk is padded to
    a power of two (at most `batch_size`) so few shapes are compiled.
    """
    images = self._check(images)
    n = images.shape[0]
    out = []
    for start in range(0, n, self.batch_size):
      chunk = images[start:start + self.batch_size]
      size = min(self.batch_size, 1 << max(len(chunk) - 1, 0).bit_length())
      padded = np.zeros((size, *self.image_shape), np.uint8)
      padded[:len(chunk)] = chunk
      out.append(np.asarray(self.apply(self.variables, padded))[:len(chunk)])
    if not out:
      return np.zeros((0, self.num_classes), np.float32)
    return np.concatenate(out)

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    """Softmax of `logits(images)`, float32 [N, num_classes]."""
    z = self.logits(images)
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)

  def predict(self, images: np.ndarray) -> np.ndarray:
    """The class index of each image, int [N]."""
    return np.argmax(self.logits(images), -1)

  def describe(self) -> str:
    """One line: which checkpoint and weights this is."""
    where = f"stage {self.stage!r}" if self.stage else "the run"
    acc = ("" if self.val_accuracy is None else
           f", accuracy/val/{self.variables_name}={self.val_accuracy:.4f}")
    unfinished = ("" if self.step >= self.total_steps else
                  f" (unfinished: the stage runs to {self.total_steps})")
    return (f"{where}, step {self.step}{unfinished}, weights={self.weights}, "
            f"variables={self.variables_name}, BN statistics={self.bn_stats}"
            f"{acc}; {self.checkpoint_dir}")


# ---------------------------------------------------------------------------
# Loading


def load(workdir: str, stage: str | None = None, which: str = "final",
         variables: str = "ema",
         config: ml_collections.ConfigDict | str | None = None,
         bn_stats: str | None = None) -> Predictor:
  """Loads the network of one checkpoint of a run for prediction.

  Args:
    workdir: the run's --workdir (for a staged run, the folder that holds one
      sub-folder per stage).
    stage: the stage to load, for a staged run (default: the last stage, in
      `config.stage_order`, that has a checkpoint).
    which: 'final' (the newest kept checkpoint) or 'best' (the kept
      checkpoint with the highest validation accuracy; module docstring).
    variables: which network of the method's `eval_variables` ('ema', 'raw',
      'teacher', ...).
    config: the run's config (a `ConfigDict`, or a config file path
      'configs/NAME.py[:variant]'); default: `WORKDIR/config.json`.
    bn_stats: the BatchNorm statistics to predict with: 'trained' (the
      checkpoint's running averages) or 'unlabeled' (those the run's
      evaluation at the checkpoint's step re-estimated, saved in its
      metadata; only runs with `eval_bn_stats='unlabeled'`); default: the
      run's `eval_bn_stats`, so that predictions reproduce its evaluation.

  Returns:
    A `Predictor`.

  Raises:
    R2D2Error: no checkpoint in the workdir, an unknown stage (the message
      lists the stages), no config, no validation accuracy for 'best', an
      unknown `variables` name, or a checkpoint that does not fit the config.
  """
  if bn_stats not in (None, "trained", "unlabeled"):
    raise R2D2Error(f"bn_stats={bn_stats!r}: choose 'trained' (the running "
                    "averages) or 'unlabeled' (re-estimated at evaluation).")
  if which not in WEIGHTS:
    raise R2D2Error(f"weights={which!r}: choose 'final' (the newest kept "
                    "checkpoint) or 'best' (the kept checkpoint with the best "
                    "validation accuracy).")
  workdir = paths_lib.absolute(workdir)     # a local folder or gs://
  if not _isdir(workdir):
    raise R2D2Error(f"--workdir={workdir!r}: no such folder.")
  full_config = _run_config(workdir, config)
  if full_config is None:
    _check_has_checkpoints(workdir)
    raise R2D2Error(
        f"{workdir} has no {CONFIG_FILE} (the trainer writes it; a run "
        "from an older version has none). Pass the config the run was "
        "trained with: --config configs/NAME.py[:variant] with the same "
        "--config.KEY=VALUE overrides (or load(..., config=...)); for a "
        "staged run, the whole staged config.")
  stage_name, stage_dir = _choose_stage(workdir, stage, full_config)
  cfg = full_config
  if cfg is not None and cfg.get("stages"):
    from r2d2_jax import train  # pylint: disable=g-import-not-at-top
    if stage_name not in cfg.stages:
      raise R2D2Error(
          f"The workdir has a stage {stage_name!r} that the config does not "
          f"(its stages: {list(cfg.stage_order)}). Pass the config the run "
          "was trained with.")
    cfg = train.stage_config(cfg, stage_name)
  elif cfg is not None and stage_name:
    raise R2D2Error(
        f"{workdir} is a staged run (stage {stage_name!r}), but the config "
        "has no `stages`. Pass the staged config the run was trained with.")

  ckpt_dir = paths_lib.join(stage_dir, "checkpoints")
  best_dir = paths_lib.join(stage_dir, BEST_CHECKPOINT)
  from_best = which == "best" and _isdir(best_dir)
  if from_best:
    ckpt_dir = best_dir
  manager = _manager(ckpt_dir)
  try:
    steps = _complete_steps(manager, ckpt_dir)
    if not steps:
      raise R2D2Error(
          f"No complete checkpoint in {ckpt_dir}: the run has not saved one "
          "yet (it saves every checkpoint_every_steps and at the last step).")
    history = metrics_lib.read_history(
        paths_lib.join(stage_dir, metrics_lib.EVAL_HISTORY))
    if from_best:
      # The trainer's best-on-validation state (`accuracy/val/raw`).
      step = steps[-1]
      key = f"accuracy/val/{variables}"
      vals = [float(r[key]) for r in history
              if int(r["step"]) == step and key in r]
      val_acc = vals[-1] if vals else None
    else:
      step, val_acc = _choose_step(steps, history, which, variables,
                                   stage_dir)
    meta = manager.restore(step, args=_composite(meta=True)).meta
    predictor = _build(cfg, manager, step, meta, variables, stage_name,
                       which, val_acc, ckpt_dir, bn_stats)
  finally:
    manager.close()
  return predictor


def _composite(meta: bool = False, state: Any = None):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  items = {}
  if meta:
    items["meta"] = ocp.args.JsonRestore()
  if state is not None:
    items["state"] = ocp.args.StandardRestore(state)
  return ocp.args.Composite(**items)


def _manager(ckpt_dir: str):
  """A read-only orbax manager of a checkpoint folder."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.CheckpointManager(
      ckpt_dir, item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})


def _complete_steps(manager, ckpt_dir: str) -> list[int]:
  """The kept steps whose folder holds both items, ascending."""
  out = []
  for step in sorted(manager.all_steps()):
    folder = paths_lib.join(ckpt_dir, str(step))
    if not _isdir(folder) or all(_isdir(paths_lib.join(folder, item))
                                  for item in ("state", "meta")):
      out.append(step)
  return out


def _choose_step(steps: Sequence[int], history: list[dict[str, float]],
                 which: str, variables: str,
                 stage_dir: str) -> tuple[int, float | None]:
  """The checkpoint step to load, and its validation accuracy (if evaluated)."""
  key = f"accuracy/val/{variables}"
  val = {int(r["step"]): float(r[key]) for r in history if key in r}
  if which == "final":
    return steps[-1], val.get(steps[-1])
  candidates = [s for s in steps if s in val]
  if not candidates:
    has_val = any(k.startswith("accuracy/val/") for r in history for k in r)
    why = (f"no evaluation of {stage_dir} has {key!r}" +
           (" (the run has validation metrics for other networks: choose "
            "--variables accordingly)" if has_val else
            " (the run has no validation set: data.num_val=0)")
           if not val else
           f"none of the kept checkpoints (steps {list(steps)}) is at an "
           f"evaluation step with {key!r} (evaluated at steps "
           f"{sorted(val)})")
    raise R2D2Error(
        f"weights='best' picks the kept checkpoint with the best validation "
        f"accuracy, but {why}. Use --weights final, or train with "
        "data.num_val > 0 and checkpoint_every_steps equal to "
        "eval_every_steps.")
  best = max(candidates, key=lambda s: (val[s], s))
  return best, val[best]


def _stand_in_task(info: sources.DatasetInfo, total_steps: int) -> Task:
  """A `Task` that gives the state its structure (the shapes come from the checkpoint).

  The training data is not read: one labeled and unlabeled row per class.
  """
  rows = np.arange(info.num_classes)
  return Task(num_classes=info.num_classes, num_train=info.num_classes,
              total_steps=total_steps, steps_per_epoch=1,
              mesh=sharding.make_mesh(jax.local_devices()[:1]),
              labeled_index=rows, unlabeled_index=rows,
              train_labels=rows.astype(np.int32))


def dataset_info(config: ml_collections.ConfigDict) -> sources.DatasetInfo:
  """The `DatasetInfo` the stage's network sees (a streamed dataset's image_size)."""
  info = sources.get_info(config.data.dataset)
  if not info.in_memory:
    size = int(config.data.get("image_size") or info.image_shape[0])
    info = dataclasses.replace(info, image_shape=(size, size,
                                                  info.image_shape[2]))
  return info


def _build(cfg: ml_collections.ConfigDict, manager, step: int,
           meta: dict[str, Any], variables: str, stage_name: str, which: str,
           val_acc: float | None, ckpt_dir: str,
           bn_stats: str | None = None) -> Predictor:
  """Rebuilds the stage's network and restores checkpoint `step` into it."""
  info = dataset_info(cfg)
  method = get_method(cfg.method)
  model_kwargs = dict(cfg.model.get("kwargs", {}) or {})
  if cfg.model.get("dtype"):
    model_kwargs["dtype"] = models.compute_dtype(cfg.model.dtype)
  try:
    model = models.get_model(cfg.model.name, info.num_classes, **model_kwargs)
  except ValueError as e:
    raise R2D2Error(str(e)) from None
  total_steps = int(meta.get("total_steps") or step)
  tx, schedule = optim.make_optimizer(cfg.optimizer, total_steps)
  net = Network(model=model, tx=tx, schedule=schedule,
                image_shape=info.image_shape,
                ema_decay=float(cfg.get("ema_decay", 0.0) or 0.0))
  task = _stand_in_task(info, total_steps)
  hp = bind(method.hparams, task=task)(cfg)
  init_fn = bind(method.init_state, net=net, task=task, hp=hp)
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  target = _restore_target(abstract, manager.item_metadata(step).state,
                           ckpt_dir, step)
  names = _eval_names(method, target)
  if names is not None and variables not in names:
    raise R2D2Error(
        f"variables={variables!r}: method {cfg.method!r} evaluates "
        f"{sorted(names)}; choose one of them.")
  try:
    state = _restore_needed(method, target, variables, ckpt_dir, step)
    if state is None:   # eval_variables needs more than whole arrays
      state = manager.restore(step, args=_composite(state=target)).state
  except (ValueError, KeyError, TypeError) as e:
    raise R2D2Error(
        f"The checkpoint at step {step} in {ckpt_dir} does not match the "
        f"config's state (method {cfg.method!r}, model {cfg.model.name!r}): "
        f"{e}. Pass the config the run was trained with.") from e
  networks = method.eval_variables(state)
  if variables not in networks:
    raise R2D2Error(
        f"variables={variables!r}: method {cfg.method!r} evaluates "
        f"{sorted(networks)}; choose one of them.")
  chosen = networks[variables]
  bn_stats = bn_stats or cfg.get("eval_bn_stats", "trained") or "trained"
  if bn_stats == "unlabeled":
    saved = (meta.get(BN_META) or {}).get(variables)
    if saved is None:
      raise R2D2Error(
          f"The checkpoint at step {step} in {ckpt_dir} has no re-estimated "
          f"BatchNorm statistics for {variables!r}: only checkpoints saved at "
          "an evaluation step of a run with eval_bn_stats='unlabeled' have "
          "them (the best checkpoint and the last step's). Load one of "
          "those, or pass bn_stats='trained' (--bn_stats=trained) for the "
          "running averages.")
    chosen = dict(chosen, batch_stats=traverse_util.unflatten_dict(
        {k: jnp.asarray(v, jnp.float32) for k, v in saved.items()}, sep="/"))
  return Predictor(
      info=info, class_names=class_names(cfg, info),
      variables=chosen, variables_name=variables, net=net,
      config=cfg, stage=stage_name, step=step, total_steps=total_steps,
      weights=which, val_accuracy=val_acc, checkpoint_dir=ckpt_dir,
      batch_size=int(cfg.data.get("eval_batch_size", 500) or 500),
      bn_stats=bn_stats)


def _key_name(k: Any) -> str:
  for attr in ("name", "key", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _restore_target(abstract: PyTree, saved: PyTree, ckpt_dir: str,
                    step: int) -> PyTree:
  """`abstract`'s structure with each leaf's shape and dtype as saved.

  Leaves are matched by their path of field names / keys / indices; all go
  to this process's first device.
  """
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  saved_leaves = {tuple(_key_name(k) for k in path): leaf for path, leaf in
                  jax.tree_util.tree_flatten_with_path(saved)[0]}
  paths, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  out = []
  for path, _ in paths:
    name = tuple(_key_name(k) for k in path)
    if name not in saved_leaves:
      raise R2D2Error(
          f"The checkpoint at step {step} in {ckpt_dir} has no "
          f"{'.'.join(name)!r}, which this config's state has (different "
          "method or model?). Pass the config the run was trained with.")
    m = saved_leaves[name]
    out.append(jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device))
  return jax.tree_util.tree_unflatten(treedef, out)


def _eval_names(method, target: PyTree) -> list[str] | None:
  """The names of `method.eval_variables`, from the abstract state (None: unknown)."""
  try:
    return list(method.eval_variables(target))
  except Exception:  # pylint: disable=broad-except
    return None       # it computes on the arrays: ask after restoring


def _restore_needed(method, target: PyTree, variables: str, ckpt_dir: str,
                    step: int) -> PyTree | None:
  """The state with only the arrays `eval_variables(...)[variables]` reads.

  The arrays that network's variables are made of (found by identity on the
  abstract state `target`) are restored; every other leaf (optimizer state,
  per-example tables, a frozen teacher, ...) stays a `jax.ShapeDtypeStruct`.
  Returns None when that cannot be told (the method computes its variables
  rather than picking arrays, or one sits under a list); the caller then
  restores everything.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    chosen = method.eval_variables(target)[variables]
  except Exception:  # pylint: disable=broad-except
    return None
  wanted = {id(x) for x in jax.tree.leaves(chosen)}
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  item: dict[str, Any] = {}
  names = []
  for path, leaf in paths:
    if id(leaf) not in wanted:
      names.append(None)
      continue
    if not all(isinstance(k, (jax.tree_util.GetAttrKey, jax.tree_util.DictKey))
               for k in path):
      return None
    name = tuple(_key_name(k) for k in path)
    node = item
    for k in name[:-1]:
      node = node.setdefault(k, {})
    node[name[-1]] = leaf
    names.append(name)
  if not item:
    return None
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
        paths_lib.join(ckpt_dir, str(step), "state"),
        args=ocp.args.PyTreeRestore(
            item=item, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item)))
  leaves = []
  for name, (_, leaf) in zip(names, paths):
    if name is None:
      leaves.append(leaf)
      continue
    node = restored
    for k in name:
      node = node[k]
    leaves.append(node)
  state = jax.tree_util.tree_unflatten(treedef, leaves)
  got = method.eval_variables(state)[variables]
  if any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(got)):
    return None
  return state


def class_names(config: ml_collections.ConfigDict,
                info: sources.DatasetInfo) -> tuple[str, ...] | None:
  """The dataset's class names: the known table, else a prepared tfds builder's."""
  if info.name in CLASS_NAMES:
    return CLASS_NAMES[info.name]
  if not info.tfds_name:
    return None
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = tfds.builder(info.tfds_name,
                           data_dir=config.data.get("data_dir") or None)
    if not builder.is_prepared():
      return None
    names = tuple(builder.info.features["label"].names)
  except Exception:  # pylint: disable=broad-except
    return None       # names are a convenience: indices do as well
  return names if len(names) == info.num_classes else None


# ---------------------------------------------------------------------------
# Config and stages


def _tuples(value: Any) -> Any:
  """JSON lists back to the tuples configs use."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """A config file 'configs/NAME.py[:variant]' (its `get_config`), or a JSON dump."""
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise R2D2Error(f"--config={path!r}: no such file.")
  if file.endswith(".json"):
    with open(file) as f:
      return ml_collections.ConfigDict(_tuples(json.load(f)))
  spec = importlib.util.spec_from_file_location("_predict_config", file)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg) if arg else mod.get_config()


def _run_config(workdir: str, config: ml_collections.ConfigDict | str | None
                ) -> ml_collections.ConfigDict | None:
  if isinstance(config, str):
    return load_config_file(config)
  if config is not None:
    return config
  path = paths_lib.join(workdir, CONFIG_FILE)
  text = paths_lib.read_text(path)
  if text is not None:
    try:
      return ml_collections.ConfigDict(_tuples(json.loads(text)))
    except (ValueError, TypeError) as e:
      raise R2D2Error(f"{path} is not a config dump ({e}); pass --config."
                      ) from e
  return None


def _isdir(p: str) -> bool:
  """A folder, local or under gs:// (an object prefix)."""
  return paths_lib.path(p).is_dir()


def stages_of(workdir: str) -> list[str]:
  """The sub-folders of `workdir` that hold a stage's checkpoints, sorted."""
  return sorted(d.name for d in paths_lib.path(workdir).iterdir()
                if _isdir(paths_lib.join(workdir, d.name, "checkpoints")))


def _check_has_checkpoints(workdir: str) -> None:
  """Raises unless `workdir` has checkpoints/ or stage folders with one."""
  if not (_isdir(paths_lib.join(workdir, "checkpoints")) or
          stages_of(workdir)):
    raise R2D2Error(
        f"No checkpoint in {workdir}: it has neither checkpoints/ (a "
        "single-stage run) nor stage folders with checkpoints/ (a staged "
        "run). Point --workdir at the folder given to training.")


def _choose_stage(workdir: str, stage: str | None,
                  config: ml_collections.ConfigDict | None
                  ) -> tuple[str, str]:
  """(stage name, stage folder); ('', workdir) for a single-stage run."""
  single = _isdir(paths_lib.join(workdir, "checkpoints"))
  found = stages_of(workdir)
  if single and not (config is not None and config.get("stages")):
    if stage:
      raise R2D2Error(
          f"--stage={stage!r}, but {workdir} is a single-stage run (its "
          "checkpoints are in checkpoints/). Leave --stage out.")
    return "", workdir
  order = (list(config.stage_order) if config is not None and
           config.get("stages") else [])
  ordered = [s for s in order if s in found] + [s for s in found
                                                if s not in order]
  if not ordered:
    _check_has_checkpoints(workdir)    # raises unless single
    raise R2D2Error(
        f"{workdir} is a single-stage run (checkpoints/), but the config is "
        f"staged ({order}). Pass the config the run was trained with.")
  if stage is None:
    in_order = [s for s in order if s in found]
    if in_order:
      stage = in_order[-1]          # the last stage that ran
    elif len(ordered) == 1:
      stage = ordered[0]
    else:
      raise R2D2Error(
          f"{workdir} is a staged run with stages {ordered}; without its "
          "config their order is unknown. Choose one with --stage.")
  if stage not in found:
    raise R2D2Error(
        f"--stage={stage!r}: {workdir} has no such stage with checkpoints. "
        f"Its stages: {ordered}.")
  return stage, paths_lib.join(workdir, stage)


# ---------------------------------------------------------------------------
# Image files


def image_paths(patterns: Sequence[str]) -> list[str]:
  """Image files named by paths, folders (their PNG/JPEG files) and globs.

  Raises:
    R2D2Error: when nothing matches.
  """
  out = []
  for pattern in patterns:
    if os.path.isdir(pattern):
      out += sorted(os.path.join(pattern, f) for f in os.listdir(pattern)
                    if f.lower().endswith(IMAGE_SUFFIXES))
    elif glob.has_magic(pattern):
      out += sorted(p for p in glob.glob(pattern, recursive=True)
                    if os.path.isfile(p))
    elif os.path.isfile(pattern):
      out.append(pattern)
  if not out:
    raise R2D2Error(
        f"--images {' '.join(patterns)}: no image files match (give files, "
        "folders of PNG/JPEG files or a quoted glob such as 'imgs/*.png').")
  return out


def load_image(path: str, image_shape: Sequence[int],
               center_crop: float | None = None) -> np.ndarray:
  """One image file as uint8 [H, W, C] for the network.

  Read with Pillow, converted to grayscale ('L') for one channel or RGB for
  three, optionally centre-cropped to `center_crop` of its shorter side (the
  ImageNet evaluation crop), and resized to (H, W) with Pillow's bilinear
  filter (antialiased when shrinking) if its size differs.

  Raises:
    R2D2Error: naming the file when Pillow cannot read it.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  h, w, c = image_shape
  try:
    with Image.open(path) as im:
      im = im.convert("L" if c == 1 else "RGB")
      if center_crop:
        side = max(1, int(round(center_crop * min(im.size))))
        left, top = (im.size[0] - side) // 2, (im.size[1] - side) // 2
        im = im.crop((left, top, left + side, top + side))
      if im.size != (w, h):
        im = im.resize((w, h), Image.BILINEAR)
      arr = np.asarray(im, np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise R2D2Error(f"Cannot read the image {path}: {e}. Remove it or give "
                    "a PNG or JPEG file.") from e
  return arr.reshape(h, w, c)


def load_images(paths: Sequence[str], predictor: Predictor) -> np.ndarray:
  """Image files as uint8 [N, H, W, C] for `predictor` (see `load_image`).

  A streamed dataset's network (ImageNet) gets its evaluation crop, the
  central 87.5% of the shorter side; other datasets' images are resized
  whole.
  """
  crop = None
  if not predictor.info.in_memory:
    from r2d2_jax.data import imagenet  # pylint: disable=g-import-not-at-top
    crop = imagenet.EVAL_CROP_FRACTION
  shape = predictor.image_shape
  if not paths:
    return np.zeros((0, *shape), np.uint8)
  return np.stack([load_image(p, shape, crop) for p in paths])
