"""The streamed ImageNet pipeline, on a tiny fake ImageNet prepared by tfds itself.

The fixture writes ILSVRC2012_img_train.tar / ILSVRC2012_img_val.tar holding a few
small JPEGs and lets the real `imagenet2012` builder prepare them (in 3 shards),
so tfds ids, shard lengths and slices are those of a real preparation. Every
image is one flat colour that identifies it, so a batch row can be checked
against the example its `index` names, even after a random crop. One test runs
on `tfds.testing.mock_data` as well.
"""

import io
import os
import tarfile

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import common
from r2d2_jax import sharding
from r2d2_jax.data import imagenet
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.data import splits as splits_lib
from r2d2_jax.errors import R2D2Error

CLASS_COUNTS = (10, 12, 8, 14, 6)   # train examples of classes 0..4
NUM_TRAIN = sum(CLASS_COUNTS)
NUM_VAL = 10
SIZE = 32                           # data.image_size: small crops, fast tests


def _jpeg(rng, value):
  h, w = rng.integers(20, 60, size=2)
  return tf.io.encode_jpeg(np.full((h, w, 3), value, np.uint8),
                           quality=100).numpy()


def _add(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_manual_dir(folder, counts=CLASS_COUNTS, num_val=NUM_VAL, seed=0):
  """Fake ImageNet tars; returns {file_name: flat colour} of the train images."""
  synsets = tfds.core.tfds_path(
      "datasets/imagenet2012/labels.txt").read_text().split()
  rng = np.random.default_rng(seed)
  os.makedirs(folder, exist_ok=True)
  colours, k = {}, 0
  train_tar = os.path.join(folder, "ILSVRC2012_img_train.tar")
  with tarfile.open(train_tar, "w") as tr:
    for c, count in enumerate(counts):
      buf = io.BytesIO()
      with tarfile.open(fileobj=buf, mode="w") as sub:
        for i in range(count):
          name = f"{synsets[c]}_{i}.JPEG"
          colours[name] = 4 * k + 2
          _add(sub, name, _jpeg(rng, colours[name]))
          k += 1
      _add(tr, f"{synsets[c]}.tar", buf.getvalue())
  with tarfile.open(os.path.join(folder, "ILSVRC2012_img_val.tar"), "w") as va:
    for i in range(num_val):
      _add(va, f"ILSVRC2012_val_{i + 1:08d}.JPEG", _jpeg(rng, 100))
  return colours


def _rows(data_dir, split):
  """(file_name, label) of each row, reading the shards one after another."""
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  ds = builder.as_dataset(
      split, shuffle_files=False,
      decoders={"image": tfds.decode.SkipDecoding()},
      read_config=tfds.ReadConfig(interleave_cycle_length=1))
  rows = [(ex["file_name"].decode(), int(ex["label"]))
          for ex in ds.as_numpy_iterator()]
  return [r[0] for r in rows], np.array([r[1] for r in rows])


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  manual = os.path.join(root, "manual")
  colours = make_manual_dir(manual)
  data_dir = os.path.join(root, "data")
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual, num_shards=3, try_download_gcs=False))
  assert len(builder.info.splits["train"].shard_lengths) == 3
  names, labels = _rows(data_dir, "train")
  _, val_labels = _rows(data_dir, "validation")
  return dict(root=str(root), manual=manual, data_dir=data_dir,
              colour=np.array([colours[n] for n in names]), labels=labels,
              val_labels=val_labels)


def data_config(data_dir, **overrides):
  c = common.base_config().data
  c.dataset = "imagenet2012"
  c.data_dir = data_dir
  c.labeled_fraction = 0.25
  c.batch_size = 4
  c.uratio = 2
  c.image_size = SIZE
  c.shuffle_buffer = 16
  for k, v in overrides.items():
    c[k] = v
  return c


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(jax.devices()[:2])


@pytest.fixture(scope="module")
def pipe(fake, mesh, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("workdir"))
  return imagenet.StreamingPipeline(data_config(fake["data_dir"]), 0, mesh,
                                    workdir)


