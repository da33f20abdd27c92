r"""XLA:CPU options against the plain setting: step time of the CPU workloads.

  python -m benchmarks.cpu_options --write            # every option, 3 rounds
  python -m benchmarks.cpu_options --options plain xnn_conv --rounds 1

Each option is a set of XLA flags (`OPTIONS`; what the installed jaxlib's
XLA:CPU accepts: its oneDNN, XNNPACK and YNNPACK library fusions, the
fast math, Eigen's threading). Flags are read when JAX starts, so every (option, round) runs in its
own subprocess; the rounds go through the options in turn (plain, a, b, ...,
plain, a, b, ...) so that a change in the machine's load falls on all of them
alike, and each cell is the median over rounds of the median step time.

Workloads (`WORKLOADS`): the supervised train step of `wrn28_2` on 64 CIFAR
images and of `cnn_small` on 32 digits, and the MPL step (first-order) on
`wrn28_2` at B = 8 labeled + μB = 56 unlabeled images — the step compared
with a PyTorch implementation in docs/benchmarks.md.

Every option is also checked for equal results: three supervised `cnn_small`
steps from the same initialisation and batches, and the largest absolute
difference of the resulting parameters from the plain setting's is reported
(float32 round-off is ~1e-6 here; an option that changes the arithmetic, such
as fast math, shows more). An option that fails to compile is reported with
its error, not dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

# name -> (XLA flags, what it is)
OPTIONS = {
    "plain": ("", "the installed jaxlib's defaults"),
    "onednn": ("--xla_cpu_use_onednn=true", "oneDNN for dots and convolutions"),
    "onednn_conv": ("--xla_cpu_experimental_onednn_fusion_type="
                    "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                    "oneDNN library fusion of each convolution"),
    "xnn_conv": ("--xla_cpu_experimental_xnn_fusion_type="
                 "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                 "XNNPACK for each convolution"),
    "xnn_conv_dot": ("--xla_cpu_experimental_xnn_fusion_type="
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,"
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
                     "XNNPACK for each convolution and dot"),
    "ynn_conv": ("--xla_cpu_experimental_ynn_fusion_type="
                 "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
                 "YNNPACK for each convolution"),
    "fast_math": ("--xla_cpu_enable_fast_math=true",
                  "LLVM fast math (changes the arithmetic)"),
    "eigen_1thread": ("--xla_cpu_multi_thread_eigen=false",
                      "single-threaded Eigen convolutions and dots"),
}

# name -> (model, dataset, method, labeled batch, uratio)
WORKLOADS = {
    "wrn28_2 supervised, 64 images": ("wrn28_2", "cifar10", "supervised", 64, 0),
    "cnn_small supervised, 32 images": ("cnn_small", "digits", "supervised",
                                        32, 0),
    "wrn28_2 MPL first-order, 8 + 56 images": ("wrn28_2", "cifar10",
                                               "mpl:first_order", 8, 7),
}


def _child(workloads: list[str], steps: int) -> dict:
  """Runs in the subprocess: times each workload, then the equality check."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import step_time  # pylint: disable=g-import-not-at-top
  out = {"times_ms": {}, "errors": {}}
  for name in workloads:
    model, dataset, method, batch, uratio = WORKLOADS[name]
    try:
      r = step_time.measure(model, batch * (1 + uratio), steps, method=method,
                            dataset=dataset, uratio=uratio or 3)
      out["times_ms"][name] = r["step_ms"]
    except Exception as e:  # pylint: disable=broad-except
      out["errors"][name] = f"{type(e).__name__}: {str(e)[:300]}"
  params = step_time.params_after("cnn_small", "digits", 32, 3)
  out["params"] = [np.asarray(p).ravel().tolist()
                   for p in jax.tree.leaves(params)]
  return out


def run_option(name: str, workloads: list[str], steps: int) -> dict:
  """One subprocess with the option's flags; its measurements as a dict."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = OPTIONS[name][0]
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  cmd = [sys.executable, "-m", "benchmarks.cpu_options", "--child",
         json.dumps({"workloads": workloads, "steps": steps})]
  t0 = time.time()
  p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root,
                     check=False)
  if p.returncode != 0:
    return {"failed": (p.stderr or p.stdout).strip().splitlines()[-1][:300],
            "wall_s": time.time() - t0}
  line = [l for l in p.stdout.splitlines() if l.startswith("CHILD ")][-1]
  return {**json.loads(line[len("CHILD "):]), "wall_s": time.time() - t0}


def summarise(runs: dict[str, list[dict]], workloads: list[str]) -> dict:
  """Median over rounds per (option, workload); parameter difference from plain."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  plain = next((r for r in runs.get("plain", []) if "params" in r), None)
  rows = {}
  for name, rs in runs.items():
    ok = [r for r in rs if "times_ms" in r]
    row = {"failed": next((r["failed"] for r in rs if "failed" in r), None)}
    for w in workloads:
      ts = [r["times_ms"][w] for r in ok if w in r["times_ms"]]
      errs = [r["errors"][w] for r in ok if w in r.get("errors", {})]
      row[w] = statistics.median(ts) if ts else None
      if errs and not ts:
        row.setdefault("errors", {})[w] = errs[0]
    if ok and plain is not None:
      row["max_abs_diff"] = max(
          float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
          for a, b in zip(ok[0]["params"], plain["params"]))
    rows[name] = row
  return rows


