r"""Learning curves of `benchmarks.results` runs: validation and test error vs step.

  python -m benchmarks.plot_runs --seeds 0 1 2 \
      --runs vat=/tmp/R/vat_mnist supervised=/tmp/R/vat_mnist_supervised \
      --out docs/figures/vat_mnist_error.png

Each `NAME=ROOT` is a results root of a single-stage config (`ROOT/SEED/
eval_history.jsonl`, as `benchmarks.results` and `benchmarks.archive` leave
it). Left: validation error, right: test error, of the `--weights` network;
a line per run is the mean over the seeds that have the run, the band their
min–max (at the steps every such seed evaluated). A seed a run lacks is
skipped for that run and the legend says how many seeds it shows.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np

from benchmarks import report
from r2d2_jax import analysis
from r2d2_jax.errors import R2D2Error


def error_curves(root: str, seeds: Sequence[int], split: str, weights: str
                 ) -> tuple[np.ndarray, np.ndarray, list[int]]:
  """(steps, errors [seed, step] in %, seeds used) of one results root."""
  per_seed, used = [], []
  key = f"accuracy/{split}/{weights}"
  for s in seeds:
    d = os.path.join(root, str(s))
    if not os.path.exists(os.path.join(d, "eval_history.jsonl")):
      continue
    hist = analysis.eval_history(d)
    pts = {int(r["step"]): 100.0 * (1.0 - float(r[key]))
           for r in hist if key in r}
    if pts:
      per_seed.append(pts)
      used.append(s)
  if not per_seed:
    return np.zeros(0, np.int64), np.zeros((0, 0)), []
  steps = sorted(set.intersection(*(set(p) for p in per_seed)))
  return (np.asarray(steps, np.int64),
          np.array([[p[x] for x in steps] for p in per_seed]), used)


def plot(runs: dict[str, str], seeds: Sequence[int], path: str | None,
         weights: str = "raw", title: str = "",
         target: float | None = None, target_label: str = "target"):
  """The two-panel figure (saved as PNG to `path` if given).

  target: a test error % drawn as a dashed line on the test panel (a paper's
  number), or None.
  """
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
  drawn = 0
  for ax, split in zip(axes, ("val", "test")):
    for i, (name, root) in enumerate(runs.items()):
      x, v, used = error_curves(root, seeds, split, weights)
      if not used:
        continue
      drawn += 1
      color = f"C{i}"
      ax.plot(x, v.mean(0), color=color,
              label=f"{name} ({len(used)} seed{'s' * (len(used) > 1)})")
      ax.fill_between(x, v.min(0), v.max(0), color=color, alpha=0.2, lw=0)
    if split == "test" and target is not None:
      ax.axhline(target, color="k", ls="--", lw=0.9,
                 label=f"{target_label}: {target:g} %")
    ax.set(xlabel="training step", title=f"{split} error % ({weights} weights)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=8)
  if not drawn:
    raise R2D2Error(f"No eval_history.jsonl under any of {list(runs.values())} "
                    f"for seeds {list(seeds)}.")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(prog="python -m benchmarks.plot_runs",
                              description=__doc__.split("\n\n")[2])
  p.add_argument("--runs", nargs="+", required=True, help="NAME=ROOT ...")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--weights", default="raw")
  p.add_argument("--title", default="")
  p.add_argument("--target", type=float, default=None,
                 help="a test error %% to draw on the test panel")
  p.add_argument("--target-label", default="target")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  runs = report.named_roots(p, args.runs)
  try:
    plot(runs, args.seeds, args.out, args.weights, args.title, args.target,
         args.target_label)
  except R2D2Error as e:
    sys.exit(f"error: {e}")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