def _np(tree):
  return jax.tree.map(np.asarray, tree)


# ---------------------------------------------------------------------------
# Pure helpers


def test_tfds_id_to_index_over_shards():
  offsets = tf.constant(imagenet.shard_offsets([17, 17, 16]), tf.int64)
  ids = tf.constant([
      "imagenet2012-train.tfrecord-00000-of-00003__0",
      "imagenet2012-train.tfrecord-00001-of-00003__5",
      "imagenet2012-train.tfrecord-00002-of-00003__15",
      "imagenet2012-train[10:20].tfrecord-00002-of-00003__3"])
  np.testing.assert_array_equal(imagenet.tfds_id_to_index(ids, offsets),
                                [0, 22, 49, 37])
  with pytest.raises(tf.errors.InvalidArgumentError, match="tfds_id"):
    imagenet.tfds_id_to_index(tf.constant(["no-shard-here"]), offsets)


@pytest.mark.parametrize("n,count", [(10, 1), (10, 3), (50, 4), (2, 4)])
def test_process_shares_cover_rows_once(n, count):
  shares = [imagenet.process_share(n, p, count) for p in range(count)]
  assert shares[0][0] == 0 and shares[-1][1] == n
  assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
  sizes = [b - a for a, b in shares]
  assert max(sizes) - min(sizes) <= 1 and sizes[0] == max(sizes)


