"""The evaluation protocol: the validation split, the eval metrics, the history, the summaries."""

import dataclasses
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import results as results_lib
from configs import common
from r2d2_jax import analysis
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import main as main_lib
from r2d2_jax import metrics as metrics_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.data import sources
from r2d2_jax.data import splits as splits_lib
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import r2d2
from tests import helpers

LABELS = np.repeat(np.arange(10), 30)   # 30 train examples of each class


# ---------------------------------------------------------------------------
# The validation split


def test_val_split_balanced_disjoint_and_deterministic():
  s = splits_lib.make_split(LABELS, 10, 50, seed=3, num_val=100)
  np.testing.assert_array_equal(np.bincount(LABELS[s.val]), [10] * 10)
  np.testing.assert_array_equal(np.bincount(LABELS[s.labeled]), [5] * 10)
  assert not set(s.val) & set(s.labeled)
  assert not set(s.val) & set(s.unlabeled)
  np.testing.assert_array_equal(np.sort(np.r_[s.val, s.labeled, s.unlabeled]),
                                np.arange(len(LABELS)))
  again = splits_lib.make_split(LABELS, 10, 50, seed=3, num_val=100)
  for a, b in ((s.val, again.val), (s.labeled, again.labeled),
               (s.unlabeled, again.unlabeled)):
    np.testing.assert_array_equal(a, b)
  other = splits_lib.make_split(LABELS, 10, 50, seed=4, num_val=100)
  assert not np.array_equal(s.val, other.val)
  # 'all' (FixMatch, R2-D2's finetune) still leaves the validation rows out.
  every = splits_lib.make_split(LABELS, 10, 50, seed=3, unlabeled="all",
                                num_val=100)
  np.testing.assert_array_equal(every.val, s.val)
  np.testing.assert_array_equal(every.unlabeled,
                                np.setdiff1d(np.arange(len(LABELS)), s.val))
  # Fully supervised (-1): every example outside the validation set.
  full = splits_lib.make_split(LABELS, 10, -1, seed=3, num_val=100)
  np.testing.assert_array_equal(full.labeled, every.unlabeled)


def test_val_does_not_depend_on_labels_and_is_nested():
  vals = [splits_lib.make_split(LABELS, 10, k, seed=5, num_val=100).val
          for k in (10, 50, 200)]
  for v in vals[1:]:
    np.testing.assert_array_equal(v, vals[0])
  small = splits_lib.make_split(LABELS, 10, 50, seed=5, num_val=50).val
  assert set(small) <= set(vals[0])


def test_no_val_keeps_the_labeled_set_of_old_runs():
  """num_val=0: the labels are drawn exactly as before validation sets existed."""
  rng = np.random.default_rng(7)
  old = np.sort(np.concatenate([
      rng.choice(np.flatnonzero(LABELS == c), 5, replace=False)
      for c in range(10)]))
  s = splits_lib.make_split(LABELS, 10, 50, seed=7)
  np.testing.assert_array_equal(s.labeled, old)
  assert len(s.val) == 0


@pytest.mark.parametrize("num_labels,num_val,match", [
    # 30 per class, 5 labeled: at most 25 per class for validation.
    (50, 260, r"num_val=260 .* 26 validation examples per class.*largest "
              r"possible data.num_val here is 250 \(25 per class\)"),
    # Overlapping the labels requested: 20 labeled + 11 val > 30.
    (200, 110, r"class 0 has only 30 training examples and data.num_labels=200"
               r" takes 20 of them as labels.*largest possible data.num_val "
               r"here is 100"),
    (50, 15, "multiple of the number of classes"),
    (50, -10, "multiple of the number of classes"),
])
def test_val_errors_name_the_largest_value(num_labels, num_val, match):
  with pytest.raises(R2D2Error, match=match) as e:
    splits_lib.make_split(LABELS, 10, num_labels, seed=0, num_val=num_val)
  assert "\n" not in str(e.value)


def test_labels_error_comes_before_val_error():
  with pytest.raises(R2D2Error, match="num_labels=400 asks for 40 labels"):
    splits_lib.make_split(LABELS, 10, 400, seed=0, num_val=100)


