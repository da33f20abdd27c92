"""The trainer: sharding parity, compilation, checkpoints, resume, stages, errors."""

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import methods
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import NonFiniteError, R2D2Error
from tests import helpers


def _stage(tmp_path, name, config, devices):
  mesh = sharding.make_mesh(devices)
  return train.Stage(config, str(tmp_path / name), mesh=mesh)


def test_four_devices_equal_one(tmp_path):
  c = helpers.tiny_config()
  s4 = _stage(tmp_path, "four", c, jax.devices()[:4])
  s1 = _stage(tmp_path, "one", c, jax.devices()[:1])
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  assert len(jax.tree.leaves(st4.params)[0].sharding.device_set) == 4
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)


def test_no_recompilation_across_steps(tmp_path):
  s = _stage(tmp_path, "a", helpers.tiny_config(), jax.devices()[:2])
  helpers.run_steps(s, 4)
  assert s.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_checkpoint_round_trip(tmp_path):
  s = _stage(tmp_path, "a", helpers.tiny_config(), jax.devices()[:2])
  state, _ = helpers.run_steps(s, 2)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "ck"), async_save=False)
  ck.save(2, state, {"step": 2})
  restored, meta = ck.restore(2, s.abstract_state)
  ck.close()
  assert meta["step"] == 2
  chex.assert_trees_all_equal(jax.device_get(state), jax.device_get(restored))
  assert (jax.tree.leaves(restored.params)[0].sharding ==
          jax.tree.leaves(s.state_shardings.params)[0])


def _final_params(workdir):
  state, meta = ckpt_lib.restore_raw(workdir)
  return state, meta


def test_resume_continues_identically(tmp_path):
  c = helpers.tiny_config(total_steps=6, checkpoint_every_steps=3)
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  # Interrupted run: train to 3, then the same command again to 6.
  c3 = helpers.tiny_config(total_steps=6, checkpoint_every_steps=3)
  stage = train.Stage(c3, str(tmp_path / "resumed"))
  stage.total_steps = 3  # stop early, as if killed after the step-3 save
  stage.run()
  assert ckpt_lib.Checkpointer(str(tmp_path / "resumed" / "checkpoints")
                               ).latest_step() == 3
  train.train_and_evaluate(c3, str(tmp_path / "resumed"))
  a, meta_a = _final_params(str(tmp_path / "straight"))
  b, meta_b = _final_params(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 6
  chex.assert_trees_all_equal(a, b)


def test_rerun_of_finished_run_returns_results(tmp_path):
  c = helpers.tiny_config()
  first = train.train_and_evaluate(c, str(tmp_path))
  again = train.train_and_evaluate(c, str(tmp_path))
  assert first == again and 0.0 <= first["accuracy/test/raw"] <= 1.0


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, "nan_at_3", helpers.nan_method())
  c = helpers.tiny_config("nan_at_3", total_steps=6, checkpoint_every_steps=2,
                          log_every_steps=1)
  with pytest.raises(NonFiniteError, match=r"'losses/total' is nan at step 3.*"
                     r"checkpoint \(step 2\)"):
    train.train_and_evaluate(c, str(tmp_path))
  ck = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  assert ck.latest_step() == 2


def test_stages_hand_over_checkpoints(tmp_path):
  c = helpers.tiny_config(total_steps=2)
  c.stage_order = ("pretrain", "finetune")
  c.stages = {"pretrain": {"optimizer": {"lr": 0.05}},
              "finetune": {"optimizer": {"lr": 0.001}, "total_steps": 3}}
  res = train.train_and_evaluate(c, str(tmp_path))
  assert set(res) == {"pretrain", "finetune"}
  pre, _ = ckpt_lib.restore_raw(str(tmp_path / "pretrain"))
  fin, meta = ckpt_lib.restore_raw(str(tmp_path / "finetune"))
  assert meta["step"] == 3 and meta["stage"] == "finetune"
  # The finetune stage started from the pretrain network: 3 small steps away.
  diff = jax.tree.map(lambda a, b: np.abs(a - b).max(), pre["params"],
                      fin["params"])
  assert max(jax.tree.leaves(diff)) < 0.05
  # Selecting only the last stage reuses the first stage's checkpoint.
  c.run_stages = "finetune"
  assert set(train.train_and_evaluate(c, str(tmp_path))) == {"finetune"}
  c.run_stages = "nope"
  with pytest.raises(R2D2Error, match="unknown stages"):
    train.train_and_evaluate(c, str(tmp_path))


