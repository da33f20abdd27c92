"""The training loop: a library function you can call from a notebook.

`train_and_evaluate(config, workdir)` runs an experiment: a single stage, or a
pipeline of stages (e.g. supervised → D2 → R2 → finetune) each in its own
sub-folder of `workdir` and each starting from the previous stage's checkpoint.
Re-running the same call resumes: a finished stage is skipped, an interrupted
one continues from its last checkpoint.

Resume order for one stage (as in big_vision): the stage's own checkpoint, then
`init_from` (another run's checkpoint), then scratch.
"""

from __future__ import annotations

import copy
import functools
import signal
import threading
import time
from typing import Any

import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from r2d2_jax import bn_stats
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import losses
from r2d2_jax import metrics as metrics_lib
from r2d2_jax import models
from r2d2_jax import optim
from r2d2_jax import paths
from r2d2_jax import sharding
from r2d2_jax.data import interface
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.data.views import normalize, prepare_batch, view_specs
from r2d2_jax.errors import Preempted, R2D2Error
from r2d2_jax.methods import HookContext, Network, Task, get_method
from r2d2_jax.methods.base import bind

PyTree = Any


# ---------------------------------------------------------------------------
# One stage


def resolve_total_steps(config: ml_collections.ConfigDict,
                        steps_per_epoch: int) -> int:
  """`total_steps`, or `total_epochs` × steps per epoch of the unlabeled set."""
  if config.get("total_epochs"):
    return int(round(config.total_epochs * steps_per_epoch))
  if not config.get("total_steps"):
    raise R2D2Error("Set config.total_steps or config.total_epochs.")
  return int(config.total_steps)


def _every(config: ml_collections.ConfigDict, name: str, total: int) -> int:
  v = int(config.get(name, 0) or 0)
  return v if v > 0 else total


def _preemption_sync_available() -> bool:
  """Whether jax's preemption sync manager can tell every process the same step.

  It exists (`multihost_utils.reached_preemption_sync_point`) when
  `jax.distributed` is initialised with `jax_enable_preemption_service` (the
  default); it then catches SIGTERM itself, in C++.
  """
  if jax.process_count() <= 1:
    return False
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  state = distributed.global_state
  return (hasattr(multihost_utils, "reached_preemption_sync_point") and
          getattr(state, "client", None) is not None and
          getattr(state, "preemption_sync_manager", None) is not None)


