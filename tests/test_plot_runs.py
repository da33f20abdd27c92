"""benchmarks.plot_runs: curves over seeds from eval_history.jsonl files."""

import json
import os

import numpy as np
import pytest

from benchmarks import plot_runs
from r2d2_jax.errors import R2D2Error


def _history(root, seed, rows):
  d = os.path.join(root, str(seed))
  os.makedirs(d)
  with open(os.path.join(d, "eval_history.jsonl"), "w") as f:
    for step, val, test in rows:
      f.write(json.dumps({"step": step, "accuracy/val/raw": val,
                          "accuracy/test/raw": test}) + "\n")


def test_error_curves_mean_over_the_seeds_that_have_the_run(tmp_path):
  root = str(tmp_path / "run")
  _history(root, 0, [(10, 0.5, 0.9), (20, 0.75, 0.95)])
  _history(root, 2, [(10, 0.25, 0.8), (20, 0.5, 0.85), (30, 0.6, 0.9)])
  steps, err, used = plot_runs.error_curves(root, [0, 1, 2], "test", "raw")
  assert used == [0, 2]                  # seed 1 has no run: skipped
  assert steps.tolist() == [10, 20]      # the steps both seeds evaluated
  np.testing.assert_allclose(err, [[10.0, 5.0], [20.0, 15.0]])
  _, val, _ = plot_runs.error_curves(root, [0, 2], "val", "raw")
  np.testing.assert_allclose(val, [[50.0, 25.0], [75.0, 50.0]])
  out = str(tmp_path / "fig.png")
  plot_runs.plot({"a": root}, [0, 1, 2], out, target=1.36)
  assert os.path.getsize(out) > 0
  with pytest.raises(R2D2Error, match="No eval_history.jsonl"):
    plot_runs.plot({"a": str(tmp_path / "none")}, [0], None)
