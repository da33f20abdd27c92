"""Tests of `r2d2_jax.inference` and the `r2d2_jax.predict` command line.

Runs: a supervised digits run (4 steps, evaluated and checkpointed every 2,
with a validation set) and a 2-stage run, trained here; MPL and R2-D2 states
saved at step 0 (their structure, not their training, is what loading
depends on). The reference is independent of `inference`: the checkpoint
restored by the trainer's own code (`Checkpointer.restore` onto the Stage's
abstract state, or `restore_raw`) and the module applied by hand to
(x - mean) / std computed in numpy; and the trainer's own evaluation of the
checkpoint's state (`Stage.evaluate`, as written to `eval_history.jsonl`).

Break checks (each made the named test fail; then restored):
  * inference.Predictor.__post_init__: apply_eval on unnormalised images
    (`images.astype(jnp.float32)`) -> test_load_equals_trainer_eval.
  * inference._build: `networks["raw"]` instead of `networks[variables]`
    -> test_load_equals_trainer_eval, test_mpl_student_and_teacher.
  * inference._choose_step: `min` instead of `max` over the candidates
    -> test_best_is_highest_val_among_kept.
  * inference._choose_stage: `in_order[0]` instead of `in_order[-1]`
    -> test_staged_run.
  * predict.rows: `np.argsort(p)` (ascending) -> test_cli_writes_csv.
  * inference.load_image: no `convert` to the network's channels
    -> test_cli_writes_csv.
  * inference.image_paths: no error when nothing matches -> test_cli_errors.
  * inference._restore_target: the stand-in Task's shapes instead of the
    saved ones -> test_r2d2_state_with_table (the table does not fit).
  * inference._restore_needed: every leaf wanted (`wanted` = all ids)
    -> test_r2d2_state_with_table.
"""

import csv
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import common
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import inference
from r2d2_jax import metrics as metrics_lib
from r2d2_jax import predict
from r2d2_jax import train
from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error
from tests import helpers

DIGITS = sources.get_info("digits")


def _normalised(images):
  x = images.astype(np.float32)
  return (x - np.float32(DIGITS.mean[0])) / np.float32(DIGITS.std[0])


def _apply(stage_or_model, variables, images):
  model = getattr(stage_or_model, "net", None)
  model = model.model if model is not None else stage_or_model
  return np.asarray(model.apply(variables, jnp.asarray(_normalised(images)),
                                train=False))