class PreemptionWatch:
  """Turns SIGTERM (a preemption notice) into a stop at a step boundary.

  Single process (or several without jax's preemption service): a SIGTERM
  handler that only sets `requested`; the previous handler is put back by
  `restore()`. Several processes with the preemption service: jax's own handler
  stays, and `reached(step)` is `reached_preemption_sync_point(step)`, True on
  every process at the same step. It must then be called at every step.
  """

  def __init__(self):
    self.requested = False
    self.sync = _preemption_sync_available()
    self._previous = None
    self._installed = False

  def install(self) -> "PreemptionWatch":
    if self.sync:
      logging.info("Preemption: jax's preemption sync point decides the step.")
    elif threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
      self._installed = True
      if jax.process_count() > 1:
        logging.warning(
            "Preemption: %d processes but no jax preemption service; each "
            "process stops at the step at which it sees SIGTERM.",
            jax.process_count())
    return self

  def restore(self) -> None:
    if self._installed:
      previous = self._previous
      # None: the previous handler was not set from Python; use the default.
      signal.signal(signal.SIGTERM,
                    signal.SIG_DFL if previous is None else previous)
      self._installed = False

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (call once per step)."""
    if self.sync:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return bool(multihost_utils.reached_preemption_sync_point(step))
    return self.requested


def _preempted(step: int, stage_name: str) -> Preempted:
  message = (f"Preempted at step {step} of {stage_name or 'the run'}; saved; "
             "rerun the same command to resume.")
  logging.warning(message)
  return Preempted(message, step, stage_name)


class Stage:
  """Everything built for one stage: mesh, data, model, compiled functions.

  Building it does no training; `run()` does. Tests and notebooks use the parts
  (e.g. `stage.train_step`, `stage.evaluate`). Every evaluation covers the
  test split and, when `data.num_val` > 0, the validation split; its metrics
  go to TensorBoard and to `eval_history.jsonl` in the workdir.

  Args:
    config: the stage's config.
    workdir: the stage's folder (checkpoints, split, summaries).
    mesh: device mesh (default: all devices).
    pipeline: a prebuilt input pipeline (default: from `config.data`).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str,
               mesh: jax.sharding.Mesh | None = None,
               pipeline: interface.Pipeline | None = None):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh or sharding.make_mesh()
    self.method = get_method(config.method)
    self.pipeline = pipeline or pipeline_lib.make_pipeline(
        config.data, config.seed, self.mesh, workdir)
    self.info = self.pipeline.info
    model_kwargs = dict(config.model.get("kwargs", {}))
    if config.model.get("dtype"):
      model_kwargs["dtype"] = models.compute_dtype(config.model.dtype)
    try:
      model = models.get_model(config.model.name, self.info.num_classes,
                               **model_kwargs)
    except ValueError as e:
      raise R2D2Error(str(e)) from None
    self.total_steps = resolve_total_steps(config,
                                           self.pipeline.steps_per_epoch())
    tx, schedule = optim.make_optimizer(config.optimizer, self.total_steps)
    self.net = Network(model=model, tx=tx, schedule=schedule,
                       image_shape=self.info.image_shape,
                       ema_decay=float(config.get("ema_decay", 0.0) or 0.0))
    self.task = Task(
        num_classes=self.info.num_classes, num_train=self.pipeline.num_train,
        total_steps=self.total_steps,
        steps_per_epoch=self.pipeline.steps_per_epoch(), mesh=self.mesh,
        labeled_index=self.pipeline.split.labeled,
        unlabeled_index=self.pipeline.split.unlabeled,
        train_labels=self.pipeline.train_labels)
    # Parsed and validated once: a bad hyperparameter fails here, by name.
    # (`hparams(config, *, task)` may read the task, e.g. total_steps for a
    # second optimizer's schedule.)
    self.hp = bind(self.method.hparams, task=self.task)(config)
    named = dict(net=self.net, task=self.task, hp=self.hp)
    self._method_init_from = bind(self.method.init_from, **named)

    key = jax.random.key(config.seed)
    self._init_key, self._step_key, self._aug_key = jax.random.split(key, 3)
    init_fn = bind(self.method.init_state, **named)
    abstract = jax.eval_shape(init_fn, self._init_key)
    self.state_shardings = self.method.state_sharding(abstract, self.mesh)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract, self.state_shardings)
    self._init = jax.jit(init_fn, out_shardings=self.state_shardings)

    specs = view_specs(self.method.views(self.hp), config.data.augment,
                       self.info, method=self.method.name,
                       augment_state=self.method.augment_state(abstract))
    self.streams = tuple(specs)
    method, info = self.method, self.info
    method_step = bind(method.train_step, **named)
    step_key, aug_key = self._step_key, self._aug_key

    def train_step(state, batch):
      step = state.step
      rng = jax.random.fold_in(step_key, step)
      prepared = prepare_batch(batch, aug_key, step, specs, info,
                               augment_state=method.augment_state(state))
      return method_step(state, prepared, rng)

    repl = sharding.replicated(self.mesh)
    self.train_step = jax.jit(
        train_step,
        in_shardings=(self.state_shardings, sharding.batch_sharding(self.mesh)),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))

    eval_batch_size = config.data.get("eval_batch_size", 500)
    # What hooks see of the stage (e.g. R2-D2's reprediction).
    self.hooks = HookContext(
        net=self.net, task=self.task, hp=self.hp, mesh=self.mesh,
        state_shardings=self.state_shardings, total_steps=self.total_steps,
        log_every=_every(config, "log_every_steps", self.total_steps),
        eval_batches=lambda split: self.pipeline.eval_batches(
            split, eval_batch_size),
        normalize=lambda images: normalize(images, info))
    net = self.net

    top5 = info.num_classes > 5

    def eval_step(networks, batch):
      # Sums over the batch's real rows; `evaluate` divides by their count.
      x = normalize(batch["image"], info)
      mask = batch["mask"].astype(jnp.float32)
      label = batch["label"]
      out = {"count": jnp.sum(mask)}
      for name, variables in networks.items():
        logits = net.apply_eval(variables, x)
        correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
        out[f"accuracy/{name}"] = jnp.sum(correct * mask)
        if top5:
          _, best = jax.lax.top_k(logits, 5)
          hit = jnp.any(best == label[:, None], -1).astype(jnp.float32)
          out[f"top5/{name}"] = jnp.sum(hit * mask)
        out[f"losses/eval_xe/{name}"] = losses.cross_entropy(
            logits, label, mask) * mask.shape[0]
      return out

    self._eval_step = jax.jit(eval_step, out_shardings=repl)

    # Which BatchNorm statistics the evaluations use (docs/algorithms.md).
    self.eval_bn_stats = config.get("eval_bn_stats", "trained") or "trained"
    if self.eval_bn_stats not in ("trained", "unlabeled"):
      raise R2D2Error(
          f"eval_bn_stats={self.eval_bn_stats!r}: use 'trained' (the running "
          "averages kept in training) or 'unlabeled' (re-estimated on the "
          "unlabeled pool at every evaluation).")
    if self.eval_bn_stats == "unlabeled":
      if not hasattr(self.pipeline, "unlabeled_batches"):
        raise R2D2Error(
            "eval_bn_stats='unlabeled' needs an in-memory dataset (its "
            f"pipeline, {type(self.pipeline).__name__}, cannot re-read the "
            "unlabeled pool).")
      self.eval_bn_batch_size = int(
          config.get("eval_bn_batch_size", 0) or
          self.pipeline.unlabeled_batch_size or self.pipeline.batch_size)
      stats_fn = bn_stats.batch_stats_fn(model)
      self._bn_stats_step = jax.jit(
          lambda variables, batch: stats_fn(
              variables, normalize(batch["image"], info)),
          out_shardings=repl)

  # -- state ----------------------------------------------------------------

  def init_state(self) -> PyTree:
    """A fresh state, created directly on its shardings."""
    return self._init(self._init_key)

  def eval_networks(self, state: PyTree) -> dict[str, PyTree]:
    """The method's `eval_variables`, with BN statistics per `eval_bn_stats`.

    With 'unlabeled', each network's `batch_stats` are replaced by its
    population statistics over the unlabeled pool (`bn_stats`; a fixed
    shuffle seeded by the config's seed, in full batches of
    `eval_bn_batch_size`, default the unlabeled batch). The state is not
    changed: training and checkpoints keep the running averages.
    """
    networks = self.method.eval_variables(state)
    if self.eval_bn_stats == "trained":
      return networks
    out = {}
    for name, variables in networks.items():
      if "batch_stats" not in variables:
        raise R2D2Error(
            f"eval_bn_stats='unlabeled': network {name!r} has no BatchNorm "
            "statistics.")
      per_batch = (
          (self.eval_bn_batch_size, self._bn_stats_step(variables, batch))
          for batch in self.pipeline.unlabeled_batches(
              self.eval_bn_batch_size, self.config.seed))
      stats = bn_stats.combine(per_batch)
      out[name] = dict(variables, batch_stats=jax.device_put(
          stats, sharding.replicated(self.mesh)))
    return out

  def _bn_meta(self, networks: dict[str, PyTree]) -> dict[str, Any]:
    """{'eval_bn_stats': {name: {'layer/…/mean': [...], ...}}}, or {} ('trained').

    The statistics an evaluation used, as checkpoint metadata (JSON): float32
    values round-trip exactly through Python floats.
    """
    if self.eval_bn_stats == "trained":
      return {}
    return {BN_META: {
        name: {k: np.asarray(v, np.float32).tolist() for k, v in
               traverse_util.flatten_dict(
                   flax.core.unfreeze(jax.device_get(variables["batch_stats"])),
                   sep="/").items()}
        for name, variables in networks.items()}}

  def evaluate(self, state: PyTree, split: str = "test",
               networks: dict[str, PyTree] | None = None
               ) -> dict[str, float]:
    """Top-1, top-5 and CE of each evaluated network over a whole split, once.

    Args:
      state: the train state.
      split: 'test', 'val' (the validation rows of the train split) or 'train'.
      networks: `eval_networks(state)` when already computed (default: from
        `state`).

    Returns:
      {'accuracy/SPLIT/NAME', 'top5/SPLIT/NAME' (more than 5 classes only),
      'losses/eval_xe/SPLIT/NAME'} for each NAME of the method's
      `eval_variables` (raw, ema; MPL's teacher).
    """
    if networks is None:
      networks = self.eval_networks(state)
    sums: dict[str, float] = {}
    for batch in self.pipeline.eval_batches(
        split, self.config.data.get("eval_batch_size", 500)):
      for k, v in jax.device_get(self._eval_step(networks, batch)).items():
        sums[k] = sums.get(k, 0.0) + float(v)
    count = sums.pop("count")
    out = {}
    for k, v in sums.items():
      metric, name = k.rsplit("/", 1)
      out[f"{metric}/{split}/{name}"] = v / count
    return out

  @property
  def eval_splits(self) -> tuple[str, ...]:
    """What each evaluation covers: 'test', and 'val' when data.num_val > 0."""
    return tuple(getattr(self.pipeline, "eval_splits", ("test",)))

  def evaluate_all(self, state: PyTree,
                   networks: dict[str, PyTree] | None = None
                   ) -> dict[str, float]:
    """`evaluate` on every split of `eval_splits`, in one dict."""
    if networks is None:
      networks = self.eval_networks(state)
    out = {}
    for split in self.eval_splits:
      out.update(self.evaluate(state, split, networks))
    return out

  # -- the loop -------------------------------------------------------------

  def run(self, init_from: str | None = None,
          stage_name: str = "") -> dict[str, float]:
    """Trains to `total_steps`, resuming from this stage's checkpoint if any.

    On SIGTERM (a preemption notice) it finishes the current step, saves a
    checkpoint at that step, waits for the save and raises `Preempted`; the
    same call resumes from there and ends with the same state, bit for bit,
    as an uninterrupted run.

    Args:
      init_from: another run's checkpoint folder to start from when this stage
        has none of its own.
      stage_name: shown in logs.

    Returns:
      The final evaluation metrics.

    Raises:
      Preempted: after SIGTERM, once the checkpoint is saved.
    """
    watch = PreemptionWatch().install()
    try:
      final = self._run(watch, init_from, stage_name)
    finally:
      watch.restore()
    if watch.requested and not watch.sync:
      # SIGTERM after the last step's check: the stage is complete and saved;
      # stop anyway rather than start the next stage.
      raise _preempted(self.total_steps, stage_name)
    return final

  def _run(self, watch: PreemptionWatch, init_from: str | None,
           stage_name: str) -> dict[str, float]:
    """`run()` under a `PreemptionWatch`."""
    config, total = self.config, self.total_steps
    ckpt = ckpt_lib.Checkpointer(
        paths.join(self.workdir, "checkpoints"),
        max_to_keep=config.get("checkpoint_keep", 2),
        async_save=config.get("checkpoint_async", True))
    start = ckpt.latest_step()
    if start is not None:
      state, meta = ckpt.restore(start, self.abstract_state)
      if start >= total:
        logging.info("%s already complete at step %d.", stage_name or "Run",
                     start)
        ckpt.close()
        return meta.get("final_metrics") or self.evaluate_all(state)
      logging.info("Resuming %s from step %d.", stage_name or "run", start)
    else:
      start = 0
      state = self.init_state()
      if init_from:
        previous, _ = ckpt_lib.restore_raw(init_from)
        state = jax.device_put(
            self._method_init_from(state, previous),
            self.state_shardings)
        logging.info("Initialised %s from %s.", stage_name or "run", init_from)

    # The steps after `start` are redone: their old evaluations go.
    history = metrics_lib.EvalHistory(self.workdir)
    history.resume(start)
    best = _BestCheckpoint(self.workdir, config, start, total)
    writer = metrics_lib.create_writer(self.workdir)
    if start == 0:
      writer.write_hparams(_flat_hparams(config))
    progress = metrics_lib.Progress(total, start, writer, stage_name)
    log_every = self.hooks.log_every
    eval_every = _every(config, "eval_every_steps", total)
    ckpt_every = _every(config, "checkpoint_every_steps", total)
    averager = metrics_lib.Averager()

    def note():
      last = ckpt.latest_step()
      where = paths.join(self.workdir, "checkpoints")
      return (f"The last good checkpoint (step {last}) in {where} is kept."
              if last is not None else "No checkpoint had been saved yet.")

    pending = None  # (step, device metrics): fetched one step late.

    def flush():
      nonlocal pending
      if pending is not None:
        step, m = pending
        m = jax.device_get(m)
        metrics_lib.check_finite(m, step, note())
        averager.add(m)
        pending = None

    # The re-estimated BN statistics of the last evaluation (eval_bn_stats
    # 'unlabeled'): saved with a checkpoint of that step, for `inference`.
    bn_meta: tuple[int, dict] = (-1, {})

    def save(step):
      ckpt.save(step, state, {
          "step": step, "total_steps": total, "stage": stage_name,
          "final_metrics": final if step == total else None,
          "time": time.time(),
          **(bn_meta[1] if bn_meta[0] == step else {})})

    batches = self.pipeline.iterate(start, self.streams)
    final = {}
    try:
      for step in range(start + 1, total + 1):
        for hook in self.method.hooks:
          state, hook_metrics = hook(self.hooks, state, step - 1)
          if hook_metrics:
            writer.write_scalars(step - 1, hook_metrics)
        state, m = self.train_step(state, next(batches))
        flush()
        pending = (step, m)
        progress.update(step)
        if step % log_every == 0 or step == total:
          flush()
          scalars = averager.result()
          writer.write_scalars(step, scalars)
          progress.log_line(step, scalars)
        if step % eval_every == 0 or step == total:
          flush()
          networks = self.eval_networks(state)
          final = self.evaluate_all(state, networks)
          bn_meta = (step, self._bn_meta(networks))
          history.append(step, final)
          best.offer(step, state, final, stage_name, bn_meta[1])
          writer.write_scalars(step, final)
          progress.log_line(step, final)
        if step % ckpt_every == 0 or step == total:
          flush()
          save(step)
        if watch.reached(step):
          flush()  # a non-finite step raises here, before it is saved
          save(step)  # a no-op if this step was just saved
          ckpt.wait()
          raise _preempted(step, stage_name)
    finally:
      progress.close()
      writer.flush()
      ckpt.close()
      best.close()
    return final