def test_split_json_records_and_checks_val(tmp_path):
  path = os.path.join(tmp_path, "split.json")
  s = splits_lib.make_split(LABELS, 10, 50, seed=0, num_val=100)
  splits_lib.save_or_check(s, path, {"dataset": "x"})
  with open(path) as f:
    assert json.load(f)["val"] == s.val.tolist()
  splits_lib.save_or_check(s, path, {"dataset": "x"})  # same: fine
  # Same labels, another validation set: refused.
  other = splits_lib.Split(s.labeled, s.unlabeled, s.val[1:])
  with pytest.raises(R2D2Error, match="differs"):
    splits_lib.save_or_check(other, path, {"dataset": "x"})
  # An old split.json without 'val': fine without a validation set, a clear
  # error with one.
  old = os.path.join(tmp_path, "old.json")
  none = splits_lib.make_split(LABELS, 10, 50, seed=0)
  with open(old, "w") as f:
    json.dump({"dataset": "x", "labeled": none.labeled.tolist(),
               "num_unlabeled": len(none.unlabeled)}, f)
  splits_lib.save_or_check(none, old, {"dataset": "x"})
  with pytest.raises(R2D2Error, match="saved without a validation set.*"
                     "num_val=0"):
    splits_lib.save_or_check(s, old, {"dataset": "x"})


def test_pipeline_never_trains_on_val_and_evaluates_it(tmp_path):
  mesh = sharding.make_mesh(jax.devices()[:4])
  arrays = helpers.fake_splits(n_train=200)
  for unlabeled in ("rest", "all"):
    c = helpers.tiny_config(**{"data.uratio": 2, "data.num_val": 50,
                               "data.unlabeled": unlabeled})
    p = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, str(tmp_path / unlabeled),
                                      arrays=arrays)
    val = set(p.split.val.tolist())
    assert len(val) == 50 and p.eval_splits == ("test", "val")
    for step in range(30):  # more than an epoch of either stream
      b = p.host_batch(step)
      for stream in ("labeled", "unlabeled"):
        assert not set(b[stream]["index"].tolist()) & val
    seen = []
    for b in p.eval_batches("val", 16):
      mask, idx = np.asarray(b["mask"]), np.asarray(b["index"])
      np.testing.assert_array_equal(np.asarray(b["image"])[mask],
                                    arrays["train"].images[idx[mask]])
      np.testing.assert_array_equal(np.asarray(b["label"])[mask],
                                    arrays["train"].labels[idx[mask]])
      seen += idx[mask].tolist()
    assert sorted(seen) == sorted(val)
    with open(tmp_path / unlabeled / "split.json") as f:
      assert json.load(f)["val"] == p.split.val.tolist()
  none = pipeline_lib.InMemoryPipeline(helpers.tiny_config().data, 0, mesh,
                                       arrays=arrays)
  assert none.eval_splits == ("test",)
  with pytest.raises(R2D2Error, match="num_val is 0"):
    next(none.eval_batches("val", 16))


def test_r2d2_table_never_learns_val_rows(tmp_path):
  for unlabeled in ("rest", "all"):
    c = helpers.tiny_config("r2d2", **{"data.num_val": 100,
                                       "data.unlabeled": unlabeled,
                                       "data.uratio": 3})
    common.r2d2_block(c)
    stage = train.Stage(c, str(tmp_path / unlabeled),
                        mesh=sharding.make_mesh(jax.devices()[:2]))
    state = r2d2.repredict(stage.hooks, stage.init_state())
    val = stage.pipeline.split.val
    assert len(val) == 100
    np.testing.assert_array_equal(np.asarray(state.learnable)[val], 0.0)
    np.testing.assert_array_equal(np.asarray(state.table)[val], 0.0)
    assert not set(val) & set(stage.task.unlabeled_index)


# ---------------------------------------------------------------------------
# Evaluation


