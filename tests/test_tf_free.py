"""The quick start without TensorFlow: nothing imports it; its summaries read.

`test_quickstart_without_tensorflow` runs `python -m r2d2_jax.main --config
configs/digits_quickstart.py:runlocal` (two short stages, supervised and d2)
in a subprocess whose import system refuses tensorflow, tensorflow_datasets
and clu (a meta-path finder installed before anything is imported: a probe
for the module, as etils.epath makes, finds it, an import of it fails and is
recorded), with JAX_PLATFORMS unset as a user runs it. It
checks that the run finishes, that no refused module was even attempted,
that TensorBoard's own `EventAccumulator` (run in that subprocess, on
tensorboard's TF-free fallback) reads every stage's event file with the
scalars, hparams and steps the trainer wrote, that `analysis.read_scalars`
reads the same values, and what a person sees on the console: each log step
printed once, no per-scalar logging-writer lines, no "Unable to initialize
backend" probe lines, no orbax read-only warnings.

The `EventFileWriter` tests check the file itself: TFRecord framing that
TensorBoard reads, buffered writes that reach the file on flush, a remote
(non-local) path rewritten whole, and `read_events` on a file cut short and
on a damaged one.

Break checks done (each made the named test fail, then was restored):
* `import tensorflow` at the top of r2d2_jax/metrics.py:
  test_quickstart_without_tensorflow fails (the run exits 1, ImportError:
  refused by the test: tensorflow).
* create_writer returning clu's `metric_writers.create_default_writer` again:
  test_quickstart_without_tensorflow fails (refused by the test: clu).
* `_record` with the data's CRC in place of the length's:
  test_event_file_is_standard fails (read_events: bad length checksum), and
  test_quickstart_without_tensorflow fails (EventAccumulator reads no
  scalars from the files).
* `EventFileWriter.flush` not writing the buffer to a local file:
  test_event_file_is_standard fails (no 'loss' events).
* `Progress.update` never writing 'steps_per_sec':
  test_quickstart_without_tensorflow fails (no steps_per_sec tag).
* EventFileWriter.write_scalars also logging each write (as clu's default
  writer did beside its event file): test_quickstart_without_tensorflow
  fails (a '[5] ...' scalar line on the console beside the step line).
* main.py's filter keeping xla_bridge's "Unable to initialize backend" INFO
  line: test_quickstart_without_tensorflow fails (the line is on stderr);
  not matching orbax's read_only warnings: it fails too ('read_only').
* `read_events` not checking the data CRC: test_read_events_damaged_and_cut
  fails (a DecodeError, not the R2D2Error).
* import_tfds not catching ImportError: test_tfds_extra_missing_is_one_paragraph
  fails (ModuleNotFoundError).
"""

import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from r2d2_jax import analysis
from r2d2_jax import metrics
from r2d2_jax.errors import R2D2Error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")

PRELUDE = f"""
import json, os, sys
BLOCKED = {BLOCKED!r}
import importlib.abc, importlib.machinery
TRIED = []
class _RefusedLoader(importlib.abc.Loader):
  # A probe (importlib.util.find_spec, as etils.epath makes) finds a spec;
  # an import of it fails here, and is recorded.
  def create_module(self, spec):
    TRIED.append(spec.name)
    raise ImportError('refused by the test: ' + spec.name)
  def exec_module(self, module):
    pass
class _Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      return importlib.machinery.ModuleSpec(name, _RefusedLoader())
    return None
sys.meta_path.insert(0, _Refuse())
import runpy
workdir, report = sys.argv[1], sys.argv[2]
sys.argv = ['r2d2_jax.main', '--workdir', workdir] + sys.argv[3:]
code = 0
try:
  runpy.run_module('r2d2_jax.main', run_name='__main__')
except SystemExit as e:
  code = e.code or 0
out = {{'tried': list(TRIED),
        'loaded': [m for m in BLOCKED if m in sys.modules], 'stages': {{}}}}
# TensorBoard's reader, after the run (its TF-free fallback: tensorflow is
# refused here too).
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
for stage in sorted(os.listdir(workdir)):
  folder = os.path.join(workdir, stage)
  if not os.path.isdir(folder):
    continue
  acc = event_accumulator.EventAccumulator(
      folder, size_guidance={{'tensors': 0}})
  acc.Reload()
  tensors = {{}}
  for tag in acc.Tags()['tensors']:
    for e in acc.Tensors(tag):
      a = tensor_util.make_ndarray(e.tensor_proto)
      tensors.setdefault(tag, []).append(
          [e.step, float(a) if a.size == 1 and a.dtype.kind == 'f' else None])
  out['stages'][stage] = {{'tensors': tensors}}
with open(report, 'w') as f:
  json.dump(out, f)
sys.exit(code)
"""