def save(path: str, runs: dict[str, list[dict]], torch_ms: list[float],
         workloads: list[str]) -> None:
  """The rounds so far, and their summary, as JSON (rewritten after each run)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump({"runs": {o: [{k: v for k, v in x.items() if k != "params"}
                            for x in rs] for o, rs in runs.items()},
               "summary": summarise(runs, workloads),
               "torch_ms": torch_ms}, f, indent=1)


def table(rows: dict, workloads: list[str]) -> list[str]:
  lines = ["| option | XLA flags | " + " | ".join(f"{w}: ms (× plain)"
                                                   for w in workloads)
           + " | max abs Δ params vs plain |",
           "| --- | --- |" + " ---: |" * (len(workloads) + 1)]
  base = rows.get("plain", {})
  for name, row in rows.items():
    cells = []
    for w in workloads:
      t = row.get(w)
      if t is None:
        why = row.get("failed") or row.get("errors", {}).get(w, "not run")
        cells.append(f"failed: {why[:80]}")
      else:
        ratio = (f" ({t / base[w]:.2f})" if base.get(w) else "")
        cells.append(f"{t:.0f}{ratio}")
    diff = row.get("max_abs_diff")
    lines.append(f"| {name} | `{OPTIONS[name][0] or '(none)'}` | "
                 + " | ".join(cells) + " | "
                 + (f"{diff:.1e}" if diff is not None else "n/a") + " |")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--options", nargs="*", default=list(OPTIONS))
  parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS))
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--json", default="/tmp/r2d2_jax/cpu_options.json")
  parser.add_argument("--write", action="store_true")
  parser.add_argument("--torch", default=None, metavar="PYTHON",
                      help="an interpreter with torch: each round also runs "
                      "benchmarks/torch_wrn.py (WRN-28-2, 64 images) for the "
                      "ratio to PyTorch")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    spec = json.loads(args.child)
    print("CHILD " + json.dumps(_child(spec["workloads"], spec["steps"])))
    return
  for name in args.options:
    if name not in OPTIONS:
      parser.error(f"unknown option {name!r}; choose from {list(OPTIONS)}")
  for w in args.workloads:
    if w not in WORKLOADS:
      parser.error(f"unknown workload {w!r}; choose from {list(WORKLOADS)}")
  options = ["plain"] + [o for o in args.options if o != "plain"]
  runs: dict[str, list[dict]] = {o: [] for o in options}
  torch_ms: list[float] = []
  t0 = time.time()
  for k in range(args.rounds):
    if args.torch:
      script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "torch_wrn.py")
      p = subprocess.run([args.torch, script, "--batch", "64", "--threads",
                          str(os.cpu_count()), "--steps", str(args.steps)],
                         capture_output=True, text=True, check=True)
      torch_ms.append(json.loads(p.stdout.strip().splitlines()[-1])["step_ms"])
      print(f"round {k + 1}/{args.rounds} pytorch        wrn28_2 "
            f"{torch_ms[-1]:.0f} ms", flush=True)
    for name in options:
      r = run_option(name, args.workloads, args.steps)
      runs[name].append(r)
      shown = r.get("failed") or ", ".join(
          f"{w.split(',')[0]} {t:.0f} ms" for w, t in r["times_ms"].items())
      print(f"round {k + 1}/{args.rounds} {name:14s} {shown} "
            f"({r['wall_s']:.0f} s)", flush=True)
      save(args.json, runs, torch_ms, args.workloads)
  rows = summarise(runs, args.workloads)
  from benchmarks import report  # pylint: disable=g-import-not-at-top
  lines = ["## XLA:CPU options", "",
           "Command: `" + " ".join(["python -m benchmarks.cpu_options",
                                    *sys.argv[1:]]) + "`", "",
           f"Measured: {report.environment()}; {args.rounds} rounds of "
           f"{args.steps} timed steps per option (median of medians); "
           f"{(time.time() - t0) / 60:.0f} minutes.", "",
           *table(rows, args.workloads)]
  wrn = "wrn28_2 supervised, 64 images"
  if torch_ms and wrn in args.workloads:
    t = statistics.median(torch_ms)
    best = min((r[wrn], n) for n, r in rows.items() if r.get(wrn))
    lines += ["", f"PyTorch (benchmarks/torch_wrn.py, the same network and "
              f"step, {os.cpu_count()} threads, channels-last), median over "
              f"the rounds: {t:.0f} ms per step. JAX / PyTorch on `{wrn}`: "
              f"plain {rows['plain'][wrn] / t:.2f}x, best option "
              f"(`{best[1]}`) {best[0] / t:.2f}x."]
  text = "\n".join(lines)
  print(text)
  if args.write:
    report.write_section("cpu_options", text)


if __name__ == "__main__":
  main()