BEST_CHECKPOINT = paths.BEST_CHECKPOINT
BEST_METRIC = "accuracy/val/raw"


class _BestCheckpoint:
  """The state at the evaluation with the best validation accuracy.

  `WORKDIR/best_checkpoint` holds one checkpoint: the state (raw and EMA
  weights alike) at the evaluation with the highest `accuracy/val/raw`, the
  headline's selection rule (ties: the later step; docs/algorithms.md,
  "Evaluation protocol"). Only with a validation split and
  `config.checkpoint_best` (default True). On resume the best so far is read
  back from `eval_history.jsonl` (rows up to the restart step).
  """

  def __init__(self, workdir: str, config: ml_collections.ConfigDict,
               start: int, total_steps: int):
    self.total_steps = total_steps
    self.enabled = bool(config.get("checkpoint_best", True)) and bool(
        config.data.get("num_val", 0))
    self._ckpt = None
    self.value = -float("inf")
    if not self.enabled:
      return
    self._ckpt = ckpt_lib.Checkpointer(
        paths.join(workdir, BEST_CHECKPOINT), max_to_keep=1,
        async_save=config.get("checkpoint_async", True))
    rows = metrics_lib.read_history(
        paths.join(workdir, metrics_lib.EVAL_HISTORY))
    for row in rows:
      if row["step"] <= start and BEST_METRIC in row:
        self.value = max(self.value, float(row[BEST_METRIC]))

  def offer(self, step: int, state: PyTree, metrics: dict[str, float],
            stage_name: str, extra_meta: dict[str, Any] | None = None) -> None:
    """Saves `state` if its validation accuracy is the best so far (or equal).

    `extra_meta` goes into the checkpoint's metadata (the evaluation's
    re-estimated BN statistics).
    """
    if not self.enabled or BEST_METRIC not in metrics:
      return
    value = float(metrics[BEST_METRIC])
    if value < self.value:
      return
    self.value = value
    latest = self._ckpt.latest_step()
    if latest is not None and step <= latest:
      # Saved before an interruption, at this step or later (the same state
      # is recomputed on resume): keep it.
      return
    self._ckpt.save(step, state, {"step": step, "stage": stage_name,
                                  "total_steps": self.total_steps,
                                  BEST_METRIC: value, "time": time.time(),
                                  **(extra_meta or {})})

  def close(self) -> None:
    if self._ckpt is not None:
      self._ckpt.close()


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """`WORKDIR/config.json`: the config of the last command (for inference)."""
  if jax.process_index() == 0:
    paths.write_text_atomic(paths.join(workdir, CONFIG_FILE),
                            config.to_json_best_effort(indent=1,
                                                       sort_keys=True))


