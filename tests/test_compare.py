"""The equal-budget comparison harness (benchmarks/compare.py).

One tiny comparison (digits, supervised and Pseudo-Label, two seeds, 8 steps,
an evaluation every 2, `--min-last-evals 4`, so "median last 20" is n/a) is
run once for the module; the tests read its table, files and plots, and check
them against `eval_history.jsonl` with the figures computed here from their
definitions. The budget arithmetic and the split check are tested as pure
functions / on doctored files.

Break checks (each made the named test fail, then was restored):
  - `rescale_steps` without the factor (`_scale_int` returning v):
    test_rescale_steps_scales_step_valued_keys.
  - `rescale_steps` keeping duplicate boundaries' first scale only:
    test_rescale_steps_scales_step_valued_keys.
  - `allocate` without the remainder loop (floors only):
    test_allocate_is_proportional_and_sums_to_budget.
  - `check_splits` returning at once: test_check_splits_fails_on_doctored_split.
  - `run_rows` passing 'ema' to `results.stage_errors` for the raw columns:
    test_table_values_are_the_histories.
  - `run_one` ignoring compare_done.json (reruns every run):
    test_rerun_reads_back.
  - `augmentation_off` without `num_ops=0` (MPL's strong view keeps its
    RandAugment layers), or without the weak block's `flip=False`:
    test_mnist_pi_views_are_the_image.
  - `augmentation_off` without the 'usb' policy's `cutout_frac=0`:
    test_augmentation_off_usb_policy_and_learned_policy.
  - `budget_config` not applying the setting's `method_values`, or
    `_set_existing` without its key check:
    test_mnist_cnn_gives_vat_the_shared_translation_and_its_chosen_epsilon.
"""

import dataclasses
import json
import os
import re
import shutil
import types

import jax
import numpy as np
import pytest

from benchmarks import compare
from r2d2_jax.data import augment
from r2d2_jax.data import views
from r2d2_jax.errors import R2D2Error

SEEDS = (0, 1)
METHODS = ("supervised", "pseudo_label")
STEPS = 8
EVALS = 4


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("compare")
  root, figures, md = tmp / "root", tmp / "figures", tmp / "docs" / "results.md"
  argv = ["--setting", "digits", "--methods", *METHODS,
          "--steps", str(STEPS), "--evals", str(EVALS), "--min-last-evals",
          str(EVALS), "--seeds",
          *map(str, SEEDS), "--root", str(root), "--write", "--figures",
          str(figures), "--results-md", str(md), "--name", "compare_test"]
  text = compare.main(argv)
  return dict(root=str(root), figures=str(figures), md=str(md), text=text,
              argv=argv)


