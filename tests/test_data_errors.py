"""Corrupt or wrong data files: a clear error that names the file or folder.

MNIST's manual files are small generated idx files here (the real ones are only
hashed, where present, never copied).
"""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error
from tests import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REAL_MNIST = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")
if not os.path.isdir(REAL_MNIST):
  REAL_MNIST = "/work/shared/data/mnist"


def _idx(path, magic, dims, body=b"", compress=True):
  """Writes an idx file: magic, dims (big-endian uint32), then `body`."""
  data = struct.pack(f">{1 + len(dims)}I", magic, *dims) + body
  with open(path, "wb") as f:
    f.write(gzip.compress(data) if compress else data)
  return str(path)


def _write(path, data):
  path.write_bytes(data)
  return str(path)


def _labels(path, values, count=None):
  values = np.asarray(values, np.uint8)
  return _idx(path, 2049, (len(values) if count is None else count,),
              values.tobytes())


@pytest.mark.parametrize("make,message", [
    # Not gzip at all / cut short.
    (lambda p: _write(p, b"this is not gzip"),
     "is not a complete gzip file"),
    (lambda p: _write(p, gzip.compress(bytes(10_008))[:40]),
     "is not a complete gzip file.*truncated or corrupt"),
    # Wrong kind of idx file, wrong shape, wrong count, missing bytes.
    (lambda p: _idx(p, 2051, (10_000, 28, 28)), "magic number 2051, not 2049"),
    (lambda p: _labels(p, np.zeros(5)), "holds 5 labels, not 10000"),
    (lambda p: _labels(p, np.zeros(9_999), count=10_000),
     "has 9999 bytes of labels after its header, not 10000"),
    # Labels out of range.
    (lambda p: _labels(p, np.r_[np.zeros(9_999), 12]),
     r"labels in \[0, 12\], outside \[0, 9\]"),
    # Well formed, but not the original file.
    (lambda p: _labels(p, np.zeros(10_000)),
     "is not the original: its sha256 is [0-9a-f]{64}, the original's f7ae60f9"),
])
def test_bad_mnist_labels_file(tmp_path, make, message):
  path = make(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(R2D2Error, match=message) as e:
    sources.check_mnist_file(path)
  assert str(e.value).startswith(f"MNIST file {path} ")
  assert "Replace it with the original file" in str(e.value)


@pytest.mark.parametrize("dims,message", [
    ((60_000, 28, 29), "holds images of 28x29 pixels, not 28x28"),
    ((6, 28, 28), "holds 6 images, not 60000"),
    ((60_000, 28, 28), "has 0 bytes of images after its header, not 47040000"),
])
def test_bad_mnist_images_file(tmp_path, dims, message):
  path = _idx(tmp_path / "train-images-idx3-ubyte.gz", 2051, dims)
  with pytest.raises(R2D2Error, match=message):
    sources.check_mnist_file(path)


@pytest.mark.skipif(not os.path.isdir(REAL_MNIST), reason="no MNIST files")
def test_original_mnist_files_pass():
  sources.check_manual_files(sources.get_info("mnist"), REAL_MNIST)


def test_bad_manual_file_stops_before_tensorflow_datasets(tmp_path, monkeypatch):
  names = sources.get_info("mnist").manual_files
  for name in names:
    if os.path.isdir(REAL_MNIST) and name != "t10k-labels-idx1-ubyte.gz":
      os.symlink(os.path.join(REAL_MNIST, name), tmp_path / name)
    else:  # each a file that is not the original
      _labels(tmp_path / name, np.zeros(3))
  bad = [n for n in names if not os.path.islink(tmp_path / n)][0]
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # not reached
  with pytest.raises(R2D2Error, match=f"MNIST file {tmp_path / bad} "):
    sources.load_in_memory("mnist", data_dir=str(tmp_path / "d"),
                           manual_dir=str(tmp_path))


# ---------------------------------------------------------------------------
# Any dataset, after loading


def _bad(kind, shape=(8, 8, 1)):
  s = helpers.fake_splits(shape=shape)
  train = s["train"]
  if kind == "label_range":
    train.labels[7] = -1
  elif kind == "label_shape":
    s["train"] = sources.ArraySplit(train.images, train.labels[:, None])
  elif kind == "label_dtype":
    s["train"] = sources.ArraySplit(train.images,
                                    train.labels.astype(np.float32))
  elif kind == "image_shape":
    s["train"] = sources.ArraySplit(train.images[:, :7], train.labels)
  elif kind == "count":
    s["train"] = sources.ArraySplit(train.images, train.labels[:-1])
  elif kind == "empty":
    s["test"] = sources.ArraySplit(s["test"].images[:0], s["test"].labels[:0])
  return s


@pytest.mark.parametrize("kind,message", [
    ("label_range", r"split 'train' has labels in \[-1, 9\], outside \[0, 9\]"),
    ("label_shape", r"labels of shape \(200, 1\)"),
    ("label_dtype", "dtype float32, expected one integer class per image"),
    ("image_shape", r"images of shape \(7, 8, 1\), expected \(8, 8, 1\)"),
    ("count", "has 200 images but 199 labels"),
    ("empty", "split 'test' has no examples"),
])
def test_loaded_data_is_checked_naming_the_source(monkeypatch, kind, message):
  monkeypatch.setitem(sources._LOADERS, "digits",  # pylint: disable=protected-access
                      lambda info, data_dir, manual_dir: _bad(kind))
  with pytest.raises(R2D2Error, match=f"^dataset 'digits': .*{message}"):
    sources.load_in_memory("digits")


def test_tfds_data_errors_name_the_tfds_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "_load_tfds",
                      lambda info, data_dir, manual_dir: _bad("label_range",
                                                             (28, 28, 1)))
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(R2D2Error) as e:
    sources.load_in_memory("mnist", data_dir=data_dir)
  msg = str(e.value)
  assert msg.startswith(f"dataset 'mnist' (tensorflow_datasets folder "
                        f"{os.path.join(data_dir, 'mnist')}")
  assert "labels in [-1, 9]" in msg


def test_cli_corrupt_mnist_file_is_one_line(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in sources.get_info("mnist").manual_files:
    data = gzip.compress(np.random.default_rng(0).bytes(1000))
    (manual / name).write_bytes(data[:500])
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "-m", "r2d2_jax.main", "--config",
       "configs/supervised_mnist.py:runlocal", "--workdir",
       str(tmp_path / "wd"), f"--config.data.manual_dir={manual}",
       f"--config.data.data_dir={tmp_path / 'tfds'}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1
  assert (f"MNIST file {manual / 'train-images-idx3-ubyte.gz'} is not a "
          "complete gzip file") in errors[0]
