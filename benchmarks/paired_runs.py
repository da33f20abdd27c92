r"""Two results roots on the same seeds, side by side per seed: what validation chooses.

  python -m benchmarks.paired_runs --seeds 0 1 2 \
      --runs trained=docs/runs/vat_mnist \
      unlabeled=docs/runs/vat_mnist_bn_unlabeled

Each `NAME=ROOT` is a results root of a single-stage config (`ROOT/SEED/
eval_history.jsonl`, as `benchmarks.results` and `benchmarks.archive` leave
it), e.g. one training evaluated two ways (`eval_bn_stats`). For every seed
and run it prints the best validation error (the headline's selection:
highest `accuracy/val/WEIGHTS`, ties to the latest evaluation), its step, the
test error there, and the final validation / test error; then, per seed,
which run the validation split prefers (the lower best validation error;
equal: a tie), and the mean of each column over the seeds. The test column
is only reported: a choice among the runs is made on validation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Sequence

import numpy as np

from benchmarks import report
from r2d2_jax import analysis
from r2d2_jax.errors import R2D2Error


def seed_figures(root: str, seed: int, weights: str) -> dict[str, float]:
  """Best-val error, its step and test error, the final val / test error (%)."""
  history = analysis.eval_history(os.path.join(root, str(seed)))
  if not history:
    raise R2D2Error(f"{os.path.join(root, str(seed))} has no evaluations.")
  select = f"accuracy/val/{weights}"
  # The headline's rule (`analysis.at_best`: ties go to the latest).
  at_best = lambda key: analysis.at_best(history, select, key)
  if math.isnan(at_best(select)):
    raise R2D2Error(f"no evaluation has {select!r} (no validation split?)")
  err = lambda acc: 100.0 * (1.0 - acc)
  last = history[-1]
  return dict(step=int(at_best("step")), best_val=err(at_best(select)),
              test_at_best=err(at_best(f"accuracy/test/{weights}")),
              final_val=err(last[select]),
              final_test=err(last[f"accuracy/test/{weights}"]))


def table(runs: dict[str, str], seeds: Sequence[int], weights: str) -> str:
  """The markdown table (one row per seed and run, then the means)."""
  lines = ["| seed | run | best val error % (step) | test error % there | "
           "final val % | final test % | validation prefers |",
           "| ---: | --- | ---: | ---: | ---: | ---: | --- |"]
  figures = {name: [seed_figures(root, s, weights) for s in seeds]
             for name, root in runs.items()}
  for i, seed in enumerate(seeds):
    vals = {name: figs[i]["best_val"] for name, figs in figures.items()}
    low = min(vals.values())
    winners = [n for n, v in vals.items() if v == low]
    prefers = winners[0] if len(winners) == 1 else "tie"
    for name, figs in figures.items():
      f = figs[i]
      lines.append(
          f"| {seed} | {name} | {f['best_val']:.2f} ({f['step']}) | "
          f"{f['test_at_best']:.2f} | {f['final_val']:.2f} | "
          f"{f['final_test']:.2f} | {prefers} |")
  for name, figs in figures.items():
    mean = {k: float(np.mean([f[k] for f in figs]))
            for k in ("best_val", "test_at_best", "final_val", "final_test")}
    lines.append(
        f"| mean | {name} | {mean['best_val']:.2f} | "
        f"{mean['test_at_best']:.2f} | {mean['final_val']:.2f} | "
        f"{mean['final_test']:.2f} | |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.paired_runs",
                              description=__doc__.split("\n\n")[1])
  p.add_argument("--runs", nargs="+", required=True, help="NAME=ROOT ...")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--weights", default="raw")
  args = p.parse_args(argv)
  runs = report.named_roots(p, args.runs)
  if len(runs) < 2:
    p.error("--runs: give at least two NAME=ROOT")
  try:
    print(table(runs, args.seeds, args.weights))
  except R2D2Error as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
