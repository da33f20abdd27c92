"""Workdirs as local folders or Cloud Storage URLs (`gs://BUCKET/PATH`).

Everything a run writes to or reads from its workdir (checkpoints, split.json,
eval_history.jsonl, caches, summaries) goes through `etils.epath.Path`, which
opens `gs://` with gcsfs (fsspec) and local paths with `os`. Orbax writes the
arrays of a checkpoint through tensorstore, which talks to Cloud Storage
itself.

TensorFlow is not needed: importing this module sets `EPATH_USE_TF=false`
(unless the environment sets it) when gcsfs is installed, so epath picks its
fsspec backend over `tf.io.gfile`. Without gcsfs a `gs://` workdir is refused
with the install command (`pip install 'r2d2_jax[gcs]'`).

Object stores cannot append to or rename an object, but a single upload is
atomic: readers see the old object or the new one. So `write_bytes_atomic`
and `append_text` upload the whole object there; on a local disk they use a
temporary file, fsync and `os.replace` / an fsynced append.
"""

from __future__ import annotations

import importlib.util
import os
import uuid

from etils import epath

from r2d2_jax.errors import R2D2Error

# What the trainer writes into a workdir, and what `inference` reads back:
# the run's config (WORKDIR/config.json) and a stage's best-validation state.
CONFIG_FILE = "config.json"
BEST_CHECKPOINT = "best_checkpoint"
# Checkpoint metadata key: the BN statistics an evaluation used
# (`eval_bn_stats='unlabeled'`; r2d2_jax/train.py, r2d2_jax/inference.py).
BN_META = "eval_bn_stats"

# URL schemes a workdir may use, and the fsspec package each needs. Orbax's
# tensorstore driver supports Cloud Storage only among the cloud stores.
_URL_PACKAGES = {"gs": "gcsfs"}


def _has_package(name: str) -> bool:
  return importlib.util.find_spec(name) is not None


def _prefer_fsspec() -> None:
  """Makes epath open gs:// with gcsfs rather than TensorFlow's gfile."""
  if "EPATH_USE_TF" in os.environ or not _has_package("gcsfs"):
    return
  os.environ["EPATH_USE_TF"] = "false"
  # epath reads the variable once and caches the answer; forget an answer
  # given before this import (e.g. while tensorflow_datasets was imported).
  from etils.epath import gpath  # pylint: disable=g-import-not-at-top
  cached = getattr(gpath, "_is_tf_installed", None)
  if hasattr(cached, "cache_clear"):
    cached.cache_clear()


_prefer_fsspec()


def scheme(path: str | os.PathLike) -> str | None:
  """The URL scheme of `path` ('gs'), or None for a local path."""
  head, sep, _ = os.fspath(path).partition("://")
  return head if sep else None


def is_url(path: str | os.PathLike) -> bool:
  return scheme(path) is not None


def check(path: str | os.PathLike, what: str = "--workdir") -> str:
  """`path` as a string, after checking a URL can be opened.

  Raises:
    R2D2Error: an unsupported scheme, or gcsfs missing for gs://.
  """
  text = os.fspath(path)
  s = scheme(text)
  if s is None:
    return text
  if s not in _URL_PACKAGES:
    raise R2D2Error(
        f"{what}={text!r}: {s}:// is not supported; a workdir is a local or "
        "mounted folder, or a Cloud Storage URL (gs://BUCKET/PATH).")
  package = _URL_PACKAGES[s]
  if not _has_package(package):
    raise R2D2Error(
        f"{what}={text!r}: a {s}:// workdir needs the {package} package. "
        "Install it with `pip install 'r2d2_jax[gcs]'` (or "
        f"`pip install {package}`), or use a local folder.")
  return text


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an `epath.Path` (a URL is checked by `check`)."""
  return epath.Path(check(p))


def absolute(p: str | os.PathLike) -> str:
  """A URL as it is; a local path made absolute."""
  text = check(p)
  return text if is_url(text) else os.path.abspath(text)


def join(p: str | os.PathLike, *parts: str) -> str:
  """`p/parts...` as a string, for local paths and URLs alike."""
  return os.fspath(epath.Path(os.fspath(p)).joinpath(*parts))


def makedirs(p: str | os.PathLike) -> None:
  """Creates folder `p` and its parents.

  A URL has no folders to create (objects are written under any prefix), and
  gcsfs would create a missing bucket: nothing is done.
  """
  if not is_url(check(p)):
    os.makedirs(os.fspath(p), exist_ok=True)


def read_bytes(p: str | os.PathLike) -> bytes | None:
  """The bytes of file `p`, or None if there is no such file."""
  f = path(p)
  if not f.exists():
    return None
  return f.read_bytes()


def read_text(p: str | os.PathLike) -> str | None:
  """The text (UTF-8) of file `p`, or None if there is no such file."""
  data = read_bytes(p)
  return None if data is None else data.decode("utf-8")


def write_bytes_atomic(p: str | os.PathLike, data: bytes) -> None:
  """Replaces file `p` by `data`, all at once: a reader sees old or new.

  Local: a temporary file of this process's own beside `p` (several processes
  may write the same record at once), fsynced, then `os.replace`; the folder
  is created if missing. URL: one upload, which the store makes visible
  whole.
  """
  if is_url(p):
    path(p).write_bytes(data)
    return
  p = os.fspath(p)
  os.makedirs(os.path.dirname(p) or ".", exist_ok=True)
  tmp = f"{p}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, p)


def write_text_atomic(p: str | os.PathLike, text: str) -> None:
  """`write_bytes_atomic` of `text` in UTF-8."""
  write_bytes_atomic(p, text.encode("utf-8"))


def append_text(p: str | os.PathLike, text: str) -> None:
  """Appends `text` to file `p` (created if missing), durably.

  Local: an append, flushed and fsynced. URL: objects cannot be appended to,
  so the object is read and uploaded again with `text` at its end (one
  writer at a time; fine for a file that grows by a line per evaluation).
  """
  if is_url(p):
    old = read_text(p) or ""
    path(p).write_text(old + text)
    return
  with open(os.fspath(p), "a", encoding="utf-8") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