@pytest.fixture(scope="module")
def test_split():
  return sources.load_in_memory("digits")["test"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A supervised run: evaluated and checkpointed at steps 2 and 4."""
  c = helpers.tiny_config(total_steps=4, eval_every_steps=2,
                          checkpoint_keep=3)
  c.data.num_val = 50
  wd = str(tmp_path_factory.mktemp("run"))
  train.train_and_evaluate(c, wd)
  return c, wd


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
  c = helpers.tiny_config(total_steps=2)
  c.stage_order = ("pretrain", "finetune")
  c.stages = {"pretrain": {"optimizer": {"lr": 0.05}},
              "finetune": {"optimizer": {"lr": 0.01}, "total_steps": 3}}
  wd = str(tmp_path_factory.mktemp("staged"))
  train.train_and_evaluate(c, wd)
  return c, wd


def _restore(c, wd, step):
  """The trainer's own restore of checkpoint `step`, and its Stage."""
  stage = train.Stage(c, wd)
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  state, _ = ck.restore(step, stage.abstract_state)
  ck.close()
  return stage, state


def test_load_equals_trainer_eval(run, test_split):
  c, wd = run
  stage, state = _restore(c, wd, 4)
  # The trainer's own evaluation of this checkpoint's state (Stage.evaluate
  # at step 4, as the run wrote it).
  history = {r["step"]: r for r in metrics_lib.read_history(
      os.path.join(wd, "eval_history.jsonl"))}
  for name, ema in (("ema", True), ("raw", False)):
    p = inference.load(wd, variables=name, config=c)
    assert (p.step, p.weights, p.stage, p.variables_name) == (4, "final", "",
                                                              name)
    assert p.image_shape == (8, 8, 1) and p.mean == (83.,) and p.std == (95.,)
    assert p.class_names == tuple("0123456789")
    got = p.logits(test_split.images)
    ref = _apply(stage, state.variables(ema=ema), test_split.images)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    acc = float(np.mean(p.predict(test_split.images) == test_split.labels))
    assert acc == pytest.approx(history[4][f"accuracy/test/{name}"], abs=1e-9)
    assert p.val_accuracy == history[4][f"accuracy/val/{name}"]
    probs = p.probabilities(test_split.images[:7])
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(probs, jax.nn.softmax(ref[:7]), atol=1e-5)
  # EMA and raw are different networks here (ema_decay 0.999).
  assert not np.allclose(_apply(stage, state.variables(ema=True),
                                test_split.images[:4]),
                         _apply(stage, state.variables(), test_split.images[:4]))


def test_best_is_the_trainers_best_on_validation_state(run):
  """`which='best'` reads STAGE/best_checkpoint: the state at the evaluation
  with the highest accuracy/val/raw (ties: the later step)."""
  c, wd = run
  rows = metrics_lib.read_history(os.path.join(wd, "eval_history.jsonl"))
  vals = [r["accuracy/val/raw"] for r in rows]
  expected = max(range(len(rows)), key=lambda i: (vals[i], i))
  step = rows[expected]["step"]
  _, state = _restore(c, wd, step)
  for name, ema in (("ema", True), ("raw", False)):
    best = inference.load(wd, which="best", variables=name, config=c)
    assert best.step == step
    assert best.checkpoint_dir == os.path.join(wd, "best_checkpoint")
    assert best.val_accuracy == rows[expected][f"accuracy/val/{name}"]
    jax.tree.map(np.testing.assert_array_equal,
                 jax.device_get(best.variables),
                 jax.device_get(state.variables(ema=ema)))


def test_best_is_highest_val_among_kept(run, tmp_path):
  """A run without best_checkpoint/ (older, or checkpoint_best=False): the
  kept checkpoint with the best validation accuracy."""
  c, src = run
  wd = str(tmp_path / "run")
  shutil.copytree(src, wd)
  shutil.rmtree(os.path.join(wd, "best_checkpoint"))
  path = os.path.join(wd, "eval_history.jsonl")
  rows = metrics_lib.read_history(path)
  assert [r["step"] for r in rows] == [2, 4]
  # Make step 2 the best on validation (EMA), step 4 the best on raw.
  rows[0]["accuracy/val/ema"], rows[1]["accuracy/val/ema"] = 0.9, 0.1
  rows[0]["accuracy/val/raw"], rows[1]["accuracy/val/raw"] = 0.1, 0.9
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  best = inference.load(wd, which="best", config=c)
  assert (best.step, best.val_accuracy) == (2, 0.9)
  _, state2 = _restore(c, wd, 2)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(best.variables),
               jax.device_get(state2.variables(ema=True)))
  assert inference.load(wd, which="best", variables="raw", config=c).step == 4
  # Without validation rows there is no 'best'.
  with open(path, "w") as f:
    f.writelines(json.dumps({k: v for k, v in r.items()
                             if "/val/" not in k}) + "\n" for r in rows)
  with pytest.raises(R2D2Error, match="no validation set"):
    inference.load(wd, which="best", config=c)
  # The only evaluation at a step without a kept checkpoint.
  with open(path, "w") as f:
    f.write(json.dumps({**rows[0], "step": 3}) + "\n")
  with pytest.raises(R2D2Error, match=r"none of the kept checkpoints \(steps "
                     r"\[2, 4\]\)"):
    inference.load(wd, which="best", config=c)


def test_config_json_in_workdir(run, tmp_path, test_split):
  c, src = run
  wd = str(tmp_path / "run")
  shutil.copytree(src, wd)
  # The trainer wrote it: no --config needed.
  p = inference.load(wd)
  assert p.config.model.name == c.model.name
  os.remove(os.path.join(wd, "config.json"))
  with pytest.raises(R2D2Error, match="has no config.json.*--config"):
    inference.load(wd)
  with open(os.path.join(wd, "config.json"), "w") as f:
    json.dump(c.to_dict(), f)
  p = inference.load(wd)
  np.testing.assert_array_equal(
      p.logits(test_split.images[:16]),
      inference.load(wd, config=c).logits(test_split.images[:16]))