def _numpy_eval(logits, labels):
  logits = np.asarray(logits, np.float64)
  top5 = np.argsort(-logits, axis=1)[:, :5]
  shifted = logits - logits.max(1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
  return {"accuracy": np.mean(logits.argmax(1) == labels),
          "top5": np.mean((top5 == labels[:, None]).any(1)),
          "losses/eval_xe": -np.mean(logp[np.arange(len(labels)), labels])}


def test_eval_reports_top1_top5_xe_on_test_and_val(tmp_path):
  # Batches of 64 do not divide the 360 test or 100 val images: padding.
  c = helpers.tiny_config(**{"data.num_val": 100, "data.eval_batch_size": 64})
  stage = train.Stage(c, str(tmp_path), mesh=sharding.make_mesh(jax.devices()))
  state = stage.init_state()
  # Make the EMA differ from the raw weights.
  state = state.replace(ema_params=jax.tree.map(lambda x: 0.5 * x,
                                                state.params))
  assert stage.eval_splits == ("test", "val")
  got = stage.evaluate_all(state)
  p = stage.pipeline
  images = {"test": p.test.images, "val": p.train.images[p.split.val]}
  labels = {"test": p.test.labels, "val": p.train.labels[p.split.val]}
  expected_keys = set()
  for split in ("test", "val"):
    x = train.normalize(jnp.asarray(images[split]), stage.info)
    for name, ema in (("raw", False), ("ema", True)):
      logits = jax.device_get(stage.net.apply_eval(state.variables(ema), x))
      want = _numpy_eval(logits, labels[split])
      for metric, value in want.items():
        key = f"{metric}/{split}/{name}"
        expected_keys.add(key)
        np.testing.assert_allclose(got[key], value, rtol=1e-5, atol=1e-6,
                                   err_msg=key)
      # An untrained network: top-5 is neither top-1 nor 1.
      assert want["accuracy"] < want["top5"] < 1.0
  assert set(got) == expected_keys


def test_no_top5_with_five_classes(tmp_path, monkeypatch):
  get_info = sources.get_info
  monkeypatch.setattr(sources, "get_info",
                      lambda name, config=None: dataclasses.replace(
                          get_info(name, config), num_classes=5))
  c = helpers.tiny_config(**{"data.num_val": 20, "data.num_labels": 10})
  mesh = sharding.make_mesh(jax.devices()[:2])
  p = pipeline_lib.InMemoryPipeline(
      c.data, 0, mesh, arrays=helpers.fake_splits(num_classes=5))
  assert p.info.num_classes == 5
  stage = train.Stage(c, str(tmp_path), mesh=mesh, pipeline=p)
  got = stage.evaluate_all(stage.init_state())
  assert "accuracy/val/raw" in got and "losses/eval_xe/test/ema" in got
  assert not [k for k in got if k.startswith("top5/")]


# ---------------------------------------------------------------------------
# The evaluation history


def _rows(path):
  return [{k: v for k, v in r.items() if k != "time"}
          for r in metrics_lib.read_history(path)]


def test_history_after_a_kill_and_resume_equals_an_uninterrupted_run(
    tmp_path, monkeypatch):
  def cfg():
    return helpers.tiny_config(total_steps=6, eval_every_steps=1,
                               checkpoint_every_steps=3,
                               **{"data.num_val": 50})
  train.train_and_evaluate(cfg(), str(tmp_path / "straight"))
  straight = _rows(tmp_path / "straight" / metrics_lib.EVAL_HISTORY)
  assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
  assert {"accuracy/test/raw", "accuracy/val/ema", "top5/val/raw",
          "losses/eval_xe/test/ema"} <= set(straight[0])

  # Killed at step 6, after its evaluation and before its checkpoint: the
  # history holds steps 1..6, the last checkpoint is step 3.
  real_save = ckpt_lib.Checkpointer.save

  def save(self, step, *args, **kwargs):
    if step == 6:
      raise KeyboardInterrupt("killed")
    return real_save(self, step, *args, **kwargs)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", save)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(cfg(), str(tmp_path / "resumed"))
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", real_save)
  path = tmp_path / "resumed" / metrics_lib.EVAL_HISTORY
  assert [r["step"] for r in _rows(path)] == [1, 2, 3, 4, 5, 6]
  with open(path, "a") as f:  # and a row cut short by the kill
    f.write('{"step": 7, "accuracy/te')
  assert len(_rows(path)) == 6

  train.train_and_evaluate(cfg(), str(tmp_path / "resumed"))
  assert _rows(path) == straight
  # A finished run read back leaves its history alone.
  before = open(path).read()
  train.train_and_evaluate(cfg(), str(tmp_path / "resumed"))
  assert open(path).read() == before


def test_read_history_tolerates_only_a_cut_last_line(tmp_path):
  path = str(tmp_path / "h.jsonl")
  with open(path, "w") as f:
    f.write('{"step": 1, "a": 0.5}\n{"step": 2, "a": 0.75}\n{"step": 3, "a"')
  assert metrics_lib.read_history(path) == [{"step": 1, "a": 0.5},
                                            {"step": 2, "a": 0.75}]
  with open(path, "w") as f:
    f.write('{"step": 1, "a": 0.5}\n{"step": 2, \n{"step": 3, "a": 1.0}\n')
  with pytest.raises(R2D2Error, match="line 2, is not JSON"):
    metrics_lib.read_history(path)
  assert metrics_lib.read_history(str(tmp_path / "missing")) == []


# ---------------------------------------------------------------------------
# The summaries


def _history():
  """25 evaluations with hand-chosen accuracies."""
  test = [0.50, 0.60, 0.70, 0.72, 0.74, 0.80, 0.81, 0.79, 0.83, 0.82,
          0.84, 0.855, 0.83, 0.86, 0.84, 0.85, 0.87, 0.86, 0.88, 0.85,
          0.86, 0.89, 0.87, 0.90, 0.86]
  # Best validation 0.91 at evaluations 12 and 17 (0-based): the tie goes to
  # the later one, whose test accuracy is 0.86 (and not the best test, 0.90).
  val = [0.5, 0.6, 0.7, 0.7, 0.7, 0.8, 0.8, 0.8, 0.8, 0.8,
         0.8, 0.8, 0.91, 0.8, 0.8, 0.8, 0.8, 0.91, 0.8, 0.8,
         0.8, 0.8, 0.8, 0.8, 0.8]
  return [{"step": 10 * (i + 1), "accuracy/test/raw": t, "accuracy/val/raw": v}
          for i, (t, v) in enumerate(zip(test, val))]


def test_summaries_on_a_constructed_history():
  h = _history()
  assert analysis.final(h, "accuracy/test/raw") == 0.86
  # The last 20 test accuracies sorted: 0.79 0.80 0.81 0.82 0.83 0.83 0.84
  # 0.84 0.85 0.85 | 0.855 0.86 0.86 0.86 0.86 0.87 0.87 0.88 0.89 0.90; the
  # median is (0.85 + 0.855) / 2 (of all 25 it would be 0.84).
  assert analysis.median_last(h, "accuracy/test/raw") == pytest.approx(0.8525)
  # nan: fewer than 20 evaluations.
  assert math.isnan(analysis.median_last(h[:19], "accuracy/test/raw"))
  assert analysis.median_last(h, "accuracy/test/raw", n=3) == 0.87
  assert analysis.at_best(h, "accuracy/val/raw", "accuracy/test/raw") == 0.86
  assert analysis.at_best(h[:15], "accuracy/val/raw",
                          "accuracy/test/raw") == 0.83
  assert math.isnan(analysis.at_best(h, "accuracy/val/ema",
                                     "accuracy/test/ema"))
  errors = results_lib.stage_errors(h, {}, "raw")
  assert errors["final"] == pytest.approx(14.0)
  assert errors["median last 20"] == pytest.approx(14.75)
  assert errors["at best val"] == pytest.approx(14.0)
  # A run from before the history: only the final figure, from its metrics.
  old = results_lib.stage_errors([], {"accuracy/raw": 0.9}, "raw")
  assert old["final"] == pytest.approx(10.0)
  assert math.isnan(old["at best val"]) and math.isnan(old["median last 20"])


def test_results_table_names_its_headline():
  with_val = {"s": {w: {"at best val": [14.0, 16.0], "median last 20": [1, 2],
                        "final": [3, 4]} for w in results_lib.WEIGHTS}}
  assert results_lib.headline(with_val) == "at best val"
  without = {"s": {w: {"at best val": [math.nan, math.nan],
                       "median last 20": [1, 2], "final": [3, 4]}
                   for w in results_lib.WEIGHTS}}
  assert results_lib.headline(without) == "median last 20"
  lines = results_lib.table(with_val, {"s": "stage s"}, "at best val")
  assert "raw at best val (headline)" in lines[0]
  assert lines[2].startswith("| stage s | 15.00 ± 1.41 (14.00, 16.00) |")
  assert "n/a" in results_lib.table(without, {"s": "x"}, "median last 20")[2]


def test_main_summary_table():
  text = main_lib.summary({
      "supervised": {"accuracy/test/raw": 0.8, "accuracy/test/ema": 0.81},
      "finetune": {"accuracy/test/raw": 0.9, "accuracy/test/ema": 0.91,
                   "accuracy/val/raw": 0.92, "accuracy/val/ema": 0.93}})
  head, sup, fin = text.splitlines()
  assert head.split()[-4:] == ["test/raw", "test/ema", "val/raw", "val/ema"]
  assert sup.split() == ["supervised", "0.8000", "0.8100", "-", "-"]
  assert fin.split() == ["finetune", "0.9000", "0.9100", "0.9200", "0.9300"]
