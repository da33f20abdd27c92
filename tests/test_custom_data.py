"""Bring your own data: folder:PATH, npz:PATH, tfds:NAME and a labeled split file.

Tiny datasets are generated here (PNG / JPEG written with Pillow into
tmp_path, arrays with numpy.savez); tfds:NAME runs on
`tfds.testing.mock_data` (no download).

Break checks (each made, seen to fail, restored):
  - folder.py: class ids not in sorted order (zebra first) ->
    test_folder_layout_classes_and_channels fails.
  - folder.py `read`: a grayscale image put in channel 0 only instead of
    repeated into RGB -> test_folder_layout_classes_and_channels fails.
  - folder.py: the mixed-size check removed -> test_folder_errors[mixed] fails.
  - custom.py `_finish`: unlabeled rows labeled 0 instead of UNKNOWN_LABEL ->
    test_folder_layout_classes_and_channels and
    test_folder_pipeline_with_split_file fail.
  - splits.py `make_split`: `& (labels >= 0)` dropped for num_labels=-1 ->
    test_unknown_rows_never_labeled_nor_val fails.
  - splits.py `draw_val`: `exclude` ignored -> the validation set overlaps
    the file's labels: test_labeled_split_file_indices_and_validation fails.
  - splits.py `file_split`: rows without a label left out of the unlabeled
    pool -> test_train_and_resume_on_a_folder (their table rows are not
    learnable) and test_labeled_split_file_indices_and_validation fail.
  - splits.py `read_split_file`: duplicate check removed ->
    test_split_file_errors[duplicate] fails.
  - arrays.py: the upper label bound not checked -> test_npz_errors fails.
  - arrays.py: grayscale arrays zeroed instead of repeated into RGB ->
    test_npz_arrays fails.
  - tfds_any.py: the 'unlabeled' split ignored ->
    test_tfds_builder_on_mock_data fails.
  - interface.py: labeled_split_file ignored (random draw instead) ->
    test_folder_pipeline_with_split_file fails.
"""

import json
import os
import sys

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from configs import common
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import custom
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.data import sources
from r2d2_jax.data import splits as splits_lib
from r2d2_jax.data import tfds_any
from r2d2_jax.errors import R2D2Error
from tests import helpers

CLASSES = ("zebra", "ant", "cat")   # sorted: ant=0, cat=1, zebra=2


def _png(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path)


def make_folder(root, n_train=6, n_test=2, n_unlabeled=4, size=(8, 8),
                gray_every=2, seed=0):
  """A folder dataset; every `gray_every`-th image is grayscale ('L').

  Returns:
    {relative path: the uint8 array written} (PNG: lossless).
  """
  rng = np.random.default_rng(seed)
  written = {}
  for split, n in (("train", n_train), ("test", n_test)):
    for c in CLASSES:
      for i in range(n):
        gray = gray_every and i % gray_every == 1
        x = rng.integers(0, 256, size if gray else (*size, 3), dtype=np.uint8)
        rel = f"{split}/{c}/{i:02d}.png"
        _png(os.path.join(root, rel), x)
        written[rel] = x
  for i in range(n_unlabeled):
    x = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    rel = f"unlabeled/u{i:02d}.png"
    _png(os.path.join(root, rel), x)
    written[rel] = x
  return written


@pytest.fixture
def no_tensorflow(monkeypatch):
  """`import tensorflow` / `tensorflow_datasets` fail while the test runs."""
  monkeypatch.setitem(sys.modules, "tensorflow", None)
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)


# ---------------------------------------------------------------------------
# folder:PATH