def test_staged_run(staged, run, test_split):
  c, wd = staged
  last = inference.load(wd, config=c)
  assert (last.stage, last.step, last.total_steps) == ("finetune", 3, 3)
  assert last.config.optimizer.lr == 0.01
  first = inference.load(wd, stage="pretrain", config=c)
  assert (first.stage, first.step) == ("pretrain", 2)
  for p in (first, last):
    raw, _ = ckpt_lib.restore_raw(os.path.join(wd, p.stage))
    ref = _apply(p.net.model, {"params": raw["ema_params"],
                               **raw["ema_model_state"]}, test_split.images)
    np.testing.assert_allclose(p.logits(test_split.images), ref, rtol=1e-5,
                               atol=1e-5)
  with pytest.raises(R2D2Error, match=r"--stage='nope'.*\['pretrain', "
                     r"'finetune'\]"):
    inference.load(wd, stage="nope", config=c)
  with pytest.raises(R2D2Error, match="single-stage run"):
    inference.load(run[1], stage="pretrain", config=run[0])


def _save_initial(c, wd):
  """The trainer's initial state of `c` saved as checkpoint 0, as the trainer saves."""
  stage = train.Stage(c, wd)
  state = stage.init_state()
  ck = ckpt_lib.Checkpointer(os.path.join(wd, "checkpoints"), async_save=False)
  ck.save(0, state, {"step": 0, "total_steps": stage.total_steps, "stage": ""})
  ck.close()


def test_mpl_student_and_teacher(tmp_path, test_split):
  c = helpers.tiny_mpl_config()
  wd = str(tmp_path)
  _save_initial(c, wd)
  raw, _ = ckpt_lib.restore_raw(wd)
  x = test_split.images[:32]
  for name, net, ema in (("raw", "student", False), ("ema", "student", True),
                         ("teacher", "teacher", False)):
    p = inference.load(wd, variables=name, config=c)
    s = raw[net]
    v = ({"params": s["ema_params"], **s["ema_model_state"]} if ema else
         {"params": s["params"], **s["model_state"]})
    np.testing.assert_allclose(p.logits(x), _apply(p.net.model, v, x),
                               rtol=1e-5, atol=1e-5)
  with pytest.raises(R2D2Error, match=r"evaluates \['ema', 'raw', "
                     r"'teacher'\]"):
    inference.load(wd, variables="student", config=c)


def test_r2d2_state_with_table(tmp_path, test_split, monkeypatch):
  c = helpers.tiny_config("r2d2")
  common.r2d2_block(c)
  c.data.uratio = 3
  wd = str(tmp_path)
  _save_initial(c, wd)
  raw, _ = ckpt_lib.restore_raw(wd)
  restored = []
  original = inference._restore_needed
  monkeypatch.setattr(inference, "_restore_needed",
                      lambda *a: restored.append(original(*a)) or restored[-1])
  p = inference.load(wd, config=c)
  # Only the evaluated network is read: the table and optimizer state not.
  (state,) = restored
  assert isinstance(state.table, jax.ShapeDtypeStruct)
  assert state.table.shape == raw["table"].shape
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves((state.opt_state, state.params)))
  assert not any(isinstance(x, jax.ShapeDtypeStruct)
                 for x in jax.tree.leaves(p.variables))
  x = test_split.images[:32]
  ref = _apply(p.net.model, {"params": raw["ema_params"],
                             **raw["ema_model_state"]}, x)
  np.testing.assert_allclose(p.logits(x), ref, rtol=1e-5, atol=1e-5)


def _write_pngs(folder, images):
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i, im in enumerate(images):
    paths.append(os.path.join(folder, f"img{i:02d}.png"))
    Image.fromarray(im[..., 0], mode="L").save(paths[-1])
  return paths


