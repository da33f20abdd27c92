"""The notebooks run top to bottom in FAST mode (so they never rot).

Each test executes a notebook in a fresh kernel, parameters set through the
environment it inherits, and checks what it printed, plotted or wrote.
`quickstart.ipynb` and `r2d2_theory.ipynb` write a summary json and their
figures to `OUTPUT_DIR`; their tests check those files' contents against the
config, the split and the data (`_check_quickstart`, `_check_theory`).

Break checks (each made in the notebook's cells, run on a finished FAST
workdir through the check function below, seen to fail, then restored):
  * quickstart: the table rows shifted by one against the images and labels
    (`rows + 1`) -> the shown true labels no longer match the digits labels.
  * quickstart: the summary loop skipping the last stage -> the stage list
    differs from the config's `stage_order`.
  * quickstart: the pseudo-labels read from the labeled rows instead
    (`learnable == 0`) -> the row count is not the split's unlabeled count.
  * r2d2_theory: the slope fit unweighted (w = 1) -> the fixed point's slope
    is 0.777, not 0.700 +- 0.01.
  * r2d2_theory: `EXPECTED = 1 + BETA / ALPHA` -> not 1 - beta/alpha.
  * r2d2_theory: the "after reprediction" entropy taken from the value
    logged just before it -> `after < before` fails at R2's repredictions.
"""

import json
import math
import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")
# Compile fast rather than run fast (a few steps of many programs).
QUICK_COMPILE = ("--xla_backend_optimization_level=0 "
                 "--xla_llvm_disable_expensive_passes=true")


def _execute(name, monkeypatch, env, xla_flags=QUICK_COMPILE):
  """Runs notebooks/`name` top to bottom with `env` in the kernel's environment.

  The kernel runs as a user's would: one CPU device, not the tests' eight
  fake ones (XLA:CPU collectives across 8 fake devices can stall inside a
  kernel's threads), with `xla_flags` as its XLA_FLAGS.

  Returns:
    (the executed notebook, its text outputs joined, its number of PNGs).
  """
  path = os.path.join(ROOT, "notebooks", name)
  nb = nbformat.read(path, as_version=4)
  for k, v in env.items():
    if v is None:
      monkeypatch.delenv(k, raising=False)
    else:
      monkeypatch.setenv(k, v)
  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  resources = {"metadata": {"path": os.path.dirname(path)}}
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources=resources)
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code"
             for o in c.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs)
  images = sum("image/png" in o.get("data", {}) for o in outputs)
  return nb, text, images


def _is_png(path):
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not os.path.isdir(MNIST),
                    reason="needs the MNIST files in ../shared/data/mnist")
def test_mnist_2dfc_notebook_runs_fast(tmp_path, monkeypatch):
  # Parameters are overridden through the environment the kernel inherits.
  _, outputs, images = _execute("mnist_2dfc.ipynb", monkeypatch, {
      "WORKDIR": str(tmp_path / "wd"), "MNIST_MANUAL_DIR": MNIST,
      "TFDS_DATA_DIR": str(tmp_path / "tfds")})
  assert "finetune   test accuracy" in outputs
  assert images == 2  # the feature scatter plots and the curves


def test_compare_methods_notebook_runs_fast(tmp_path, monkeypatch):
  """FAST mode trains a tiny digits comparison, then the table and the plots."""
  _, outputs, images = _execute("compare_methods.ipynb", monkeypatch, {
      "FAST": "1", "WORKDIR": str(tmp_path / "wd"), "RESULTS_ROOT": None})
  assert "methods: ['supervised', 'pseudo_label'] seeds: [0]" in outputs
  assert "| method | raw at best val (headline)" in outputs
  assert "| pseudo_label | " in outputs and "8 steps, 512 images seen" in outputs
  assert images == 2  # test error; pseudo-label accuracy and mask (no R2-D2)


