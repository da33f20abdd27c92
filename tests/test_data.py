"""Splits, the step-indexed sampler, the pipeline's batches and data errors."""

import os

import jax
import numpy as np
import pytest

from r2d2_jax import sharding
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.data import sampler as sampler_lib
from r2d2_jax.data import sources
from r2d2_jax.data import splits as splits_lib
from r2d2_jax.errors import R2D2Error
from tests import helpers


def test_split_is_balanced_and_deterministic():
  labels = np.repeat(np.arange(10), 30)
  a = splits_lib.make_split(labels, 10, 50, seed=3)
  b = splits_lib.make_split(labels, 10, 50, seed=3)
  c = splits_lib.make_split(labels, 10, 50, seed=4)
  np.testing.assert_array_equal(a.labeled, b.labeled)
  assert not np.array_equal(a.labeled, c.labeled)
  np.testing.assert_array_equal(np.bincount(labels[a.labeled]), [5] * 10)
  assert len(np.intersect1d(a.labeled, a.unlabeled)) == 0
  assert len(a.labeled) + len(a.unlabeled) == len(labels)
  every = splits_lib.make_split(labels, 10, 50, seed=3, unlabeled="all")
  assert len(every.unlabeled) == len(labels)


def test_split_errors():
  labels = np.repeat(np.arange(10), 3)
  with pytest.raises(R2D2Error, match="class 0 has only 3"):
    splits_lib.make_split(labels, 10, 50, seed=0)
  with pytest.raises(R2D2Error, match="multiple of the number of classes"):
    splits_lib.make_split(labels, 10, 15, seed=0)


def test_split_saved_and_checked(tmp_path):
  labels = np.repeat(np.arange(10), 30)
  path = os.path.join(tmp_path, "split.json")
  s = splits_lib.make_split(labels, 10, 50, seed=0)
  splits_lib.save_or_check(s, path, {"dataset": "x"})
  splits_lib.save_or_check(s, path, {"dataset": "x"})  # same: fine
  other = splits_lib.make_split(labels, 10, 50, seed=1)
  with pytest.raises(R2D2Error, match="differs"):
    splits_lib.save_or_check(other, path, {"dataset": "x"})


def test_sampler_is_a_function_of_seed_and_step():
  a = sampler_lib.StepSampler(103, 16, seed=7)
  b = sampler_lib.StepSampler(103, 16, seed=7)  # a "restarted" sampler
  for step in (0, 5, 6, 100):
    np.testing.assert_array_equal(a.positions(step), b.positions(step))
  assert not np.array_equal(a.positions(0), a.positions(1))
  # Each epoch is a permutation: over 103 batches of 16 every example is seen
  # exactly 16 times.
  seen = np.concatenate([a.positions(k) for k in range(103)])
  np.testing.assert_array_equal(np.bincount(seen, minlength=103), [16] * 103)


def test_pipeline_batches_deterministic_and_sharded():
  mesh = sharding.make_mesh(jax.devices()[:4])
  c = helpers.tiny_config(**{"data.uratio": 2})
  arrays = helpers.fake_splits()
  p1 = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
  p2 = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
  b1, b2 = p1.global_batch(3), p2.global_batch(3)
  jax.tree.map(np.testing.assert_array_equal, b1, b2)
  assert b1["labeled"]["image"].shape == (16, 8, 8, 1)
  assert b1["unlabeled"]["image"].shape == (32, 8, 8, 1)
  assert b1["labeled"]["image"].sharding.spec == jax.sharding.PartitionSpec(
      "data")
  labeled = set(p1.split.labeled.tolist())
  assert set(np.asarray(b1["labeled"]["index"]).tolist()) <= labeled
  assert not set(np.asarray(b1["unlabeled"]["index"]).tolist()) & labeled
  # The index is the row in the train split.
  idx = np.asarray(b1["labeled"]["index"])
  np.testing.assert_array_equal(np.asarray(b1["labeled"]["image"]),
                                arrays["train"].images[idx])


def test_eval_covers_split_exactly_once():
  mesh = sharding.make_mesh(jax.devices()[:4])
  c = helpers.tiny_config()
  arrays = helpers.fake_splits(n_test=50)
  p = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
  seen = []
  for b in p.eval_batches("test", 16):
    mask = np.asarray(b["mask"])
    seen.extend(np.asarray(b["index"])[mask].tolist())
  assert sorted(seen) == list(range(50))


def test_batch_size_not_divisible_by_devices():
  mesh = sharding.make_mesh(jax.devices()[:4])
  c = helpers.tiny_config(**{"data.batch_size": 10})
  with pytest.raises(R2D2Error, match="not divisible by the number of devices"):
    pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=helpers.fake_splits())


def test_unknown_dataset():
  with pytest.raises(R2D2Error, match="Valid datasets: cifar10, cifar100, "
                     "digits, imagenet2012, mnist, svhn_cropped"):
    sources.get_info("mnist2")


def test_missing_offline_files(tmp_path):
  (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
  with pytest.raises(R2D2Error) as e:
    sources.load_in_memory("mnist", data_dir=str(tmp_path / "d"),
                           manual_dir=str(tmp_path))
  msg = str(e.value)
  assert "t10k-images-idx3-ubyte.gz" in msg and str(tmp_path) in msg
  assert "train-images-idx3-ubyte.gz," not in msg.split("not found")[0]


def test_validate_names_the_source():
  info = sources.get_info("digits")
  bad = helpers.fake_splits()
  bad["train"].labels[3] = 12
  with pytest.raises(R2D2Error, match=r"mydir.*labels in \[0, 12\]"):
    sources.validate(info, bad, "mydir")
  with pytest.raises(R2D2Error, match="shape"):
    sources.validate(info, helpers.fake_splits(shape=(9, 9, 1)), "mydir")


def test_digits_embedded():
  s = sources.load_in_memory("digits")
  assert s["train"].images.shape == (1437, 8, 8, 1)
  assert len(s["test"]) == 360
  assert s["train"].images.max() == 255


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_tfds_datasets_on_mock_data(name, shape):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=40):
    s = sources.load_in_memory(name)
  assert s["train"].images.shape == (40, *shape)
  assert s["train"].images.dtype == np.uint8