def test_folder_layout_classes_and_channels(tmp_path, no_tensorflow):
  written = make_folder(str(tmp_path))
  name = f"folder:{tmp_path}"
  info = sources.get_info(name)
  s = sources.load_in_memory(name)
  assert info.num_classes == 3 and info.image_shape == (8, 8, 3)
  assert not info.flip and info.in_memory
  train, test = s["train"], s["test"]
  # 18 labeled rows by class id (sorted names) then file name; 4 unlabeled.
  np.testing.assert_array_equal(
      train.labels, [0] * 6 + [1] * 6 + [2] * 6 + [-1] * 4)
  assert custom.UNKNOWN_LABEL == -1
  names = sources.train_row_names(name)
  assert names[:2] == ("ant/00.png", "ant/01.png")
  assert names[12] == "zebra/00.png" and names[18:] == (None,) * 4
  # Pixels are the files'; a grayscale image is repeated into 3 channels.
  np.testing.assert_array_equal(train.images[0], written["train/ant/00.png"])
  gray = written["train/ant/01.png"]
  np.testing.assert_array_equal(train.images[1], np.stack([gray] * 3, -1))
  np.testing.assert_array_equal(train.images[18],
                                written["unlabeled/u00.png"])
  np.testing.assert_array_equal(test.labels, [0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(test.images[4], written["test/zebra/00.png"])
  # Normalisation statistics are the train images' (unlabeled included).
  np.testing.assert_allclose(info.mean, train.images.reshape(-1, 3).mean(0),
                             rtol=1e-6)
  np.testing.assert_allclose(info.std, train.images.reshape(-1, 3).std(0),
                             rtol=1e-6)


def test_folder_all_gray_is_one_channel_and_resizes(tmp_path, no_tensorflow):
  root = str(tmp_path)
  rng = np.random.default_rng(1)
  for split in ("train", "test"):
    for c, (h, w) in (("a", (8, 8)), ("b", (10, 6))):
      _png(os.path.join(root, split, c, "x.png"),
           rng.integers(0, 256, (h, w), dtype=np.uint8))
  # A JPEG is read too.
  Image.fromarray(rng.integers(0, 256, (12, 12), dtype=np.uint8)).save(
      os.path.join(root, "train", "a", "y.jpg"))
  s = sources.load_in_memory(f"folder:{root}", image_size=(6, 5))
  assert s["train"].images.shape == (3, 6, 5, 1)
  assert sources.get_info(f"folder:{root}", {"image_size": 7}).image_shape == (
      7, 7, 1)
  with pytest.raises(R2D2Error, match="data.image_size"):
    sources.load_in_memory(f"folder:{root}", image_size=(6, -1))


def _break(root, kind):
  make_folder(root, n_unlabeled=2)
  if kind == "empty":
    os.makedirs(os.path.join(root, "train", "dog"))
    return os.path.join(root, "train", "dog")
  if kind == "unreadable":
    path = os.path.join(root, "train", "cat", "03.png")
    with open(path, "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n this is not a png")
    return path
  if kind == "mixed":
    path = os.path.join(root, "test", "cat", "01.png")
    _png(path, np.zeros((9, 8, 3), np.uint8))
    return path
  if kind == "test_only_class":
    path = os.path.join(root, "test", "emu")
    _png(os.path.join(path, "0.png"), np.zeros((8, 8, 3), np.uint8))
    return path
  if kind == "not_an_image":
    path = os.path.join(root, "unlabeled", "notes.txt")
    with open(path, "w") as f:
      f.write("hi")
    return path
  if kind == "no_test":
    path = os.path.join(root, "test")
    os.rename(path, os.path.join(root, "tst"))
    return path
  raise ValueError(kind)


@pytest.mark.parametrize("kind,message", [
    ("empty", "class folder {} is empty"),
    ("unreadable", "cannot read image {} "),
    ("mixed", r"images have different sizes: .* and {} is 8x9.*"
              r"data.image_size"),
    ("test_only_class", "class folder {} has no counterpart in"),
    ("not_an_image", "{} is not a PNG or JPEG file"),
    ("no_test", "{} is not a folder"),
])
def test_folder_errors(tmp_path, no_tensorflow, kind, message):
  root = str(tmp_path / "ds")
  path = _break(root, kind)
  with pytest.raises(R2D2Error,
                     match=message.format(path).replace("(", r"\(")) as e:
    sources.load_in_memory(f"folder:{root}")
  msg = str(e.value)
  assert msg.startswith(f"folder:{root}: ") and "\n" not in msg


def test_folder_image_size_resizes_mixed_sizes(tmp_path, no_tensorflow):
  root = str(tmp_path / "ds")
  _break(root, "mixed")
  s = sources.load_in_memory(f"folder:{root}", image_size=8)
  assert s["test"].images.shape == (6, 8, 8, 3)


# ---------------------------------------------------------------------------
# npz:PATH


def _npz(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


def _arrays(seed=0, gray_test=True):
  rng = np.random.default_rng(seed)
  return dict(
      x_train=rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8),
      y_train=np.arange(12) % 4,
      x_test=rng.integers(0, 256, (5, 6, 6) if gray_test else (5, 6, 6, 3),
                          dtype=np.uint8),
      y_test=np.array([0, 1, 2, 3, 3]),
      x_unlabeled=rng.integers(0, 256, (3, 6, 6, 3), dtype=np.uint8))


def test_npz_arrays(tmp_path, no_tensorflow):
  a = _arrays()
  path = _npz(tmp_path / "d.npz", **a)
  info = sources.get_info(f"npz:{path}")
  s = sources.load_in_memory(f"npz:{path}")
  assert info.num_classes == 4 and info.image_shape == (6, 6, 3)
  np.testing.assert_array_equal(s["train"].labels,
                                list(np.arange(12) % 4) + [-1] * 3)
  np.testing.assert_array_equal(s["train"].images[12:], a["x_unlabeled"])
  # [N, H, W] grayscale test images are repeated into the train images' RGB.
  np.testing.assert_array_equal(s["test"].images,
                                np.stack([a["x_test"]] * 3, -1))
  # class_names sets the number of classes (5: class 4 has no examples ->
  # an error naming it); resizing to image_size.
  path2 = _npz(tmp_path / "e.npz", **a,
               class_names=np.array(["a", "b", "c", "d"]))
  s2 = sources.load_in_memory(f"npz:{path2}", image_size=(4, 3))
  assert s2["train"].images.shape == (15, 4, 3, 3)
  path3 = _npz(tmp_path / "f.npz", **a, class_names=np.array(list("abcde")))
  with pytest.raises(R2D2Error, match="class 4 \\('e'\\) has no training"):
    sources.load_in_memory(f"npz:{path3}")


@pytest.mark.parametrize("change,message", [
    (dict(y_test=np.array([0, 1, 2, 3, 4])),
     r"array 'y_test' has labels outside the class range \[0, 3\] "
     r"\(max\(y_train\) \+ 1 = 4\): e.g. 4 at position 4"),
    (dict(y_train=np.r_[np.arange(11) % 4, -2]),
     r"array 'y_train' has labels outside the class range"),
    (dict(x_test=None, y_test=None), "missing arrays x_test, y_test"),
    (dict(x_train=np.zeros((12, 6, 6, 3), np.float32)),
     "array 'x_train' is float32, expected uint8"),
    (dict(y_train=np.arange(11) % 4), "holds 11 labels for 12 images"),
    (dict(x_test=np.zeros((5, 7, 6, 3), np.uint8)),
     r"different sizes \(x_train: 6x6, x_test: 7x6"),
])
def test_npz_errors(tmp_path, no_tensorflow, change, message):
  a = dict(_arrays(gray_test=False), **change)
  path = _npz(tmp_path / "d.npz", **{k: v for k, v in a.items()
                                     if v is not None})
  with pytest.raises(R2D2Error, match=message) as e:
    sources.load_in_memory(f"npz:{path}")
  assert str(e.value).startswith(f"npz:{path}: ")


def test_npz_not_a_file(tmp_path):
  (tmp_path / "bad.npz").write_bytes(b"nope")
  with pytest.raises(R2D2Error, match="bad.npz: cannot read it as a numpy"):
    sources.load_in_memory(f"npz:{tmp_path / 'bad.npz'}")
  with pytest.raises(R2D2Error, match="missing.npz is not a file"):
    sources.get_info(f"npz:{tmp_path / 'missing.npz'}")


# ---------------------------------------------------------------------------
# Splits with unlabeled-only rows and a split file


def test_unknown_rows_never_labeled_nor_val():
  labels = np.r_[np.repeat(np.arange(3), 10), np.full(7, -1)]
  unknown = set(range(30, 37))
  for split in (
      splits_lib.make_split(labels, 3, 6, seed=0, num_val=6),
      splits_lib.make_split(labels, 3, -1, seed=0, num_val=3),
      splits_lib.make_split(labels, 3, 6, seed=0, unlabeled="all"),
      splits_lib.fraction_split(labels, 3, 0.2, seed=0, num_val=3),
  ):
    assert not unknown & set(split.labeled.tolist())
    assert not unknown & set(split.val.tolist())
    assert unknown <= set(split.unlabeled.tolist())
    assert len(np.intersect1d(split.val, split.unlabeled)) == 0
  # Without unknown rows the draw is as before (the same validation set).
  plain = splits_lib.make_split(labels[:30], 3, 6, seed=0, num_val=6)
  with_unknown = splits_lib.make_split(labels, 3, 6, seed=0, num_val=6)
  np.testing.assert_array_equal(plain.val, with_unknown.val)
  np.testing.assert_array_equal(plain.labeled, with_unknown.labeled)


def test_labeled_split_file_indices_and_validation(tmp_path):
  labels = np.r_[np.repeat(np.arange(3), 10), np.full(4, -1)]
  f = tmp_path / "split.txt"
  # Published split: rows 0, 1 of class 0, 10 of class 1, 20..22 of class 2.
  f.write_text("# labeled rows\n0\n1\n\n10\n20\n21\n22\n")
  labeled = splits_lib.read_split_file(str(f), labels)
  np.testing.assert_array_equal(labeled, [0, 1, 10, 20, 21, 22])
  for seed in range(5):
    s = splits_lib.file_split(labels, 3, labeled, seed, num_val=9)
    np.testing.assert_array_equal(s.labeled, labeled)
    assert len(np.intersect1d(s.val, labeled)) == 0
    np.testing.assert_array_equal(np.bincount(labels[s.val]), [3, 3, 3])
    assert set(range(30, 34)) <= set(s.unlabeled.tolist())
    rest = set(range(34)) - set(s.val.tolist()) - set(labeled.tolist())
    assert set(s.unlabeled.tolist()) == rest
    # The validation rows are the random draw's, the labeled rows skipped.
    rng = np.random.default_rng([splits_lib._VAL_STREAM, seed])  # pylint: disable=protected-access
    order = rng.permutation(np.flatnonzero(labels == 0))
    np.testing.assert_array_equal(
        s.val[labels[s.val] == 0],
        np.sort(order[~np.isin(order, labeled)][:3]))
  every = splits_lib.file_split(labels, 3, labeled, 0, "all", num_val=3)
  assert set(labeled.tolist()) <= set(every.unlabeled.tolist())
  # Class 2 has 10 rows, 3 of them labeled: at most 7 validation rows a class.
  with pytest.raises(R2D2Error, match="class 2 has only 10 training examples "
                     "and data.labeled_split_file takes 3 of them.*largest "
                     r"possible data.num_val here is 21 \(7 per class\)"):
    splits_lib.file_split(labels, 3, labeled, 0, num_val=27)


@pytest.mark.parametrize("text,message", [
    ("0\n1\n99\n", r"line 3: index 99 is outside the train split, whose rows "
                   r"are 0\.\.33"),
    ("0\n\n1\n0\n", "line 4: '0' is train row 0, already listed on line 1"),
    ("0\nant/05.png\n", "line 2: 'ant/05.png' is not a train-split index"),
    ("0\n31\n", "line 2: train row 31 is an unlabeled image"),
    ("# nothing\n", "lists no examples"),
])
def test_split_file_errors(tmp_path, text, message):
  labels = np.r_[np.repeat(np.arange(3), 10), np.full(4, -1)]
  f = tmp_path / "split.txt"
  f.write_text(text)
  with pytest.raises(R2D2Error, match=message) as e:
    splits_lib.read_split_file(str(f), labels)
  assert f"data.labeled_split_file='{f}'" in str(e.value)


def _folder_config(root, **overrides):
  c = helpers.tiny_config(**{"data.dataset": f"folder:{root}",
                             "data.num_labels": 6, "data.batch_size": 8,
                             "data.eval_batch_size": 16, **overrides})
  return c


def test_folder_pipeline_with_split_file(tmp_path, no_tensorflow):
  root = str(tmp_path / "ds")
  make_folder(root, n_train=6, n_unlabeled=4)
  f = tmp_path / "labeled.txt"
  f.write_text("ant/00.png\n./cat/03.png\nzebra/05.png\n1\n")
  c = _folder_config(root, **{"data.labeled_split_file": str(f),
                              "data.num_val": 3, "data.uratio": 1})
  mesh = sharding.make_mesh(jax.devices()[:2])
  p = pipeline_lib.make_pipeline(c.data, 0, mesh, str(tmp_path / "wd"))
  np.testing.assert_array_equal(p.split.labeled, [0, 1, 9, 17])
  assert len(np.intersect1d(p.split.val, p.split.labeled)) == 0
  assert p.num_train == 22 and set(range(18, 22)) <= set(
      p.split.unlabeled.tolist())
  saved = json.load(open(tmp_path / "wd" / "split.json"))
  assert saved["labeled"] == [0, 1, 9, 17]
  assert saved["labeled_split_file"] == str(f)
  # The unlabeled stream reaches the unlabeled-folder rows, labeled -1.
  seen = set()
  for k in range(12):
    b = p.host_batch(k)["unlabeled"]
    assert set(b["index"].tolist()) <= set(p.split.unlabeled.tolist())
    np.testing.assert_array_equal(b["label"] == -1, b["index"] >= 18)
    seen |= set(b["index"].tolist())
  assert set(range(18, 22)) <= seen
  # Bad names name the line.
  f.write_text("ant/00.png\nant/00.png\n")
  with pytest.raises(R2D2Error, match="line 2: 'ant/00.png' is train row 0"):
    pipeline_lib.make_pipeline(c.data, 0, mesh)
  f.write_text("ant/00.png\nunlabeled/u00.png\n")
  with pytest.raises(R2D2Error, match="line 2: no train image is named"):
    pipeline_lib.make_pipeline(c.data, 0, mesh)


# ---------------------------------------------------------------------------
# tfds:NAME


def test_tfds_builder_on_mock_data(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  # Without metadata files the mocked builder lists no splits; give it the
  # real stl10's ('unlabeled' joins the unlabeled pool).
  monkeypatch.setattr(tfds_any, "split_names",
                      lambda info: ["train", "test", "unlabeled"])
  with tfds.testing.mock_data(num_examples=40):
    info = sources.get_info("tfds:stl10", {"image_size": 12})
    s = sources.load_in_memory("tfds:stl10", image_size=12)
  assert info.num_classes == 10 and info.image_shape == (12, 12, 3)
  assert s["train"].images.shape == (80, 12, 12, 3)
  assert (s["train"].labels[40:] == -1).all()
  assert s["train"].labels[:40].min() >= 0 and len(s["test"]) == 40
  with pytest.raises(R2D2Error, match="tfds:no_such_builder_xyz"):
    sources.get_info("tfds:no_such_builder_xyz")


def test_unknown_name_mentions_own_data():
  with pytest.raises(R2D2Error, match="tfds:NAME.*folder:PATH or npz:PATH"):
    sources.get_info("mnist2")


# ---------------------------------------------------------------------------
# End to end: R2-D2 on a folder dataset, straight and resumed


def _r2d2_folder_config(root, split_file, **overrides):
  c = _folder_config(root, **{"data.labeled_split_file": split_file,
                              "data.num_val": 3, "data.uratio": 1,
                              "total_steps": 4, "checkpoint_every_steps": 2,
                              **overrides})
  c.method = "r2d2"
  common.r2d2_block(c)
  return c


def test_train_and_resume_on_a_folder(tmp_path, no_tensorflow):
  root = str(tmp_path / "ds")
  make_folder(root, n_train=6, n_unlabeled=6)
  f = tmp_path / "labeled.txt"
  f.write_text("ant/00.png\ncat/00.png\nzebra/00.png\n")
  c = _r2d2_folder_config(root, str(f))
  res = train.train_and_evaluate(c, str(tmp_path / "straight"))
  assert 0.0 <= res["accuracy/test/raw"] <= 1.0
  assert 0.0 <= res["accuracy/val/raw"] <= 1.0
  # Interrupted after the step-2 checkpoint, then the same command again.
  stage = train.Stage(_r2d2_folder_config(root, str(f)),
                      str(tmp_path / "resumed"))
  unknown = np.flatnonzero(stage.task.train_labels == -1)
  np.testing.assert_array_equal(unknown, np.arange(18, 24))
  assert stage.task.num_train == 24
  stage.total_steps = 2
  stage.run()
  assert ckpt_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints")
                               ).latest_step() == 2
  train.train_and_evaluate(_r2d2_folder_config(root, str(f)),
                           str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 4
  chex.assert_trees_all_equal(a, b)
  # The per-example table has rows for the unlabeled-folder images, learnable
  # and written (repredicted, then trained).
  table, learnable = np.asarray(a["table"]), np.asarray(a["learnable"])
  assert (learnable[unknown] == 1).all()
  assert (np.abs(table[unknown]).max(-1) > 0).all()
  assert (learnable[[0, 6, 12]] == 0).all()
