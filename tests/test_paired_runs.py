"""benchmarks.paired_runs: per-seed best-val figures of two roots, on hand-made histories."""

import json

import pytest

from benchmarks import paired_runs


def _write(root, seed, rows):
  d = root / str(seed)
  d.mkdir(parents=True)
  with open(d / "eval_history.jsonl", "w") as f:
    for step, val, test in rows:
      f.write(json.dumps({"step": step, "time": 0.0,
                          "accuracy/val/raw": val,
                          "accuracy/test/raw": test}) + "\n")


def test_table_picks_best_val_with_ties_to_the_latest(tmp_path, capsys):
  a, b = tmp_path / "a", tmp_path / "b"
  # Seed 0: a's best val 0.95 at steps 20 and 30 (tie: 30), b's 0.97 at 20.
  _write(a, 0, [(10, 0.90, 0.80), (20, 0.95, 0.85), (30, 0.95, 0.88)])
  _write(b, 0, [(10, 0.91, 0.81), (20, 0.97, 0.90), (30, 0.96, 0.70)])
  # Seed 1: equal best val: a tie.
  _write(a, 1, [(10, 0.99, 0.98), (20, 0.90, 0.90)])
  _write(b, 1, [(10, 0.99, 0.97), (20, 0.98, 0.96)])
  paired_runs.main(["--seeds", "0", "1", "--runs", f"a={a}", f"b={b}"])
  lines = capsys.readouterr().out.strip().splitlines()
  rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  assert rows[0] == ["0", "a", "5.00 (30)", "12.00", "5.00", "12.00", "b"]
  assert rows[1] == ["0", "b", "3.00 (20)", "10.00", "4.00", "30.00", "b"]
  assert rows[2] == ["1", "a", "1.00 (10)", "2.00", "10.00", "10.00", "tie"]
  assert rows[3] == ["1", "b", "1.00 (10)", "3.00", "2.00", "4.00", "tie"]
  # Means over the seeds: a (5 + 1)/2, (12 + 2)/2, ...
  assert rows[4] == ["mean", "a", "3.00", "7.00", "7.50", "11.00", ""]
  assert rows[5] == ["mean", "b", "2.00", "6.50", "3.00", "17.00", ""]


def test_errors(tmp_path):
  a = tmp_path / "a"
  _write(a, 0, [(10, 0.9, 0.8)])
  with pytest.raises(SystemExit):
    paired_runs.main(["--runs", f"a={a}"])            # one run only
  with pytest.raises(SystemExit, match="no evaluations"):
    paired_runs.main(["--seeds", "1", "--runs", f"a={a}", f"b={a}"])
