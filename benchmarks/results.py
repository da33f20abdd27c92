r"""Test error of a (staged) config over several seeds, written to docs/results.md.

  python -m benchmarks.results --config configs/r2d2_digits.py --seeds 0 1 2 --write
  python -m benchmarks.results --config configs/r2d2_mnist.py --seeds 0 1 2 \
      --override data.manual_dir=../shared/data/mnist --write

Each seed is a full run of the config (`seed` chooses the labeled split, the
initialisation and the data order) in `--root/SEED`; a run that already
finished is read back, not retrained. The table gives the test error (100 −
accuracy, %) of every stage, mean ± standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np

from benchmarks import report
from r2d2_jax import train

# (stage, method) -> row label; R2-D2's stages name its ablation rows.
LABELS = {("supervised", "supervised"): "supervised-only",
          ("d2", "r2d2"): "D2 (stage 2 only)",
          ("r2", "r2d2"): "D2 + R2 (before finetune)",
          ("finetune", "r2d2_finetune"): "R2-D2 (all stages)",
          ("mpl", "mpl"): "MPL student (before finetune)",
          ("finetune", "mpl_finetune"): "MPL (student finetuned)",
          ("mpl_finetune", "mpl_finetune"): "MPL (student finetuned)",
          ("semimeta", "semimeta"): "SemiMeta",
          ("run", "semimeta"): "SemiMeta"}


def row_label(config, stage: str) -> str:
  method = (train.stage_config(config, stage).method if stage != "run"
            else config.method)
  return LABELS.get((stage, method), f"{method} ({stage})" if stage != "run"
                    else method)


def load_config(path: str):
  import importlib.util  # pylint: disable=g-import-not-at-top
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("exp_config", file)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def apply_override(config, item: str) -> None:
  key, _, value = item.partition("=")
  node = config
  *path, last = key.split(".")
  for p in path:
    node = node[p]
  old = node[last]
  if isinstance(old, bool):
    node[last] = value.lower() in ("1", "true", "yes")
  elif isinstance(old, (int, float)) and not isinstance(old, bool):
    node[last] = type(old)(value)
  else:
    node[last] = value


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--root", default=None,
                      help="where the runs go (default /tmp/r2d2_jax/results/NAME)")
  parser.add_argument("--override", action="append", default=[],
                      help="key=value config overrides, e.g. data.manual_dir=DIR")
  parser.add_argument("--title", default=None)
  parser.add_argument("--notes", default="")
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args()
  name = os.path.basename(args.config).replace(".py", "").replace(":", "_")
  root = args.root or os.path.join("/tmp/r2d2_jax/results", name)
  per_stage: dict[str, list[float]] = {}
  labels: dict[str, str] = {}
  t0 = time.time()
  for seed in args.seeds:
    config = load_config(args.config)
    for item in args.override:
      apply_override(config, item)
    config.seed = seed
    results = train.train_and_evaluate(config, os.path.join(root, str(seed)))
    if not all(isinstance(v, dict) for v in results.values()):
      results = {"run": results}
    for stage, r in results.items():
      labels[stage] = row_label(config, stage)
      err = 100.0 * (1.0 - r["accuracy/raw"])
      per_stage.setdefault(stage, []).append(err)
      print(f"seed {seed} {stage:10s} test error {err:.2f} %", flush=True)
  minutes = (time.time() - t0) / 60
  lines = [f"## {args.title or name}", "",
           f"Command: `{shlex.join(['python', '-m', 'benchmarks.results', *sys.argv[1:]])}`",
           "", f"Measured: {report.environment()}; {len(args.seeds)} seeds "
           f"({', '.join(map(str, args.seeds))}); {minutes:.0f} minutes "
           "of wall time (runs already finished are read back, not timed).",
           "", "| stage | test error % (mean ± std) | per seed |",
           "| --- | ---: | --- |"]
  for stage, errs in per_stage.items():
    e = np.asarray(errs)
    lines.append(f"| {labels[stage]} | {e.mean():.2f} ± "
                 f"{e.std(ddof=1) if len(e) > 1 else 0.0:.2f} | "
                 f"{', '.join(f'{x:.2f}' for x in e)} |")
  if args.notes:
    lines += ["", args.notes]
  text = "\n".join(lines)
  print(text)
  if args.write:
    report.write_section(f"results_{name}", text,
                         path=os.path.join(os.path.dirname(report.DOC),
                                           "results.md"))


if __name__ == "__main__":
  main()