def _check_quickstart(out_dir, workdir):
  """The quickstart's summary against the config, the split and the labels."""
  from configs import digits_quickstart  # pylint: disable=g-import-not-at-top
  from r2d2_jax.data import sources  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, "quickstart_summary.json")) as f:
    summary = json.load(f)
  assert summary["fast"] is True
  stages = summary["stages"]
  assert list(stages) == list(digits_quickstart.get_config().stage_order)
  for name, s in stages.items():
    assert s["evaluations"] >= 2, name  # a curve, not a point
    assert 0.0 <= s["test_accuracy_final"] <= 1.0, name
    assert 0.0 <= s["test_accuracy_at_best_val"] <= 1.0, name
  with open(os.path.join(workdir, "r2", "split.json")) as f:
    split = json.load(f)
  pl = summary["pseudo_labels"]
  assert pl["unlabeled_rows"] == split["num_unlabeled"]
  # The shown rows are unlabeled, and their true labels are the data's.
  labels = sources.load_in_memory("digits")["train"].labels
  assert len(pl["shown"]) == 16
  for shown in pl["shown"]:
    assert shown["row"] not in split["labeled"] + split["val"]
    assert shown["true_label"] == int(labels[shown["row"]])
    assert 0 <= shown["pseudo_label"] < 10 and 0 < shown["probability"] <= 1
  # Far above chance (0.1): table rows matched to their own images' labels.
  assert pl["accuracy"] > 0.5
  for png in summary["figures"]:
    assert os.path.dirname(png) == out_dir and _is_png(png), png
  assert len(summary["figures"]) == 2


def test_quickstart_notebook_runs_fast(tmp_path, monkeypatch):
  """FAST mode: each quick-start stage a few steps, curves and pseudo-labels."""
  out = str(tmp_path / "out")
  _, outputs, images = _execute("quickstart.ipynb", monkeypatch, {
      "FAST": "1", "WORKDIR": str(tmp_path / "wd"), "OUTPUT_DIR": out})
  assert "| `finetune` | R2-D2 |" in outputs
  assert "pseudo-label accuracy" in outputs
  assert images == 2  # the learning curves; the images with their labels
  _check_quickstart(out, str(tmp_path / "wd"))


def _check_theory(out_dir):
  """The theory notebook's results: Theorem 1's slope, Theorem 2's entropy."""
  from configs import r2d2_digits  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out_dir, "r2d2_theory.json")) as f:
    res = json.load(f)
  block = r2d2_digits.get_config().r2d2
  assert res["fast"] is True
  assert res["expected_slope"] == pytest.approx(1 - block.beta / block.alpha)
  t1 = res["theorem1"]
  # The stationary point of L in free logits (Y fixed) is Theorem 1's.
  assert abs(t1["fixed_point"]["slope"] - res["expected_slope"]) < 0.01
  assert t1["fixed_point"]["max_q_le_max_p"] == 1.0  # Theorem 2 there
  # D2's own network: a finite fitted slope between Theorem 1's and the
  # table step's fixed point q = p (slope 1), as the notebook explains.
  slope = t1["network"]["slope"]
  assert math.isfinite(slope)
  assert res["expected_slope"] - 0.05 < slope < 1.05
  t2 = res["theorem2"]
  assert t2["d2"]["repredicted_steps"] == [0]  # the table's initialisation
  re_steps = t2["r2"]["repredicted_steps"]
  assert len(re_steps) == 4 and re_steps[0] == 0
  assert re_steps == sorted(re_steps)
  # Theorem 2 on the run: D2 flattens the table, each R2 reprediction
  # re-sharpens it.
  assert t2["d2"]["entropy"][-1] > t2["d2"]["entropy"][0]
  for before, after in zip(t2["r2"]["entropy_before_repredict"],
                           t2["r2"]["entropy_after_repredict"]):
    assert after < before
  assert all(math.isfinite(e) for s in ("d2", "r2") for e in t2[s]["entropy"])
  for png in res["figures"]:
    assert os.path.dirname(png) == out_dir and _is_png(png), png
  assert len(res["figures"]) == 2


def test_r2d2_theory_notebook_runs_fast(tmp_path, monkeypatch):
  """FAST mode trains a tiny supervised -> D2 -> R2 run, then both theorems."""
  out = str(tmp_path / "out")
  # Many steps of three programs: the default XLA flags (run fast) are
  # quicker here than the tests' compile-fast ones.
  _, outputs, images = _execute("r2d2_theory.ipynb", monkeypatch, {
      "FAST": "1", "WORKDIR": str(tmp_path / "wd"), "OUTPUT_DIR": out},
                                xla_flags="")
  assert "Fitted slope: D2's network" in outputs
  assert images == 2  # Theorem 1's scatter plots; Theorem 2's curves
  _check_theory(out)
