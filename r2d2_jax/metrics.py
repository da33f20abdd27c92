"""Metric writing, the evaluation history, progress and the non-finite check.

Only process 0 writes summaries (TensorBoard event files in the workdir), the
evaluation history (`eval_history.jsonl`) and progress (bar and console
lines); other processes only log, and `main.py` sets their verbosity to
WARNING. Train metrics are fetched to the host one step late, so the device
queue never drains, and averaged over each log interval.

The event files are written here, without TensorFlow: the records are
TensorBoard's own protos (`tensorboard.compat.proto`, the summaries of its
scalar, text and hparams plugins) in TFRecord framing, as `tf.summary` writes
them, so TensorBoard, `tf.compat.v1.train.summary_iterator` and
`analysis.read_scalars` read them alike. Files are opened through
`etils.epath`, so a workdir can be any path epath opens (a local folder,
`gs://...`).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import socket
import struct
import sys
import time
from typing import Any, Iterator, Mapping

import jax
import numpy as np
from absl import logging

from r2d2_jax import paths
from r2d2_jax.errors import NonFiniteError, R2D2Error

EVENTS_PREFIX = "events.out.tfevents"
_FILE_IDS = itertools.count()


def _masked_crc32c(data: bytes) -> int:
  # TFRecord's masked CRC-32C (tensorboard's pure-Python one).
  from tensorboard.compat.tensorflow_stub import pywrap_tensorflow  # pylint: disable=g-import-not-at-top
  return pywrap_tensorflow.masked_crc32c(data)


def _record(data: bytes) -> bytes:
  """`data` framed as one TFRecord: length, its CRC, the data, its CRC."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", _masked_crc32c(header)) + data +
          struct.pack("<I", _masked_crc32c(data)))


def _is_local(path: str) -> bool:
  return "://" not in path


class EventFileWriter:
  """TensorBoard summaries of one run into a new event file in `logdir`.

  The file is `events.out.tfevents.<time>.<host>.<pid>.<n>.v2`, as
  `tf.summary.create_file_writer` names it; a resumed run starts a new file
  beside the old ones, and TensorBoard reads them all. Writes are buffered
  and go to the file on `flush()`, `close()`, or when a write comes more
  than `flush_secs` after the last flush. A local file is appended to; a
  remote one (a path with '://', e.g. gs://, whose stores cannot append) is
  rewritten whole on each flush.

  Args:
    logdir: the folder (created if missing); any path `etils.epath` opens.
    flush_secs: the longest a write waits in the buffer while writes come.
      None: 30 s for a local folder, 120 s for a remote one.
  """

  def __init__(self, logdir: str, flush_secs: float | None = None):
    from etils import epath  # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    self._event_pb2 = event_pb2
    logdir = os.fspath(logdir)
    self._local = _is_local(logdir)
    folder = epath.Path(logdir)
    folder.mkdir(parents=True, exist_ok=True)
    name = (f"{EVENTS_PREFIX}.{int(time.time())}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_FILE_IDS)}.v2")
    self.path = folder / name
    self._flush_secs = (flush_secs if flush_secs is not None
                        else 30.0 if self._local else 120.0)
    self._pending = bytearray()
    self._written = bytearray()  # a remote file's whole body so far
    self._last_flush = time.monotonic()
    self._closed = False
    self._add(event_pb2.Event(wall_time=time.time(),
                              file_version="brain.Event:2"))
    self.flush()  # the file exists from the start, as TensorBoard expects

  def _add(self, event) -> None:
    if self._closed:
      raise ValueError(f"{self.path}: the event writer is closed.")
    self._pending += _record(event.SerializeToString())
    if time.monotonic() - self._last_flush > self._flush_secs:
      self.flush()

  def _summary(self, step: int, summary) -> None:
    self._add(self._event_pb2.Event(wall_time=time.time(), step=int(step),
                                    summary=summary))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """One float32 scalar summary per entry (TensorBoard's Scalars tab)."""
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.plugins.scalar import summary_v2 as scalar  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary()
    for tag, value in scalars.items():
      summary.value.extend(
          scalar.scalar_pb(tag, float(np.asarray(value))).value)
    self._summary(step, summary)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    """One text summary per entry (TensorBoard's Text tab)."""
    from tensorboard.compat.proto import summary_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.plugins.text import summary_v2 as text  # pylint: disable=g-import-not-at-top
    summary = summary_pb2.Summary()
    for tag, value in texts.items():
      summary.value.extend(text.text_pb(tag, str(value)).value)
    self._summary(step, summary)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """The run's hyperparameters (TensorBoard's HParams tab), at step 0.

    Values that are not bool, int, float or str are written as their str().
    """
    from tensorboard.plugins.hparams import summary_v2 as hp  # pylint: disable=g-import-not-at-top
    values = {k: v if isinstance(v, (bool, int, float, str)) else str(v)
              for k, v in hparams.items()}
    self._summary(0, hp.hparams_pb(values, start_time_secs=time.time()))

  def flush(self) -> None:
    """Writes the buffered events to the file."""
    self._last_flush = time.monotonic()
    if not self._pending:
      return
    if self._local:
      with self.path.open("ab") as f:
        f.write(bytes(self._pending))
    else:
      self._written += self._pending
      self.path.write_bytes(bytes(self._written))
    self._pending = bytearray()

  def close(self) -> None:
    if not self._closed:
      self.flush()
      self._closed = True


