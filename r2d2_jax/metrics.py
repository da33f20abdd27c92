"""Metric writing (clu), the evaluation history, progress and the non-finite check.

Only process 0 writes summaries (TensorBoard event files in the workdir), the
evaluation history (`eval_history.jsonl`) and progress (bar and console
lines); other processes only log, and `main.py` sets their verbosity to
WARNING. Train metrics are fetched to the host one step late, so the device
queue never drains, and averaged over each log interval.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import TYPE_CHECKING, Any, Mapping

import jax
import numpy as np
from absl import logging

if TYPE_CHECKING:
  from clu import metric_writers

from r2d2_jax.errors import NonFiniteError, R2D2Error


def create_writer(workdir: str) -> metric_writers.MetricWriter:
  # clu (and through it TensorFlow) is imported when a writer is made, not
  # with this module: the step-time benchmarks import the trainer without TF.
  from clu import metric_writers  # pylint: disable=g-import-not-at-top,redefined-outer-name
  return metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0, asynchronous=False)


def check_finite(metrics: Mapping[str, Any], step: int,
                 checkpoint_note: str) -> None:
  """Raises `NonFiniteError` naming the first non-finite metric."""
  for name in sorted(metrics):
    value = np.asarray(metrics[name])
    if not np.all(np.isfinite(value)):
      raise NonFiniteError(
          f"Training stopped: metric {name!r} is {value} at step {step}. "
          f"{checkpoint_note} Lower the learning rate, check the data, or "
          "enable gradient clipping (optimizer.grad_clip_norm).")


class Averager:
  """Host-side running means of scalar metrics over one log interval."""

  def __init__(self):
    self._sums: dict[str, float] = {}
    self._count = 0

  def add(self, metrics: Mapping[str, Any]) -> None:
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(np.mean(v))
    self._count += 1

  def result(self) -> dict[str, float]:
    out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
    self._sums, self._count = {}, 0
    return out


class Progress:
  """Steps/s and ETA to the writer, and a progress bar on an interactive terminal.

  The bar and the console lines come from process 0 only.

  Args:
    total_steps: last step of the run.
    start_step: step the run starts (or resumes) at.
    writer: where 'steps_per_sec' goes.
    description: text before the bar, e.g. the stage name.
  """

  def __init__(self, total_steps: int, start_step: int,
               writer: metric_writers.MetricWriter, description: str = ""):
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    self._report = periodic_actions.ReportProgress(
        num_train_steps=total_steps, writer=writer, every_secs=60)
    self._bar = None
    self._chief = jax.process_index() == 0
    if self._chief and sys.stderr.isatty():
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step,
                            desc=description, dynamic_ncols=True)
    self._total = total_steps
    self._start = start_step
    self._t0 = time.time()
    self._description = description

  def update(self, step: int) -> None:
    self._report(step)
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def log_line(self, step: int, scalars: Mapping[str, float]) -> None:
    """A one-line summary with rate and ETA, for non-interactive logs."""
    if not self._chief:
      return
    done = step - self._start
    rate = done / max(time.time() - self._t0, 1e-9)
    eta = (self._total - step) / rate if rate > 0 else math.inf
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())
                      if k.startswith(("losses/total", "accuracy/")))
    msg = (f"{self._description} step {step}/{self._total} "
           f"({rate:.2f} steps/s, ETA {eta:.0f}s) {shown}")
    if self._bar is not None:
      self._bar.write(msg)
    else:
      logging.info(msg)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


EVAL_HISTORY = "eval_history.jsonl"


def read_history(path: str) -> list[dict[str, float]]:
  """The rows of an evaluation history file, in order (none if it is missing).

  A last line cut short by a kill mid-write is skipped; a bad line before the
  last is an `R2D2Error` (the file was edited or damaged otherwise).
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return _parse_history(f.read(), path)


def _parse_history(text: str, path: str) -> list[dict[str, float]]:
  """The rows of a history file's `text` (see `read_history`; `path` for errors)."""
  lines = [line for line in text.split("\n") if line.strip()]
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if i < len(lines) - 1:
        raise R2D2Error(
            f"{path}, line {i + 1}, is not JSON ({e}): the evaluation history "
            "was damaged or edited. Move it away to start it afresh (the "
            "run's checkpoints are not affected).") from e
      # The last line: a write cut short by a kill; the run redoes it.
  return rows


class EvalHistory:
  """Every evaluation's metrics, one JSON object a line, in the stage's workdir.

  Each row is {'step': k, 'time': unix seconds, metric: value, ...}. A run
  resumed from a checkpoint at step k redoes the steps after k, so `resume(k)`
  first drops the rows with step > k (and a line cut short by a kill): the
  file then equals that of an uninterrupted run, up to the times. Rows are
  appended one whole line per write and flushed to disk; earlier lines are
  never rewritten except by `resume`, which replaces the file atomically.
  Only process 0 writes.

  Args:
    workdir: the stage's folder.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, EVAL_HISTORY)
    self._chief = jax.process_index() == 0

  def resume(self, step: int) -> None:
    """Keeps only the rows of steps <= `step` (the step the run restarts from)."""
    if not self._chief or not os.path.exists(self.path):
      return
    with open(self.path) as f:
      text = f.read()
    rows = _parse_history(text, self.path)
    kept = [r for r in rows if r["step"] <= step]
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    if body == text:
      return
    tmp = f"{self.path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      f.write(body)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)

  def append(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self._chief:
      return
    row = {"step": int(step), "time": time.time(),
           **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
      f.flush()
      os.fsync(f.fileno())
