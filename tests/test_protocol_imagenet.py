"""The validation split of streamed ImageNet, on test_imagenet.py's tiny fake ImageNet."""

import numpy as np
import pytest

from r2d2_jax.data import imagenet
from r2d2_jax.data import splits as splits_lib
from r2d2_jax.errors import R2D2Error
from tests.test_imagenet import CLASS_COUNTS, NUM_TRAIN, _np, data_config
from tests.test_imagenet import fake, mesh  # pylint: disable=unused-import


def test_fraction_split_with_val():
  labels = np.repeat(np.arange(5), CLASS_COUNTS)
  s = splits_lib.fraction_split(labels, 5, 0.25, seed=3, num_val=10)
  np.testing.assert_array_equal(np.bincount(labels[s.val]), [2] * 5)
  # The labeled count is a fraction of the whole class, as without val.
  expected = [max(1, int(np.floor(0.25 * n + 0.5))) for n in CLASS_COUNTS]
  np.testing.assert_array_equal(np.bincount(labels[s.labeled], minlength=5),
                                expected)
  assert not set(s.val) & (set(s.labeled) | set(s.unlabeled))
  every = splits_lib.fraction_split(labels, 5, 0.25, seed=3, unlabeled="all",
                                  num_val=10)
  np.testing.assert_array_equal(every.val, s.val)
  assert not set(every.val) & set(every.unlabeled)
  # Without val the labeled set is the one drawn before validation sets.
  np.testing.assert_array_equal(
      splits_lib.fraction_split(labels, 5, 0.25, seed=3).labeled,
      splits_lib.fraction_split(labels, 1000, 0.25, seed=3).labeled)
  # Class 4 has 6 examples, 2 of them labeled: at most 4 per class.
  with pytest.raises(R2D2Error, match="largest possible data.num_val here is "
                     r"20 \(4 per class\)"):
    splits_lib.fraction_split(labels, 5, 0.25, seed=3, num_val=25)


def test_streaming_pipeline_passes_num_val(fake, mesh):  # pylint: disable=redefined-outer-name
  # The fake has 5 of ImageNet's 1000 classes: no balanced validation set.
  with pytest.raises(R2D2Error, match="num_val=1000 .* class 5 has only 0"):
    imagenet.StreamingPipeline(data_config(fake["data_dir"], num_val=1000), 0,
                               mesh)


def test_val_eval_covers_val_rows_once_per_process_share(fake, mesh):  # pylint: disable=redefined-outer-name
  p = imagenet.StreamingPipeline(data_config(fake["data_dir"]), 0, mesh)
  assert p.eval_splits == ("test",)
  # Validation rows chosen by hand, unevenly over the two processes' shares.
  val = np.array([0, 3, 4, 7, 9, 30, 41])
  p.split = splits_lib.Split(p.split.labeled, p.split.unlabeled, val)
  assert p.eval_splits == ("test", "val")
  seen, counts = [], []
  for proc in range(2):
    start, stop = imagenet.process_share(NUM_TRAIN, proc, 2)
    rows = list(p.eval_host_batches("val", 2, proc, 2).as_numpy_iterator())
    counts.append(len(rows))
    for b in rows:
      idx = b["index"][b["mask"]]
      assert ((idx >= start) & (idx < stop)).all()
      np.testing.assert_array_equal(b["label"][b["mask"]], fake["labels"][idx])
      np.testing.assert_allclose(b["image"][b["mask"]].mean((1, 2, 3)),
                                 fake["colour"][idx], atol=2)
      seen += idx.tolist()
  # Shares [0, 25) and [25, 50) hold 5 and 2 rows: 3 batches of 2 each.
  assert counts == [3, 3]
  assert sorted(seen) == val.tolist()
  batches = [_np(b) for b in p.eval_batches("val", 4)]
  index = np.concatenate([b["index"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  assert sorted(index[mask].tolist()) == val.tolist()