def _history(root, method, seed):
  with open(os.path.join(root, method, str(seed), "eval_history.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _errors(history):
  """The three figures of the raw weights, from their definitions."""
  err = [100 * (1 - r["accuracy/test/raw"]) for r in history]
  val = [r["accuracy/val/raw"] for r in history]
  best = max(i for i in range(len(val)) if val[i] == max(val))  # ties: latest
  median = float(np.median(err[-20:])) if len(err) >= 20 else None
  return [err[best], median, err[-1]]


def test_table_values_are_the_histories(compared):
  text = compared["text"]
  assert "8 steps, 512 images seen" in text  # 8 × 16 × (1 + 3)
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] in METHODS:
      rows[cells[0]] = cells[1:]
  assert list(rows) == list(METHODS)
  for method, cells in rows.items():
    assert len(cells) == 3  # raw: at best val, median last 20, final
    expected = np.array([_errors(_history(compared["root"], method, s))
                         for s in SEEDS])  # [seed, figure]
    for j, c in enumerate(cells):
      if expected[0, j] is None:  # fewer than 20 evaluations
        assert c == "n/a", c
        continue
      expected_j = expected[:, j].astype(float)
      m = re.fullmatch(r"(\S+) ± (\S+) \((.*)\)", c)
      assert m, c
      per_seed = [float(x) for x in m.group(3).split(",")]
      np.testing.assert_allclose(per_seed, expected_j, atol=0.006)
      np.testing.assert_allclose(float(m.group(1)), expected_j.mean(),
                                 atol=0.006)
      np.testing.assert_allclose(float(m.group(2)), expected_j.std(ddof=1),
                                 atol=0.006)
  # Every method trained exactly the budget, evaluated every STEPS // EVALS.
  for method in METHODS:
    for s in SEEDS:
      assert [r["step"] for r in _history(compared["root"], method, s)
              ] == list(range(STEPS // EVALS, STEPS + 1, STEPS // EVALS))


def test_written_section_and_plots(compared):
  with open(compared["md"]) as f:
    doc = f.read()
  assert "<!-- BEGIN compare_test -->" in doc
  assert "| method | raw at best val (headline)" in doc
  for plot in ("test_error", "pseudo_labels"):
    path = os.path.join(compared["figures"], f"compare_test_{plot}.png")
    with open(path, "rb") as f:
      data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000, plot
    assert f"](../figures/compare_test_{plot}.png)" in doc
  # No R2-D2 here: no entropy plot, and no link to one.
  assert not os.path.exists(os.path.join(compared["figures"],
                                         "compare_test_entropy.png"))


def test_rerun_reads_back(compared, capsys):
  path = os.path.join(compared["root"], "pseudo_label", "0",
                      "eval_history.jsonl")
  before = os.path.getmtime(path)
  compare.main(compared["argv"])
  out = capsys.readouterr().out
  assert out.count("read back") == len(METHODS) * len(SEEDS), out
  assert os.path.getmtime(path) == before
  # Another budget in the same root is refused, not mixed in.
  with pytest.raises(R2D2Error, match="another config"):
    compare.run_comparison("digits", ["supervised"], STEPS + 2, [0],
                           compared["root"], evals=EVALS)


def test_check_splits_fails_on_doctored_split(compared, tmp_path):
  root = str(tmp_path / "root")
  shutil.copytree(compared["root"], root)
  compare.check_splits(root, METHODS, SEEDS)  # as trained: equal
  path = os.path.join(root, "pseudo_label", "1", "split.json")
  with open(path) as f:
    split = json.load(f)
  split["labeled"][0] += 1
  with open(path, "w") as f:
    json.dump(split, f)
  with pytest.raises(R2D2Error, match="Seed 1: pseudo_label/1 and supervised/1"):
    compare.check_splits(root, METHODS, SEEDS)
  split["labeled"][0] -= 1
  split["num_unlabeled"] -= 1
  with open(path, "w") as f:
    json.dump(split, f)
  with pytest.raises(R2D2Error, match="unlabeled pools differ"):
    compare.check_splits(root, METHODS, SEEDS)


def test_rescale_steps_scales_step_valued_keys():
  cfg = dict(
      total_steps=1000, total_epochs=0.0, log_every_steps=100,
      eval_every_steps=40, checkpoint_every_steps=500,
      optimizer=dict(schedule=dict(name="piecewise", warmup_steps=100,
                                   wait_steps=0, decay_steps=1750,
                                   boundaries=(700, 800, 900),
                                   scales=(0.5, 0.4, 0.25),
                                   boundary_fractions=(0.25, 0.5))),
      mpl=dict(teacher_optimizer=dict(schedule=dict(warmup_steps=3))),
      pseudo_label=dict(ramp_start_steps=200, ramp_end_steps=800),
      r2d2=dict(repredict_epochs=(0.0, 10.0, 20.0)), flag_steps=True)
  out = compare.rescale_steps(cfg, 0.01, epoch_factor=0.5)
  sched = out["optimizer"]["schedule"]
  assert sched["warmup_steps"] == 1 and sched["decay_steps"] == 18
  assert sched["wait_steps"] == 0  # 0 stays 0
  # round(700 · 0.01) = 7, 8, 9: distinct; scales kept.
  assert sched["boundaries"] == (7, 8, 9) and sched["scales"] == (0.5, 0.4, 0.25)
  assert sched["boundary_fractions"] == (0.25, 0.5)  # fractions stay
  assert out["mpl"]["teacher_optimizer"]["schedule"]["warmup_steps"] == 1
  assert out["pseudo_label"] == dict(ramp_start_steps=2, ramp_end_steps=8)
  assert out["r2d2"]["repredict_epochs"] == (0.0, 5.0, 10.0)
  # The budget and the harness's intervals are not rescaled here.
  for k in ("total_steps", "log_every_steps", "eval_every_steps",
            "checkpoint_every_steps"):
    assert out[k] == cfg[k]
  assert out["flag_steps"] is True
  assert cfg["optimizer"]["schedule"]["warmup_steps"] == 100  # a copy
  # Boundaries that round together merge; the lr keeps every factor.
  merged = compare.rescale_steps(cfg, 0.002)["optimizer"]["schedule"]
  assert merged["boundaries"] == (1, 2)
  np.testing.assert_allclose(merged["scales"], (0.5, 0.4 * 0.25))


def test_allocate_is_proportional_and_sums_to_budget():
  assert compare.allocate([1500, 1000, 1000, 200], 2000) == [811, 541, 540, 108]
  for budget in (4, 7, 37, 2000, 12345):
    out = compare.allocate([1500, 1000, 1000, 200], budget)
    assert sum(out) == budget and min(out) >= 1
    exact = np.array([1500, 1000, 1000, 200]) * budget / 3700
    assert np.all(np.abs(np.array(out) - exact) < 1 + 1e-9)
  assert compare.allocate([3000, 200], 6) == [5, 1]
  with pytest.raises(R2D2Error, match="fewer than the 4 stages"):
    compare.allocate([1, 1, 1, 1], 3)


def test_budget_config_forces_the_setting():
  setting = compare.SETTINGS["digits"]
  config, info = compare.budget_config(setting, "mpl", 2000, 3)
  assert info["steps"] == dict(mpl=1875, finetune=125)  # 3000 : 200
  stages = compare.stage_configs(config)
  for name, c in stages.items():
    assert (c.model.name, c.data.batch_size, c.data.uratio, c.data.num_val,
            c.seed) == ("cnn_small", 16, 3, 200, 3), name
  assert stages["finetune"].model.kwargs.dropout_rate == 0.0  # its own kwarg
  assert stages["mpl"].optimizer.schedule.warmup_steps == round(100 * 0.625)
  assert stages["mpl"].uda.ramp_steps == round(300 * 0.625)
  assert stages["finetune"].eval_every_steps == 125 // 25
  assert "init_from_stage" not in config.stages.finetune  # follows mpl
  # R2-D2's epoch-valued stages become steps; repredictions keep their places.
  config, info = compare.budget_config(setting, "r2d2", 2000, 0)
  assert sum(info["steps"].values()) == 2000
  r2 = compare.stage_configs(config)["r2"]
  assert r2.total_epochs == 0.0 and r2.total_steps == info["steps"]["r2"]


def test_setting_errors_are_clear():
  with pytest.raises(R2D2Error, match="need no image augmentation.*fixmatch"):
    compare.method_source(compare.SETTINGS["mnist_pi"], "fixmatch")
  with pytest.raises(R2D2Error, match="configs/nope_mnist.py does not exist"):
    compare.method_source(compare.SETTINGS["mnist_cnn"], "nope")
  path, variant, stage = compare.method_source(compare.SETTINGS["digits"],
                                               "fixmatch_cta")
  assert path.endswith("fixmatch_digits.py") and variant == "cta"
  assert compare.method_source(compare.SETTINGS["digits"], "supervised")[2] == (
      "supervised")


# Every method of the library, as the tables of docs/results.md name them.
EVERY_METHOD = ("supervised", "pseudo_label", "pi_model", "temporal_ensembling",
                "mean_teacher", "vat", "mixmatch", "uda", "fixmatch",
                "fixmatch_cta", "flexmatch", "freematch", "softmatch",
                "adamatch", "noisy_student", "r2d2", "mpl", "semimeta")


@pytest.mark.parametrize("setting", ["digits", "mnist_cnn"])
def test_every_method_has_a_config_in_the_augmented_settings(setting):
  """Tables (b) and (c) name every method: each resolves to its own config."""
  for method in EVERY_METHOD:
    config = compare.load_method_config(compare.SETTINGS[setting], method)
    stages = compare.stage_configs(config)
    methods = [c.method for c in stages.values()]
    own = "fixmatch" if method == "fixmatch_cta" else method
    assert own in methods, (setting, method, methods)
    for c in stages.values():
      assert c.data.dataset == compare.SETTINGS[setting].data["dataset"]
      policy = c.data.augment.strong.get("policy")
      assert (policy == "ctaugment") == (method == "fixmatch_cta"), (
          setting, method, policy)


def test_mnist_pi_views_are_the_image():
  """In the permutation-invariant setting no view augments, MPL's strong one too."""
  setting = compare.SETTINGS["mnist_pi"]
  img = np.random.RandomState(0).randint(0, 256, (28, 28, 1)).astype(np.uint8)
  info = types.SimpleNamespace(flip=True)  # flips would be on by default
  for method in ("mpl", "vat", "pi_model", "semimeta"):
    config, _ = compare.budget_config(setting, method, 600, 0)
    for stage, c in compare.stage_configs(config).items():
      assert (c.model.name, c.model.kwargs.noise_std) == ("mlp_mnist", 0.5)
      specs = views.view_specs({"unlabeled": ("weak", "strong")},
                               c.data.augment, info)["unlabeled"]
      for name, spec in specs.items():
        fn = augment.view_fn(spec)
        for k in range(4):
          out = np.asarray(fn(jax.random.PRNGKey(k), img))
          np.testing.assert_array_equal(
              out, img.astype(np.float32), err_msg=f"{method} {stage} {name}")


def test_augmentation_off_usb_policy_and_learned_policy():
  """USB's policy loses its final cutout too; CTAugment is refused by name."""
  block = {"weak": {"translate": 4},
           "strong": {"policy": "usb", "num_ops": 2, "magnitude": 10}}
  compare.augmentation_off(block)
  img = np.random.RandomState(1).randint(0, 256, (28, 28, 1)).astype(np.uint8)
  specs = views.view_specs({"unlabeled": ("weak", "strong")}, block,
                           types.SimpleNamespace(flip=True))["unlabeled"]
  for name, spec in specs.items():
    out = np.asarray(augment.view_fn(spec)(jax.random.PRNGKey(0), img))
    np.testing.assert_array_equal(out, img.astype(np.float32), err_msg=name)
  with pytest.raises(R2D2Error, match="policy='ctaugment' \\(a learned"):
    compare.augmentation_off({"weak": {}, "strong": {"policy": "ctaugment"}})


def test_mnist_cnn_gives_vat_the_shared_translation_and_its_chosen_epsilon():
  """VAT's config is permutation-invariant MNIST's; mnist_cnn changes two values.

  The translation is the one every other method of the setting has (the
  shared MNIST protocol); ε is the value chosen on seed 0's validation split
  (docs/results.md, "compare_mnist_cnn_vat"), in [0, 1] pixel units × the
  standardisation's scale.
  """
  setting = compare.SETTINGS["mnist_cnn"]
  own = compare.load_method_config(setting, "vat")  # puts configs/ on the path
  from configs import vat_mnist  # pylint: disable=g-import-not-at-top
  assert own.data.augment.weak.translate == 0
  assert own.vat.epsilon == 5.0 * vat_mnist.PIXEL_TO_INPUT
  config, _ = compare.budget_config(setting, "vat", 100, 0)
  pi, _ = compare.budget_config(setting, "pi_model", 100, 0)
  assert config.data.augment.weak.translate == pi.data.augment.weak.translate
  assert config.data.augment.weak.translate == 2
  assert config.vat.epsilon == 2.0 * vat_mnist.PIXEL_TO_INPUT
  assert config.vat.xi == own.vat.xi
  # The permutation-invariant setting keeps the config's values.
  config, _ = compare.budget_config(compare.SETTINGS["mnist_pi"], "vat", 100, 0)
  assert config.vat.epsilon == own.vat.epsilon
  # --override comes after the setting's values.
  config, _ = compare.budget_config(setting, "vat", 100, 0,
                                    overrides=["vat.epsilon=1.5"])
  assert config.vat.epsilon == 1.5
  bad = dataclasses.replace(setting, method_values={"vat": {"vat.epsilom": 1.0}})
  with pytest.raises(R2D2Error, match="'vat.epsilom' is not in the method"):
    compare.budget_config(bad, "vat", 100, 0)