class LoggingWriter:
  """The writer of processes > 0: each write is an INFO log line, no files."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("[%d] %s", step, ", ".join(
        f"{k}={float(np.asarray(v)):.6g}" for k, v in sorted(scalars.items())))

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    logging.info("[%d] %s", step, texts)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("[Hyperparameters] %s", dict(hparams))

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


MetricWriter = EventFileWriter | LoggingWriter


def create_writer(workdir: str) -> MetricWriter:
  """Process 0: an `EventFileWriter` into `workdir`; other processes: logs only.

  The console line of each log step comes from `Progress.log_line`, not from
  the writer, so each step is printed once.
  """
  if jax.process_index() > 0:
    return LoggingWriter()
  return EventFileWriter(workdir)


def read_events(path: str) -> Iterator[Any]:
  """The `event_pb2.Event`s (tensorboard.compat.proto) of one event file, in order.

  A last record cut short (a writer killed mid-write) ends the file; a
  checksum that does not match is an `R2D2Error`.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  data = epath.Path(path).read_bytes()
  offset = 0
  while offset + 12 <= len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    body = data[offset + 12:offset + 12 + length]
    footer = data[offset + 12 + length:offset + 16 + length]
    if header_crc != _masked_crc32c(header):
      raise R2D2Error(
          f"{path}: the event record at byte {offset} has a bad length "
          "checksum: the file was damaged. Move it away; the run's "
          "eval_history.jsonl and checkpoints are not affected.")
    if len(footer) < 4:
      return  # cut short
    if struct.unpack("<I", footer)[0] != _masked_crc32c(body):
      raise R2D2Error(
          f"{path}: the event record at byte {offset} has a bad data "
          "checksum: the file was damaged. Move it away; the run's "
          "eval_history.jsonl and checkpoints are not affected.")
    yield event_pb2.Event.FromString(body)
    offset += 16 + length


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
  """Steps/s and uptime to the writer, and a progress bar on an interactive terminal.

  'steps_per_sec' (over the steps since the last report) and 'uptime'
  (seconds since this object was made) go to the writer at most every
  `every_secs`, and at the last step. The bar and the console lines come from
  process 0 only.

  Args:
    total_steps: last step of the run.
    start_step: step the run starts (or resumes) at.
    writer: where 'steps_per_sec' and 'uptime' go.
    description: text before the bar, e.g. the stage name.
    every_secs: the shortest time between two reports to the writer.
  """

  def __init__(self, total_steps: int, start_step: int, writer: MetricWriter,
               description: str = "", every_secs: float = 60.0):
    self._writer = writer
    self._every_secs = every_secs
    self._reported: tuple[int, float] | None = None  # (step, monotonic time)
    self._bar = None
    self._chief = jax.process_index() == 0
    if self._chief and sys.stderr.isatty():
      from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step,
                            desc=description, dynamic_ncols=True)
    self._total = total_steps
    self._start = start_step
    self._t0 = time.time()
    self._t0_monotonic = time.monotonic()
    self._description = description

  def update(self, step: int) -> None:
    now = time.monotonic()
    if self._reported is None:
      # The first step (its time includes compiling) only starts the clock.
      self._reported = (step, now)
    else:
      last_step, last_time = self._reported
      if step != last_step and (now - last_time >= self._every_secs or
                                step == self._total):
        self._writer.write_scalars(step, {
            "steps_per_sec": (step - last_step) / max(now - last_time, 1e-9),
            "uptime": now - self._t0_monotonic})
        self._reported = (step, now)
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
  text = paths.read_text(path)
  return [] if text is None else _parse_history(text, path)


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
    self.path = paths.join(workdir, EVAL_HISTORY)
    self._chief = jax.process_index() == 0

  def resume(self, step: int) -> None:
    """Keeps only the rows of steps <= `step` (the step the run restarts from)."""
    if not self._chief:
      return
    text = paths.read_text(self.path)
    if text is None:
      return
    rows = _parse_history(text, self.path)
    kept = [r for r in rows if r["step"] <= step]
    body = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    if body == text:
      return
    paths.write_text_atomic(self.path, body)

  def append(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self._chief:
      return
    row = {"step": int(step), "time": time.time(),
           **{k: float(v) for k, v in metrics.items()}}
    paths.append_text(self.path, json.dumps(row, sort_keys=True) + "\n")