def test_crops():
  # Eval: 87.5% of the shorter side, centred.
  img = np.zeros((64, 128, 3), np.uint8)
  img[4:60, 36:92] = 255        # the central 56 x 56 square
  out = imagenet.eval_crop(tf.io.encode_jpeg(img, quality=100), SIZE).numpy()
  assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
  assert out[2:-2, 2:-2].min() > 230
  # Train: a random crop, fixed by its seed.
  enc = tf.io.encode_jpeg(
      np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
  a = imagenet.train_crop(enc, tf.constant([1, 2], tf.int64), SIZE).numpy()
  b = imagenet.train_crop(enc, tf.constant([1, 2], tf.int64), SIZE).numpy()
  c = imagenet.train_crop(enc, tf.constant([1, 3], tf.int64), SIZE).numpy()
  assert a.shape == (SIZE, SIZE, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_fraction_split():
  labels = np.repeat(np.arange(5), CLASS_COUNTS)
  s = splits_lib.fraction_split(labels, 1000, 0.25, seed=3)
  expected = [max(1, int(np.floor(0.25 * n + 0.5))) for n in CLASS_COUNTS]
  np.testing.assert_array_equal(np.bincount(labels[s.labeled], minlength=5),
                                expected)
  np.testing.assert_array_equal(np.sort(np.r_[s.labeled, s.unlabeled]),
                                np.arange(len(labels)))
  again = splits_lib.fraction_split(labels, 1000, 0.25, seed=3)
  np.testing.assert_array_equal(s.labeled, again.labeled)
  other = splits_lib.fraction_split(labels, 1000, 0.25, seed=4)
  assert not np.array_equal(s.labeled, other.labeled)
  every = splits_lib.fraction_split(labels, 1000, 0.25, seed=3, unlabeled="all")
  assert len(every.unlabeled) == len(labels)
  with pytest.raises(R2D2Error, match="labeled_fraction"):
    splits_lib.fraction_split(labels, 1000, 1.5, seed=3)


# ---------------------------------------------------------------------------
# Preparing and errors


def test_prepare_from_manual_dir_and_errors(fake, mesh, tmp_path):
  empty = str(tmp_path / "empty")
  with pytest.raises(R2D2Error, match="downloaded by hand.*manual_dir"):
    pipeline_lib.make_pipeline(data_config(empty), 0, mesh)
  # A manual_dir without the validation tar: the error names the file.
  partial = tmp_path / "partial"
  partial.mkdir()
  os.symlink(os.path.join(fake["manual"], "ILSVRC2012_img_train.tar"),
             partial / "ILSVRC2012_img_train.tar")
  with pytest.raises(R2D2Error, match="ILSVRC2012_img_val.tar not found"):
    pipeline_lib.make_pipeline(data_config(empty, manual_dir=str(partial)), 0,
                               mesh)
  # The whole manual_dir: make_pipeline prepares ImageNet and streams it.
  p = pipeline_lib.make_pipeline(
      data_config(empty, manual_dir=fake["manual"]), 0, mesh)
  assert isinstance(p, imagenet.StreamingPipeline)
  assert p.num_train == NUM_TRAIN
  assert p.info.image_shape == (SIZE, SIZE, 3) and p.info.num_classes == 1000
  np.testing.assert_array_equal(np.bincount(p.train_labels), CLASS_COUNTS)


# ---------------------------------------------------------------------------
# Labels, split, cache


def test_labels_split_and_cache(fake, pipe, mesh, tmp_path, monkeypatch):
  np.testing.assert_array_equal(pipe.train_labels, fake["labels"])
  expected = [max(1, int(np.floor(0.25 * n + 0.5))) for n in CLASS_COUNTS]
  np.testing.assert_array_equal(
      np.bincount(fake["labels"][pipe.split.labeled], minlength=5), expected)
  assert not set(pipe.split.labeled) & set(pipe.split.unlabeled)
  assert len(pipe.split.labeled) + len(pipe.split.unlabeled) == NUM_TRAIN
  assert pipe.steps_per_epoch() == -(-len(pipe.split.unlabeled) // 8)
  assert pipe.steps_per_epoch("labeled") == -(-len(pipe.split.labeled) // 4)

  # The label pass runs once per workdir; later pipelines read the cache.
  workdir = str(tmp_path)
  config = data_config(fake["data_dir"])
  first = imagenet.StreamingPipeline(config, 0, mesh, workdir)
  cache = os.path.join(workdir, imagenet.LABEL_CACHE)
  assert os.path.exists(cache) and os.path.exists(
      os.path.join(workdir, "split.json"))
  stamp = os.stat(cache).st_mtime_ns

  def no_scan(*args, **kwargs):
    raise AssertionError("labels read again despite the cache")
  monkeypatch.setattr(imagenet, "scan_labels", no_scan)
  second = imagenet.StreamingPipeline(config, 0, mesh, workdir)
  assert os.stat(cache).st_mtime_ns == stamp
  np.testing.assert_array_equal(second.train_labels, first.train_labels)
  np.testing.assert_array_equal(second.split.labeled, first.split.labeled)
  # Another labeled set in the same workdir is refused (split.json).
  with pytest.raises(R2D2Error, match="differs"):
    imagenet.StreamingPipeline(config, 1, mesh, workdir)


# ---------------------------------------------------------------------------
# Streams


def test_train_batches(fake, pipe):
  it = pipe.iterate(0)
  labeled, unlabeled = set(pipe.split.labeled), set(pipe.split.unlabeled)
  for _ in range(4):
    b = next(it)
    assert b["labeled"]["image"].sharding.spec == jax.sharding.PartitionSpec(
        "data")
    b = _np(b)
    for stream, n, pool in (("labeled", 4, labeled),
                            ("unlabeled", 8, unlabeled)):
      x = b[stream]
      assert x["image"].shape == (n, SIZE, SIZE, 3)
      assert x["image"].dtype == np.uint8
      assert x["label"].dtype == np.int32 and x["index"].dtype == np.int32
      assert set(x["index"].tolist()) <= pool
      np.testing.assert_array_equal(x["label"], fake["labels"][x["index"]])
      # Each image is the flat colour of the example its index names.
      np.testing.assert_allclose(x["image"].mean((1, 2, 3)),
                                 fake["colour"][x["index"]], atol=2)


def test_train_order_seeded_by_start_step(pipe):
  first = lambda start: np.asarray(
      next(pipe.iterate(start))["unlabeled"]["index"])
  start0 = first(0)
  np.testing.assert_array_equal(start0, first(0))
  assert not np.array_equal(start0, first(7))
  only = _np(next(pipe.iterate(0, ("labeled",))))
  assert set(only) == {"labeled"}


def test_streams_need_uratio(fake, mesh):
  p = imagenet.StreamingPipeline(data_config(fake["data_dir"], uratio=0), 0,
                                 mesh)
  assert set(_np(next(p.iterate(0)))) == {"labeled"}
  with pytest.raises(R2D2Error, match="uratio"):
    p.iterate(0, ("labeled", "unlabeled"))


def test_eval_covers_each_split_once(fake, pipe):
  batches = [_np(b) for b in pipe.eval_batches("test", 4)]
  assert len(batches) == 3
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  label = np.concatenate([b["label"] for b in batches])
  assert mask.sum() == NUM_VAL and batches[0]["image"].shape == (4, SIZE,
                                                                  SIZE, 3)
  np.testing.assert_array_equal(np.sort(index[mask]), np.arange(NUM_VAL))
  np.testing.assert_array_equal(label[mask], fake["val_labels"][index[mask]])

  batches = [_np(b) for b in pipe.eval_batches("train", 8)]
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  images = np.concatenate([b["image"] for b in batches])
  assert mask.sum() == NUM_TRAIN and index.dtype == np.int32
  np.testing.assert_array_equal(np.sort(index[mask]), np.arange(NUM_TRAIN))
  np.testing.assert_allclose(images[mask].mean((1, 2, 3)),
                             fake["colour"][index[mask]], atol=2)
  with pytest.raises(R2D2Error, match="eval split"):
    next(pipe.eval_batches("validation", 4))


def test_process_shares(fake, pipe):
  """Two (simulated) processes: disjoint reads, equal batch counts."""
  for split, n in (("test", NUM_VAL), ("train", NUM_TRAIN)):
    seen, counts = [], []
    for p in range(2):
      rows = list(pipe.eval_host_batches(split, 4, p, 2).as_numpy_iterator())
      counts.append(len(rows))
      seen += [i for b in rows for i in b["index"][b["mask"]].tolist()]
    assert counts[0] == counts[1] == -(-(-(-n // 2)) // 4)
    assert sorted(seen) == list(range(n))
  for p in range(2):
    start, stop = imagenet.process_share(NUM_TRAIN, p, 2)
    b = next(pipe.host_batches(0, process_index=p,
                               process_count=2).as_numpy_iterator())
    assert b["labeled"]["index"].shape == (2,)
    assert b["unlabeled"]["index"].shape == (4,)
    for x in b.values():
      assert ((x["index"] >= start) & (x["index"] < stop)).all()


# ---------------------------------------------------------------------------
# tfds's own mock data


def test_runs_on_tfds_mock_data(mesh, tmp_path):
  # Mock data needs the metadata (split sizes) of a prepared dataset: prepare a
  # one-shard fake whose train and validation splits have num_examples rows.
  n = 24
  make_manual_dir(str(tmp_path / "manual"), counts=(n,), num_val=n)
  tfds.builder("imagenet2012", data_dir=str(tmp_path / "data")
               ).download_and_prepare(
                   download_config=tfds.download.DownloadConfig(
                       manual_dir=str(tmp_path / "manual"),
                       try_download_gcs=False))
  with tfds.testing.mock_data(num_examples=n, data_dir=str(tmp_path / "data")):
    p = imagenet.StreamingPipeline(
        data_config(None, labeled_fraction=0.5, unlabeled="all"), 0, mesh,
        str(tmp_path / "w"))
    assert p.num_train == n
    # Mock labels are random over 1000 classes: each class present is labeled.
    assert set(p.train_labels[p.split.labeled]) == set(p.train_labels)
    b = _np(next(p.iterate(0)))
    assert b["labeled"]["image"].shape == (4, SIZE, SIZE, 3)
    assert set(b["labeled"]["index"].tolist()) <= set(p.split.labeled)
    masks = [np.asarray(e["mask"]) for e in p.eval_batches("test", 8)]
    assert len(masks) == 3 and sum(m.sum() for m in masks) == n
