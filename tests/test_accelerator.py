"""benchmarks/accelerator.py: the prepared device benchmark, run here on CPU.

`test_smoke_without_tensorflow` runs `python -m benchmarks.accelerator --smoke`
in a subprocess whose import system refuses tensorflow, tensorflow_datasets
and clu (a meta-path finder installed before anything is imported), as on the
device image, and checks the JSON and the printed table: every planned row is
there, each measured row has finite, positive figures, each other row an
explicit reason. The budget is short (the CPU is shared), so late method rows
may be skipped for the budget; the cheap rows come first in `--smoke` and must
be measured. `test_paper_batches` checks, without compiling, that the full
(non-smoke) plan runs every method on WRN-28-2 at its paper batch.

Break checks done (each made the named test fail, then was restored):
* `from clu import metric_writers, periodic_actions` back at the top of
  r2d2_jax/metrics.py (as before its lazy clu import; clu imports
  TensorFlow): test_smoke_without_tensorflow fails (ImportError: refused by
  the test: clu).
* `cost_flops` ignoring the list form of `cost_analysis()`:
  test_cost_flops_and_peaks fails.
* METHODS' pi_model batch (64, 1) -> (64, 7): test_paper_batches fails.
"""

import json
import math
import os
import subprocess
import sys
import time

import pytest

from benchmarks import accelerator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow", "tensorflow_datasets", "clu")

PRELUDE = f"""
import sys
BLOCKED = {BLOCKED!r}
class _Refuse:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in BLOCKED:
      raise ImportError('refused by the test: ' + name)
    return None
sys.meta_path.insert(0, _Refuse())
import runpy
sys.argv = ['benchmarks.accelerator'] + sys.argv[1:]
try:
  runpy.run_module('benchmarks.accelerator', run_name='__main__')
finally:
  print('LOADED', [m for m in BLOCKED if m in sys.modules])
"""


def _finite_positive(v):
  return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_smoke_without_tensorflow(tmp_path):
  out = tmp_path / "accelerator.json"
  doc = tmp_path / "benchmarks.md"
  env = dict(os.environ)
  env.pop("OUT", None)
  env["JAX_PLATFORMS"] = "cpu"
  # One CPU device, compiled fast (as tests/conftest.py does, without its
  # 8 fake devices).
  env["XLA_FLAGS"] = ("--xla_backend_optimization_level=0 "
                      "--xla_llvm_disable_expensive_passes=true")
  t0 = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-c", PRELUDE, "--smoke", "--budget_s", "60",
       "--json", str(out), "--write", "--doc", str(doc)],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
  took = time.perf_counter() - t0
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "LOADED []" in proc.stdout, proc.stdout[-2000:]
  body = json.loads(out.read_text())
  rows = {r["row"]: r for r in body["rows"]}
  planned = [r["row"] for r in accelerator.plan(smoke=True)]
  assert list(rows) == planned
  assert body["header"]["smoke"] is True
  assert body["header"]["device_kind"]
  for name, r in rows.items():
    assert r["status"] in ("ok", "n/a", "skipped"), (name, r)
    if r["status"] != "ok":
      assert r["reason"], (name, r)
      continue
    if r["kind"] == "step":
      for k in ("compile_s", "step_ms", "images_per_s", "flops"):
        assert _finite_positive(r[k]), (name, k, r[k])
      assert r["loss_finite"] is not False, name
      # CPU: no peak FLOP/s and no memory stats, each with its reason.
      assert r["mfu"] is None and "n/a" in r["peak_name"], r
      assert r["device_peak_bytes"] is None or r["device_peak_bytes"] > 0
    elif r["kind"] == "table":
      assert _finite_positive(r["gather_ms"]) and _finite_positive(
          r["scatter_ms"]) and r["rows_finite"], r
    elif r["kind"] == "jpeg":
      assert _finite_positive(r["images_per_s_per_core"]), r
  # The cheap rows come first and are always measured.
  assert rows[planned[0]]["status"] == "ok"          # the table
  assert rows[planned[1]]["status"] in ("ok", "n/a")  # JPEG (n/a: no Pillow)
  assert rows[planned[2]]["status"] == "ok"          # a supervised step
  text = doc.read_text()
  assert "<!-- BEGIN accelerator_smoke_cpu -->" in text
  assert "CPU SMOKE RUN" in text
  for name in planned:
    assert f"| {name} |" in text or text.count(name) >= 1, name
  print(f"smoke subprocess took {took:.0f}s; measured "
        f"{sum(r['status'] == 'ok' for r in rows.values())}/{len(rows)} rows")


def test_paper_batches():
  want = {"r2d2": (128, 3), "fixmatch": (64, 7), "uda": (128, 7),
          "mpl:first_order": (128, 7), "mpl:exact": (128, 7),
          "semimeta:first_order": (128, 1), "semimeta:exact": (128, 1),
          "flexmatch": (64, 7), "freematch": (64, 7), "softmatch": (64, 7),
          "adamatch": (64, 7), "mixmatch": (64, 1), "mean_teacher": (8, 12),
          "pi_model": (64, 1), "vat": (32, 4), "pseudo_label": (64, 1)}
  specs = [r for r in accelerator.plan(smoke=False) if r["kind"] == "step"]
  methods = [r["method"] for r in specs if r["method"] != "supervised"]
  assert sorted(methods) == sorted(want)
  for spec in specs:
    c = spec["build"]()
    method = spec["method"].split(":")[0]
    assert c.method == method
    if method == "supervised":
      continue
    assert c.model.name == "wrn28_2" and not c.model.dtype, spec["row"]
    assert (c.data.batch_size, c.data.uratio) == want[spec["method"]], spec
    if ":" in spec["method"]:
      assert c[method].mode == spec["method"].split(":")[1]
  sup = {r["row"]: r["build"]() for r in specs if r["method"] == "supervised"}
  assert sup["supervised WRN-28-2 float32"].data.batch_size == 512
  assert sup["supervised ResNet-50 bfloat16"].model.dtype == "bfloat16"
  assert sup["supervised ResNet-50 float32"].data.dataset == "imagenet2012"


class _Compiled:
  def __init__(self, cost):
    self._cost = cost

  def cost_analysis(self):
    if isinstance(self._cost, Exception):
      raise self._cost
    return self._cost


def test_cost_flops_and_peaks():
  f = accelerator.cost_flops
  assert f(_Compiled({"flops": 3.0}), None) == (3.0, "compiled")
  assert f(_Compiled([{"flops": 5.0}]), None) == (5.0, "compiled")
  assert f(_Compiled({}), _Compiled({"flops": 7.0})) == (7.0, "lowered")
  assert f(_Compiled(RuntimeError("x")), _Compiled([])) [0] is None
  assert f(_Compiled({"flops": -1.0}), _Compiled(None))[0] is None
  peak, name = accelerator.peak_flops("NVIDIA H200", "bfloat16")
  assert peak == pytest.approx(989e12) and "H200 bf16 989" in name
  peak, name = accelerator.peak_flops("NVIDIA H100 80GB HBM3", "float32")
  assert peak == pytest.approx(494.7e12) and "TF32" in name
  assert accelerator.peak_flops("NVIDIA H100 PCIe", "bfloat16")[0] == 756e12
  assert accelerator.peak_flops("TPU v5 lite", "bfloat16")[0] == 197e12
  assert accelerator.peak_flops("TPU v4", "float32")[0] == 275e12
  assert accelerator.peak_flops("cpu", "float32")[0] is None