CONFIG_FILE = paths.CONFIG_FILE
BN_META = paths.BN_META


def _flat_hparams(config: ml_collections.ConfigDict) -> dict[str, Any]:
  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, (dict, ml_collections.ConfigDict)):
        yield from flat(v, f"{prefix}{k}.")
      elif isinstance(v, (int, float, str, bool)):
        yield f"{prefix}{k}", v
      else:
        yield f"{prefix}{k}", str(v)
  return dict(flat(config.to_dict()))


# ---------------------------------------------------------------------------
# Stages


def stage_config(config: ml_collections.ConfigDict,
                 name: str) -> ml_collections.ConfigDict:
  """The config of one stage: the base config updated with its overrides."""
  base = copy.deepcopy(config.to_dict())
  overrides = config.stages[name].to_dict()
  for k in ("stages", "stage_order", "run_stages"):
    base.pop(k, None)
  overrides.pop("init_from_stage", None)

  def merge(dst, src):
    for k, v in src.items():
      if isinstance(v, dict) and isinstance(dst.get(k), dict):
        merge(dst[k], v)
      else:
        dst[k] = v
  merge(base, overrides)
  return ml_collections.ConfigDict(base)


def selected_stages(config: ml_collections.ConfigDict) -> list[str]:
  order = list(config.stage_order)
  missing = [s for s in order if s not in config.stages]
  if missing:
    raise R2D2Error(f"config.stage_order names {missing}, which have no entry "
                    f"in config.stages ({sorted(config.stages)}).")
  chosen = config.get("run_stages") or ""
  if not chosen:
    return order
  chosen = [s.strip() for s in chosen.split(",") if s.strip()]
  unknown = [s for s in chosen if s not in order]
  if unknown:
    raise R2D2Error(f"config.run_stages names unknown stages {unknown}; this "
                    f"config's stages are {order}.")
  return [s for s in order if s in chosen]


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Runs an experiment: one stage, or every selected stage in order.

  Args:
    config: the experiment config (see configs/).
    workdir: where checkpoints, the split and summaries go: a local folder
      or a Cloud Storage URL (gs://BUCKET/PATH; needs gcsfs, the `gcs`
      extra). Re-running with the same workdir resumes.

  Returns:
    The final evaluation metrics; for staged configs {stage: metrics}.
  """
  # A local folder every process sees (one host's disk; NFS, Filestore or a
  # gcsfuse mount on a pod) or a gs:// URL; any other URL is refused here.
  workdir = paths.check(workdir)
  paths.makedirs(workdir)
  _write_config(config, workdir)
  if not config.get("stages"):
    return Stage(config, workdir).run(init_from=config.get("init_from"))
  results = {}
  previous = config.get("init_from")
  chosen = selected_stages(config)
  for name in config.stage_order:
    stage_dir = paths.join(workdir, name)
    if name in chosen:
      cfg = stage_config(config, name)
      if "label_cache" in cfg.data and not cfg.data.label_cache:
        # Streamed datasets scan their labels once for the whole pipeline.
        cfg.data.label_cache = paths.join(workdir, "train_labels.npz")
      start = _stage_init_from(config, name, previous, workdir)
      results[name] = Stage(cfg, stage_dir).run(init_from=start,
                                                stage_name=name)
    previous = paths.join(stage_dir, "checkpoints")
  return results


def _stage_init_from(config: ml_collections.ConfigDict, name: str,
                     previous: str | None, workdir: str) -> str | None:
  """Where stage `name` starts: its `init_from_stage`, else the previous stage.

  `config.stages[name].init_from_stage` may be 'none' (from scratch: e.g. an
  MPL teacher and student trained beside an R2-D2 pipeline in one config) or
  the name of an earlier stage (e.g. a finetune that follows that stage).
  """
  which = config.stages[name].get("init_from_stage")
  if which is None:
    return previous
  if which == "none":
    return None
  order = list(config.stage_order)
  if which not in order[:order.index(name)]:
    raise R2D2Error(
        f"config.stages.{name}.init_from_stage is {which!r}; use 'none' or one "
        f"of the stages before {name!r}: {order[:order.index(name)]}.")
  return paths.join(workdir, which, "checkpoints")
