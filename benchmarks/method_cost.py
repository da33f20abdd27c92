r"""Step time of each method against the supervised step on the same model and batch.

  python -m benchmarks.method_cost --write
  python -m benchmarks.method_cost --model cnn_small --dataset mnist --batch 64

The batch is the same number of images for every method (the semi-supervised
ones: a quarter labeled, three quarters unlabeled); the ratio to the supervised
step is the cost of the method's extra work (R2-D2: gathering and scattering
its table rows; UDA and MPL: a second, strong view of the unlabeled images and,
for MPL, a teacher; SemiMeta: the meta-gradient of its pseudo-labels).
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import report
from benchmarks import step_time

METHODS = ("supervised", "r2d2", "uda", "mpl:first_order", "mpl:exact",
           "semimeta:first_order", "semimeta:exact")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--model", default="cnn_small")
  parser.add_argument("--dataset", default="mnist")
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--methods", nargs="*", default=list(METHODS))
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  rows = []
  for method in args.methods:
    r = step_time.measure(args.model, args.batch, args.steps, method=method,
                          dataset=args.dataset)
    r["method"] = method
    rows.append(r)
    print(f"{method:22s} step {r['step_ms']:8.2f} ms  compile "
          f"{r['compile_s']:.1f}s", flush=True)
  base = next(r for r in rows if r["method"] == "supervised")["step_ms"]
  if args.write:
    lines = ["## Method step cost vs the supervised step", "",
             f"Command: `{' '.join(['python -m benchmarks.method_cost', *sys.argv[1:]])}`",
             "", f"Measured: {report.environment()}; model `{args.model}`, "
             f"{args.dataset}-shaped images, {args.batch} images per step, "
             f"median of {args.steps} steps.", "",
             "| method | step ms | x supervised | compile s |",
             "| --- | ---: | ---: | ---: |"]
    for r in rows:
      lines.append(f"| {r['method']} | {r['step_ms']:.2f} | "
                   f"{r['step_ms'] / base:.3f} | {r['compile_s']:.1f} |")
    report.write_section(f"method_cost_{args.model}", "\n".join(lines))


if __name__ == "__main__":
  main()
