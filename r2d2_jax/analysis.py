"""Reading a finished run back: its networks, their features, its logged curves.

For notebooks and result scripts: nothing here trains. The evaluation
summaries (`final`, `median_last`, `at_best`) read a stage's
`eval_history.jsonl` (one row per evaluation, see `metrics.EvalHistory`).
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import metrics as metrics_lib
from r2d2_jax import models
from r2d2_jax.data import sources
from r2d2_jax.data import views


def load_variables(stage_dir: str, ema: bool = False) -> dict[str, Any]:
  """The network variables ({'params', 'batch_stats', ...}) of a run's last checkpoint."""
  state, _ = ckpt_lib.restore_raw(stage_dir)
  if "student" in state:
    state = state["student"]
  prefix = "ema_" if ema else ""
  return {"params": state[f"{prefix}params"], **state[f"{prefix}model_state"]}


def predict(config: ml_collections.ConfigDict, variables: dict[str, Any],
            images: np.ndarray, batch_size: int = 1000
            ) -> tuple[np.ndarray, np.ndarray]:
  """Eval-mode logits and penultimate features of uint8 images.

  Args:
    config: the run's config (model and dataset).
    variables: from `load_variables`.
    images: uint8 [N, H, W, C].
    batch_size: images per forward pass.

  Returns:
    (logits [N, classes], features [N, D]) as numpy arrays.
  """
  info = sources.get_info(config.data.dataset, config.data)
  model = models.get_model(config.model.name, info.num_classes,
                           **dict(config.model.get("kwargs", {})))

  @jax.jit
  def fwd(x):
    return model.apply(variables, views.normalize(x, info), train=False,
                       return_features=True)

  out = [jax.device_get(fwd(jnp.asarray(images[i:i + batch_size])))
         for i in range(0, len(images), batch_size)]
  return (np.concatenate([o[0] for o in out]),
          np.concatenate([o[1] for o in out]))


def read_scalars(workdir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every scalar a run wrote to its TensorBoard event files.

  Reads the files without TensorFlow (`metrics.read_events`), both the tensor
  scalars `metrics.EventFileWriter` and `tf.summary` write and the older
  `simple_value` ones; `workdir` may be any path `etils.epath` opens.

  Returns:
    {name: (steps, values)} sorted by step.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  series: dict[str, list[tuple[int, float]]] = {}
  paths = sorted(epath.Path(workdir).glob(f"{metrics_lib.EVENTS_PREFIX}*"),
                 key=str)
  for path in paths:
    for event in metrics_lib.read_events(path):
      for v in event.summary.value:
        if v.HasField("tensor"):
          array = tensor_util.make_ndarray(v.tensor)
          if array.ndim or not np.issubdtype(array.dtype, np.number):
            continue  # hparams and text, not scalars
          value = float(array)
        elif v.HasField("simple_value"):
          value = float(v.simple_value)
        else:
          continue
        series.setdefault(v.tag, []).append((event.step, value))
  out = {}
  for tag, pts in series.items():
    pts.sort()
    out[tag] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
  return out


# ---------------------------------------------------------------------------
# Evaluation summaries (the protocol of docs/algorithms.md, "Evaluation
# protocol")


def eval_history(stage_dir: str) -> list[dict[str, float]]:
  """Every evaluation of a stage, in step order: [{'step', 'time', metric: value}]."""
  return metrics_lib.read_history(
      os.path.join(stage_dir, metrics_lib.EVAL_HISTORY))


def final(history: list[dict[str, float]], key: str) -> float:
  """`key` at the last evaluation (nan if there is none)."""
  return float(history[-1][key]) if history and key in history[-1] else math.nan


def median_last(history: list[dict[str, float]], key: str,
                n: int = 20) -> float:
  """Median of `key` over the last `n` evaluations (FixMatch's protocol).

  nan if the history has fewer than `n` evaluations with `key`: the figure is
  then not the protocol's.
  """
  values = [r[key] for r in history if key in r]
  if len(values) < n:
    return math.nan
  return float(np.median(values[-n:]))


def at_best(history: list[dict[str, float]], select: str, report: str) -> float:
  """`report` at the evaluation where `select` is highest; ties go to the latest.

  E.g. `at_best(h, 'accuracy/val/raw', 'accuracy/test/raw')`: the test
  accuracy of the raw weights at their best validation step. A tie goes to the
  latest evaluation, as an early-stopping rule that keeps a checkpoint when
  the validation accuracy improves or equals (small validation sets tie
  often). nan if no evaluation has `select` (no validation set).
  """
  rows = [r for r in history if select in r and report in r]
  if not rows:
    return math.nan
  best = max(r[select] for r in rows)
  return float([r for r in rows if r[select] == best][-1][report])
