r"""Noisy Student's per-round pseudo-label diagnostics over seeds, for docs/results.md.

Reads the runs `benchmarks.results` left under ROOT/SEED/STAGE (a Noisy
Student config's teacher and rounds) and tabulates, per round, what its
labelling step logged (docs/algorithms.md, "Noisy Student"): the teacher's
pseudo-label accuracy on the unlabeled pool (against the hidden labels), the
fraction kept by the confidence filter, the accuracy of the balanced set
counted with its copies, its size and its smallest and largest class, as
mean ± std over the seeds. Nothing is trained here.

  python -m benchmarks.noisy_student_rounds \
      --root /tmp/r2d2_jax/results/noisy_student_digits --seeds 0 1 2 \
      --name noisy_student_digits --write
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

import numpy as np

from benchmarks import report
from r2d2_jax import analysis

COLUMNS = (
    ("pseudo_label_accuracy", "pseudo-label accuracy %", 100.0),
    ("kept_fraction", "kept by the filter %", 100.0),
    ("kept_accuracy", "accuracy of the set %", 100.0),
    ("set_size", "set size", 1.0),
    ("class_count_min", "smallest class", 1.0),
    ("class_count_max", "largest class", 1.0),
)


def round_diagnostics(stage_dir: str) -> dict[str, float] | None:
  """The labelling step's `noisy_student/*` scalars of one round, or None."""
  scalars = analysis.read_scalars(stage_dir)
  out = {}
  for key, _, _ in COLUMNS:
    series = scalars.get(f"noisy_student/{key}")
    if series is None:
      return None
    out[key] = float(series[1][0])
  return out


def cell(values: list[float], scale: float) -> str:
  v = np.asarray(values) * scale
  digits = 1 if scale == 100.0 else 0
  per = ", ".join(f"{x:.{digits}f}" for x in v)
  return f"{v.mean():.{digits}f} ± {v.std():.{digits}f} ({per})"


def table(root: str, seeds: list[int]) -> list[str]:
  rounds: dict[str, list[dict[str, float]]] = {}
  for seed in seeds:
    seed_dir = os.path.join(root, str(seed))
    for stage in sorted(os.listdir(seed_dir)):
      path = os.path.join(seed_dir, stage)
      if not os.path.isdir(path):
        continue
      d = round_diagnostics(path)
      if d is not None:
        rounds.setdefault(stage, []).append(d)
  if not rounds:
    raise SystemExit(f"No Noisy Student round with diagnostics under {root}.")
  lines = ["| round | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
           "| --- |" + " ---: |" * len(COLUMNS)]
  for stage, rows in rounds.items():
    if len(rows) != len(seeds):
      raise SystemExit(f"{stage}: {len(rows)} of {len(seeds)} seeds have "
                       "finished their labelling step.")
    lines.append(f"| {stage} | " + " | ".join(
        cell([r[k] for r in rows], scale) for k, _, scale in COLUMNS) + " |")
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--name", required=True,
                      help="the results section these diagnostics go with")
  parser.add_argument("--title", default="")
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  body = [f"## {args.title or args.name + ': pseudo-labels per round'}", "",
          "Command: `" + shlex.join(["python", "-m",
                                     "benchmarks.noisy_student_rounds",
                                     *sys.argv[1:]]) + "`", "",
          f"Measured: {report.environment()}; seeds "
          f"{', '.join(map(str, args.seeds))}. Each round's labelling step "
          "(before its first step): the teacher's pseudo-labels on the "
          "unlabeled pool against the hidden true labels (diagnostics only), "
          "the fraction through the confidence filter, and the balanced set "
          "counted with its copies; mean ± std over the seeds (per seed in "
          "brackets).", "", *table(args.root, args.seeds)]
  text = "\n".join(body)
  print(text)
  if args.write:
    report.write_section(f"results_{args.name}_rounds", text,
                         path=os.path.join(os.path.dirname(report.DOC),
                                           "results.md"))


if __name__ == "__main__":
  main()