def _read_csv(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def test_cli_writes_csv(run, tmp_path, test_split):
  c, wd = run
  cfg_file = tmp_path / "cfg.json"
  cfg_file.write_text(json.dumps(c.to_dict()))
  images = test_split.images[:10]
  paths = _write_pngs(str(tmp_path / "imgs"), images)
  # A larger RGB image: converted to grayscale and resized (bilinear) to 8x8.
  big = np.random.default_rng(0).integers(0, 256, (16, 12, 3), np.uint8)
  Image.fromarray(big, mode="RGB").save(tmp_path / "imgs" / "rgb.jpg",
                                        quality=95)
  out = tmp_path / "pred.csv"
  rc = predict.run(["--workdir", wd, "--config", str(cfg_file), "--images",
                    str(tmp_path / "imgs" / "*.png"),
                    str(tmp_path / "imgs" / "rgb.jpg"), "--out", str(out)])
  assert rc == 0
  header, rows = _read_csv(out)
  assert header == ["path", "class", "class_index", "confidence", "top5"]
  assert [r["path"] for r in rows] == paths + [str(tmp_path / "imgs" /
                                                   "rgb.jpg")]
  p = inference.load(wd, config=c)
  with Image.open(tmp_path / "imgs" / "rgb.jpg") as im:
    small = np.asarray(im.convert("L").resize((8, 8), Image.BILINEAR))
  probs = p.probabilities(np.concatenate([images, small[None, :, :, None]]))
  for r, pr in zip(rows, probs):
    top = [t.split(":") for t in r["top5"].split(";")]
    values = [float(v) for _, v in top]
    assert len(top) == 5 and values == sorted(values, reverse=True)
    assert [int(k) for k, _ in top] == list(np.argsort(-pr)[:5])
    np.testing.assert_allclose(values, np.sort(pr)[::-1][:5], atol=2e-6)
    assert r["class"] == top[0][0] == r["class_index"] == str(pr.argmax())
    assert float(r["confidence"]) == pytest.approx(pr.max(), abs=2e-6)


def test_cli_errors(run, staged, tmp_path, capsys):
  c, wd = run
  cfg_file = tmp_path / "cfg.json"
  cfg_file.write_text(json.dumps(c.to_dict()))
  paths = _write_pngs(str(tmp_path / "imgs"), np.zeros((1, 8, 8, 1), np.uint8))

  def error(*argv):
    assert predict.run(list(argv)) == 1
    return capsys.readouterr().err

  empty = tmp_path / "empty"
  empty.mkdir()
  assert "No checkpoint in" in error("--workdir", str(empty), "--config",
                                     str(cfg_file), "--images", paths[0])
  assert "no image files match" in error(
      "--workdir", wd, "--config", str(cfg_file), "--images",
      str(tmp_path / "imgs" / "*.jpeg"))
  bad = tmp_path / "imgs" / "bad.png"
  bad.write_bytes(b"not a png")
  assert f"Cannot read the image {bad}" in error(
      "--workdir", wd, "--config", str(cfg_file), "--images",
      str(tmp_path / "imgs"))
  staged_cfg = tmp_path / "staged.json"
  staged_cfg.write_text(json.dumps(staged[0].to_dict()))
  err = error("--workdir", staged[1], "--config", str(staged_cfg), "--stage",
              "r2", "--images", paths[0])
  assert "--stage='r2'" in err and "['pretrain', 'finetune']" in err
  no_config = tmp_path / "no_config"
  shutil.copytree(wd, no_config)
  os.remove(no_config / "config.json")
  assert "has no config.json" in error("--workdir", str(no_config),
                                       "--images", paths[0])
  # A config other than the run's: a clear error; the override fixes it.
  other = c.to_dict()
  other["model"]["name"] = "mlp_mnist"
  other_file = tmp_path / "other.json"
  other_file.write_text(json.dumps(other))
  assert "Pass the config the run was trained with" in error(
      "--workdir", wd, "--config", str(other_file), "--images", paths[0])
  assert predict.run(["--workdir", wd, "--config", str(other_file),
                      "--config.model.name=cnn_small", "--images",
                      paths[0]]) == 0
  assert "the config has no field 'nme'" in error(
      "--workdir", wd, "--config", str(other_file), "--config.model.nme=x",
      "--images", paths[0])
  assert "variables='nope': method 'supervised' evaluates ['ema', 'raw']" in error(
      "--workdir", wd, "--config", str(cfg_file), "--weights", "best",
      "--variables", "nope", "--images", paths[0])
