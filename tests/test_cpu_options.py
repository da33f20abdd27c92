"""benchmarks/cpu_options.py: the summary of its rounds and its table.

The subprocess runs themselves are minutes long (each option compiles the
workloads afresh) and are the script's job, not the suite's; these tests check
what it makes of them on hand-made rounds.

Break checks: the median over rounds replaced by the first round
-> test_summary_medians_and_parameter_difference; the ratio computed against
the option itself -> test_table_ratios_and_failures.
"""

from benchmarks import cpu_options as co

W = "cnn_small supervised, 32 images"


def _round(ms, params, errors=None):
  return {"times_ms": {W: ms}, "errors": errors or {}, "params": params,
          "wall_s": 1.0}


def test_summary_medians_and_parameter_difference():
  runs = {"plain": [_round(30.0, [[1.0, 2.0]]), _round(10.0, [[1.0, 2.0]]),
                    _round(20.0, [[1.0, 2.0]])],
          "fast_math": [_round(8.0, [[1.0, 2.5]]), _round(12.0, [[1.0, 2.5]]),
                        _round(40.0, [[1.0, 2.5]])],
          "onednn": [{"failed": "boom", "wall_s": 1.0}]}
  rows = co.summarise(runs, [W])
  assert rows["plain"][W] == 20.0 and rows["fast_math"][W] == 12.0
  assert rows["plain"]["max_abs_diff"] == 0.0
  assert rows["fast_math"]["max_abs_diff"] == 0.5
  assert rows["onednn"][W] is None and rows["onednn"]["failed"] == "boom"


def test_table_ratios_and_failures():
  rows = {"plain": {W: 20.0, "max_abs_diff": 0.0, "failed": None},
          "xnn_conv": {W: 30.0, "max_abs_diff": 1e-7, "failed": None},
          "onednn": {W: None, "failed": "RuntimeError: no"}}
  lines = co.table(rows, [W])
  assert lines[0].count("|") == lines[1].count("|")
  assert "| plain | `(none)` | 20 (1.00) | 0.0e+00 |" in lines
  assert any(l.startswith("| xnn_conv |") and "30 (1.50)" in l for l in lines)
  assert any(l.startswith("| onednn |") and "failed: RuntimeError: no" in l
             for l in lines)