def test_stage_init_from_stage_scratch_or_named(tmp_path):
  c = helpers.tiny_config(total_steps=2)
  c.stage_order = ("a", "b", "c")
  c.stages = {"a": {"optimizer": {"lr": 0.05}},
              # From scratch: the same config as `a` gives the same network.
              "b": {"optimizer": {"lr": 0.05}, "init_from_stage": "none"},
              # From `a`, not from the previous stage `b`; lr 0 keeps a's weights.
              "c": {"optimizer": {"lr": 0.0}, "init_from_stage": "a",
                    "total_steps": 1}}
  train.train_and_evaluate(c, str(tmp_path))
  params = {s: ckpt_lib.restore_raw(str(tmp_path / s))[0]["params"]
            for s in "abc"}
  for s in "bc":
    chex.assert_trees_all_equal(params["a"], params[s])
  c.stages.b.init_from_stage = "c"
  with pytest.raises(R2D2Error, match="init_from_stage is 'c'"):
    train.train_and_evaluate(c, str(tmp_path / "again"))


def test_stage_config_merges_overrides():
  c = helpers.tiny_config()
  c.stage_order = ("a",)
  c.stages = {"a": {"optimizer": {"lr": 0.5}, "method": "supervised"}}
  s = train.stage_config(c, "a")
  assert s.optimizer.lr == 0.5 and s.optimizer.momentum == 0.9
  assert "stages" not in s


@pytest.mark.parametrize("field,value,match", [
    ("method", "fixmatchh", "Valid methods: .*supervised"),
    ("model.name", "resnet7", "Valid models: .*cnn_small"),
    ("data.dataset", "cifar11", "Valid datasets: .*digits"),
    ("data.batch_size", 12, "not divisible by the number of devices"),
    ("data.num_labels", 5000, "labels per class"),
])
def test_bad_input_errors(tmp_path, field, value, match):
  c = helpers.tiny_config(**{field: value})
  with pytest.raises(R2D2Error, match=match):
    train.train_and_evaluate(c, str(tmp_path))


def test_init_from_wrong_model_is_clear(tmp_path):
  train.train_and_evaluate(helpers.tiny_config(total_steps=1),
                           str(tmp_path / "a"))
  c = helpers.tiny_config(**{"model.kwargs": {"widths": (8, 8, 8)}}, total_steps=1)
  c.init_from = str(tmp_path / "a")
  with pytest.raises(R2D2Error, match="do not match this model"):
    train.train_and_evaluate(c, str(tmp_path / "b"))


def test_best_checkpoint_keeps_the_best_validation_state(tmp_path):
  """STAGE/best_checkpoint: the state at the highest accuracy/val/raw (ties:
  the later step); on resume the best so far comes from eval_history.jsonl."""
  import json  # pylint: disable=g-import-not-at-top
  from r2d2_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cfg = helpers.tiny_config(checkpoint_async=False)
  cfg.data.num_val = 10
  wd = str(tmp_path)
  best = train._BestCheckpoint(wd, cfg, start=0, total_steps=9)  # pylint: disable=protected-access
  values = {1: 0.5, 2: 0.7, 3: 0.6, 4: 0.7, 5: 0.4}
  for step, v in values.items():
    best.offer(step, {"w": jnp.full((2,), float(step))},
               {"accuracy/val/raw": v, "accuracy/val/ema": 1.0 - v}, "s")
  best.close()
  state, meta = ckpt_lib.restore_raw(os.path.join(wd, "best_checkpoint"))
  assert meta["step"] == 4 and meta["accuracy/val/raw"] == 0.7
  np.testing.assert_array_equal(state["w"], [4.0, 4.0])
  # Resumed at step 3 with the history up to there: 0.7 (step 2) is the best
  # so far, so step 4's 0.65 is not saved, and step 5's 0.8 is.
  # (Step 4's old row, 0.9, is past the restart point: redone, not counted.)
  with open(os.path.join(wd, "eval_history.jsonl"), "w") as f:
    for step, v in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.9)):
      f.write(json.dumps({"step": step, "accuracy/val/raw": v}) + "\n")
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(wd, "best_checkpoint"))
  best = train._BestCheckpoint(wd, cfg, start=3, total_steps=9)  # pylint: disable=protected-access
  assert best.value == 0.7
  best.offer(4, {"w": jnp.zeros(2)}, {"accuracy/val/raw": 0.65}, "s")
  assert best._ckpt.latest_step() is None  # pylint: disable=protected-access
  best.offer(5, {"w": jnp.ones(2)}, {"accuracy/val/raw": 0.8}, "s")
  best.close()
  _, meta = ckpt_lib.restore_raw(os.path.join(wd, "best_checkpoint"))
  assert meta["step"] == 5
  # No validation split: nothing is kept.
  cfg.data.num_val = 0
  off = train._BestCheckpoint(str(tmp_path / "off"), cfg, 0, 9)  # pylint: disable=protected-access
  off.offer(1, {"w": jnp.zeros(2)}, {"accuracy/val/raw": 1.0}, "s")
  off.close()
  assert not os.path.exists(tmp_path / "off" / "best_checkpoint")