def _env():
  env = dict(os.environ)
  env.pop("JAX_PLATFORMS", None)  # as a user runs it: jax probes backends
  env.pop("TF_CPP_MIN_LOG_LEVEL", None)
  env.pop("OUT", None)
  # One CPU device, compiled fast.
  env["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  return env


def test_quickstart_without_tensorflow(tmp_path):
  wd = tmp_path / "wd"
  report = tmp_path / "report.json"
  args = ["--config", "configs/digits_quickstart.py:runlocal",
          "--config.run_stages=supervised,d2",
          "--config.stages.supervised.total_steps=6",
          "--config.stages.d2.total_epochs=0.4"]
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-c", PRELUDE, str(wd), str(report), *args],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
  took = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
  assert "Final results" in proc.stdout
  body = json.loads(report.read_text())
  assert body["tried"] == [] and body["loaded"] == [], body
  assert set(body["stages"]) == {"supervised", "d2"}

  for stage, last in (("supervised", 6), ("d2", 10)):
    tensors = body["stages"][stage]["tensors"]
    for tag in ("losses/total", "accuracy/train", "accuracy/test/raw",
                "steps_per_sec", "uptime", "lr"):
      assert tag in tensors, (stage, sorted(tensors))
    assert "_hparams_/session_start_info" in tensors
    # Train scalars at every log step (5) and the last; eval at the last.
    assert [s for s, _ in tensors["losses/total"]] == sorted({5, last})
    assert [s for s, _ in tensors["accuracy/test/raw"]] == [last]
    assert [s for s, _ in tensors["steps_per_sec"]] == [last]
    assert tensors["steps_per_sec"][0][1] > 0
    # The same values through analysis.read_scalars (our own reader).
    ours = analysis.read_scalars(str(wd / stage))
    for tag, points in tensors.items():
      if tag.startswith("_hparams_"):
        assert tag not in ours
        continue
      steps, values = ours[tag]
      assert list(steps) == [s for s, _ in points], tag
      np.testing.assert_allclose(values, [v for _, v in points], rtol=1e-6)
    history = analysis.eval_history(str(wd / stage))
    np.testing.assert_allclose(ours["accuracy/test/raw"][1],
                               [history[-1]["accuracy/test/raw"]], rtol=1e-6)
  # d2's pseudo-label hook writes at step 0 (before the first step).
  assert body["stages"]["d2"]["tensors"]["pseudo_labels/accuracy"][0][0] == 0

  # The console: one line per log step and stage, no library chatter.
  err = proc.stderr
  lines = re.findall(r"\] ((?:supervised|d2) step \d+/\d+ .*)", err)
  train = [l for l in lines if "losses/total" in l]
  keys = [l.split(" (")[0] for l in train]
  assert keys == ["supervised step 5/6", "supervised step 6/6",
                  "d2 step 5/10", "d2 step 10/10"], lines
  for noise in ("Unable to initialize backend", "logging_writer.py",
                "Setting work unit notes", "read only", "read_only",
                "oneDNN", "[Hyperparameters]"):
    assert noise not in err, (noise, err[-3000:])
  # No scalar logged a second time: every 'name=value' text comes from the
  # one step line.
  assert not re.search(r"\] \[\d+\] ", err), err[-3000:]
  assert took < 120, took


def test_event_file_is_standard(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  w = metrics.EventFileWriter(str(tmp_path))
  w.write_hparams({"a": 1, "b": "x", "c": True, "d": (1, 2)})
  w.write_scalars(3, {"loss": np.float32(0.5), "acc": 0.25})
  w.write_scalars(7, {"loss": 0.125})
  w.write_texts(7, {"note": "hello"})
  files = sorted(os.listdir(tmp_path))
  assert len(files) == 1 and files[0].startswith("events.out.tfevents.")
  # Buffered until flush: only the file-version record is there.
  assert [e.file_version for e in metrics.read_events(w.path)] == [
      "brain.Event:2"]
  w.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path),
                                           size_guidance={"tensors": 0})
  acc.Reload()
  loss = acc.Tensors("loss")
  assert [e.step for e in loss] == [3, 7]
  assert [float(tensor_util.make_ndarray(e.tensor_proto))
          for e in loss] == [0.5, 0.125]
  assert acc.SummaryMetadata("loss").plugin_data.plugin_name == "scalars"
  assert acc.SummaryMetadata("note").plugin_data.plugin_name == "text"
  assert (acc.SummaryMetadata("_hparams_/session_start_info")
          .plugin_data.plugin_name == "hparams")
  got = analysis.read_scalars(str(tmp_path))
  assert set(got) == {"loss", "acc"}
  assert list(got["loss"][0]) == [3, 7] and list(got["acc"][1]) == [0.25]
  with pytest.raises(ValueError):
    w.write_scalars(8, {"loss": 1.0})


def test_remote_path_is_rewritten_whole(tmp_path, monkeypatch):
  # A path with '://' (gs:// cannot append) is written whole on each flush:
  # a local folder taken as remote here, and each flush's file checked.
  assert not metrics._is_local("gs://bucket/run")
  monkeypatch.setattr(metrics, "_is_local", lambda path: False)
  w = metrics.EventFileWriter(str(tmp_path))
  w.write_scalars(1, {"x": 1.0})
  w.flush()
  first = [e.step for e in metrics.read_events(w.path) if e.summary.value]
  w.write_scalars(2, {"x": 2.0})
  w.close()
  steps = [e.step for e in metrics.read_events(w.path) if e.summary.value]
  assert (first, steps) == ([1], [1, 2])
  got = analysis.read_scalars(str(tmp_path))
  assert list(got["x"][0]) == [1, 2]


def test_read_events_damaged_and_cut(tmp_path):
  w = metrics.EventFileWriter(str(tmp_path))
  w.write_scalars(1, {"x": 1.0})
  w.write_scalars(2, {"x": 2.0})
  w.close()
  data = open(w.path, "rb").read()
  cut = tmp_path / "cut" / "events.out.tfevents.cut"
  cut.parent.mkdir()
  cut.write_bytes(data[:-3])  # the last record cut short
  assert [e.step for e in metrics.read_events(str(cut))
          if e.summary.value] == [1]
  bad = bytearray(data)
  bad[-6] ^= 0xFF  # inside the last record's data
  damaged = tmp_path / "bad" / "events.out.tfevents.bad"
  damaged.parent.mkdir()
  damaged.write_bytes(bytes(bad))
  with pytest.raises(R2D2Error, match="bad data checksum"):
    list(metrics.read_events(str(damaged)))


@pytest.mark.parametrize("missing", ["tensorflow", "tensorflow_datasets"])
def test_tfds_extra_missing_is_one_paragraph(monkeypatch, missing):
  # None in sys.modules: `import NAME` fails as if it were not installed.
  from r2d2_jax.data import tfds_extra  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sys.modules, missing, None)
  with pytest.raises(R2D2Error) as e:
    tfds_extra.import_tfds("dataset 'cifar10'")
  msg = str(e.value)
  assert "dataset 'cifar10'" in msg and 'pip install -e ".[tfds]"' in msg
  assert "\n" not in msg
  # The streamed ImageNet pipeline's module says the same on import.
  monkeypatch.delitem(sys.modules, "r2d2_jax.data.imagenet", raising=False)
  with pytest.raises(R2D2Error, match=r"imagenet2012.*\.\[tfds\]"):
    import r2d2_jax.data.imagenet  # pylint: disable=g-import-not-at-top,unused-import
