r"""Test error of a (staged) config over several seeds, written to docs/results.md.

  python -m benchmarks.results --config configs/r2d2_digits.py --seeds 0 1 2 --write
  python -m benchmarks.results --config configs/r2d2_mnist.py --seeds 0 1 2 \
      --override data.manual_dir=../shared/data/mnist --write

Each seed is a full run of the config (`seed` chooses the validation and
labeled splits, the initialisation and the data order) in `--root/SEED`; a
run that already finished is read back, not retrained. From each stage's
`eval_history.jsonl` (every evaluation) it gives the test error (100 −
top-1 accuracy, %) of the raw and the EMA weights, per seed and mean ± std
over the seeds, three ways:

  at best val   the test error at the evaluation with the highest validation
                accuracy of the same weights (ties: the latest). Chosen on the
                validation set (`data.num_val`, carved from the train split),
                never on test; n/a without a validation set.
  median last 20  the median test error of the last 20 evaluations
                (FixMatch's protocol); n/a with fewer than 20.
  final         the test error at the last step.

The headline is "at best val" of the raw weights, or "median last 20" of the
raw weights for a config without a validation set; the table says which.

A finished seed writes `--root/SEED/results_done.json` (its config, final
metrics and wall time). With it a seed is read back from its small files alone
(the done file and each stage's `eval_history.jsonl`), checkpoints or not, so
`python -m benchmarks.archive` can keep finished seeds in the repository and a
later session can add the missing seeds. A done file of another config is an
error, not read back.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np

from benchmarks import report
from r2d2_jax import analysis
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error

DONE_FILE = "results_done.json"

WEIGHTS = ("raw", "ema")
FIGURES = ("at best val", "median last 20", "final")

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


def stage_errors(history: list[dict], final_metrics: dict,
                 weights: str) -> dict[str, float]:
  """Test error % of one stage's `weights` ('raw' or 'ema'), each figure of FIGURES.

  Args:
    history: the stage's evaluations (`analysis.eval_history`).
    final_metrics: the stage's final metrics (what `train_and_evaluate`
      returned), used for "final" when the history is missing.
    weights: 'raw' or 'ema'.
  """
  test, val = f"accuracy/test/{weights}", f"accuracy/val/{weights}"
  last = analysis.final(history, test)
  if np.isnan(last):  # a run from before the history (or its old key names)
    last = final_metrics.get(test, final_metrics.get(f"accuracy/{weights}",
                                                     np.nan))
  acc = {"at best val": analysis.at_best(history, val, test),
         "median last 20": analysis.median_last(history, test, 20),
         "final": last}
  return {k: 100.0 * (1.0 - v) for k, v in acc.items()}


def headline(per_stage: dict) -> str:
  """The figure of the headline: at best val if every stage and seed has it."""
  for figure in ("at best val", "median last 20"):
    if all(not np.isnan(v) for errs in per_stage.values()
           for v in errs["raw"][figure]):
      return figure
  return "final"


def cell(values: list[float]) -> str:
  """'mean ± std (seed values)', n/a if any seed lacks the figure."""
  e = np.asarray(values, float)
  if np.isnan(e).any():
    return "n/a"
  std = e.std(ddof=1) if len(e) > 1 else 0.0
  return f"{e.mean():.2f} ± {std:.2f} ({', '.join(f'{x:.2f}' for x in e)})"


def table(per_stage: dict, labels: dict, figure: str,
          weights: tuple[str, ...] = WEIGHTS, first: str = "stage"
          ) -> list[str]:
  """The markdown table: one row per stage, each of `weights`, each FIGURES column.

  Args:
    per_stage: {row: {weights: {figure: [error per seed]}}}.
    labels: {row: its label}.
    figure: the headline figure (`headline`).
    weights: the weights whose columns appear (default raw and EMA).
    first: the first column's header.
  """
  cols = [f"{w} {f}" + (" (headline)" if (w, f) == ("raw", figure) else "")
          for w in weights for f in FIGURES]
  lines = [f"| {first} | " + " | ".join(cols) + " |",
           "| --- |" + " ---: |" * len(cols)]
  for stage, errs in per_stage.items():
    lines.append(f"| {labels[stage]} | " + " | ".join(
        cell(errs[w][f]) for w in weights for f in FIGURES) + " |")
  return lines


def _jsonable(x):
  return json.loads(json.dumps(x, default=float))


def diff_keys(a: dict, b: dict, prefix: str = ""):
  """The dotted keys whose values differ between two nested dicts."""
  for k in sorted(set(a) | set(b)):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from diff_keys(va, vb, f"{prefix}{k}.")
    elif va != vb:
      yield f"{prefix}{k}"


def run_seed(config, workdir: str) -> tuple[dict, float, bool]:
  """Trains (resumes, or reads back) one seed's run in `workdir`.

  Returns:
    (results, wall seconds, trained): what `train.train_and_evaluate`
    returned, the training time (of the session that trained it, for a run
    read back), and whether this call trained.

  Raises:
    R2D2Error: `workdir` holds a finished run of another config.
  """
  done = os.path.join(workdir, DONE_FILE)
  cfg = _jsonable(config.to_dict())
  if os.path.exists(done):
    with open(done) as f:
      saved = json.load(f)
    if saved["config"] != cfg:
      diff = list(diff_keys(saved["config"], cfg))
      raise R2D2Error(
          f"{done} is a finished run of another config (differing: "
          f"{', '.join(diff[:8])}). Use another --root, or delete {workdir}.")
    return saved["results"], float(saved["wall_s"]), False
  t0 = time.time()
  results = train.train_and_evaluate(config, workdir)
  wall = time.time() - t0
  tmp = done + ".tmp"
  with open(tmp, "w") as f:
    json.dump(dict(config=cfg, results=_jsonable(results), wall_s=wall,
                   finished=time.time()), f, indent=1)
  os.replace(tmp, done)
  return _jsonable(results), wall, True


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--root", default=None,
                      help="where the runs go (default /tmp/r2d2_jax/results/NAME)")
  parser.add_argument("--override", action="append", default=[],
                      help="key=value config overrides, e.g. data.manual_dir=DIR")
  parser.add_argument("--title", default=None)
  parser.add_argument("--notes", default="")
  parser.add_argument("--name", default=None,
                      help="section name in docs/results.md and default root "
                      "(default: the config's file name and variant)")
  parser.add_argument("--write", action="store_true")
  args = parser.parse_args(argv)
  name = args.name or os.path.basename(args.config).replace(".py", "").replace(
      ":", "_")
  root = args.root or os.path.join("/tmp/r2d2_jax/results", name)
  # {stage: {weights: {figure: [error per seed]}}}
  per_stage: dict[str, dict[str, dict[str, list[float]]]] = {}
  labels: dict[str, str] = {}
  num_evals: dict[str, list[int]] = {}
  num_val = set()
  t0 = time.time()
  for seed in args.seeds:
    config = load_config(args.config)
    for item in args.override:
      apply_override(config, item)
    config.seed = seed
    workdir = os.path.join(root, str(seed))
    results, _, _ = run_seed(config, workdir)
    staged = all(isinstance(v, dict) for v in results.values())
    if not staged:
      results = {"run": results}
    for stage, r in results.items():
      labels[stage] = row_label(config, stage)
      cfg = train.stage_config(config, stage) if staged else config
      num_val.add(int(cfg.data.get("num_val", 0) or 0))
      history = analysis.eval_history(
          os.path.join(workdir, stage) if staged else workdir)
      num_evals.setdefault(stage, []).append(len(history))
      entry = per_stage.setdefault(stage, {w: {f: [] for f in FIGURES}
                                           for w in WEIGHTS})
      for w in WEIGHTS:
        for f, err in stage_errors(history, r, w).items():
          entry[w][f].append(err)
      shown = ", ".join(f"{f} {entry['raw'][f][-1]:.2f}" for f in FIGURES)
      print(f"seed {seed} {stage:10s} raw test error %: {shown}", flush=True)
  minutes = (time.time() - t0) / 60
  figure = headline(per_stage)
  evals = ", ".join(f"{labels[s]} {min(n)}" + (f"-{max(n)}" if max(n) != min(n)
                                                else "")
                    for s, n in num_evals.items())
  lines = [f"## {args.title or name}", "",
           f"Command: `{shlex.join(['python', '-m', 'benchmarks.results', *(sys.argv[1:] if argv is None else argv)])}`",
           "", f"Measured: {report.environment()}; {len(args.seeds)} seeds "
           f"({', '.join(map(str, args.seeds))}); {minutes:.0f} minutes "
           "of wall time (runs already finished are read back, not timed).",
           "",
           f"Test error %, mean ± std over the seeds (per seed in brackets). "
           f"Headline: **raw weights, {figure}**"
           + {"at best val": " (the test error at the evaluation with the "
                             "best validation accuracy; ties: the latest)",
              "median last 20": " (no validation set: data.num_val=0, so "
                                "nothing is selected)",
              "final": " (no validation set and fewer than 20 evaluations)"
              }[figure]
           + f". Validation set: data.num_val={'/'.join(map(str, sorted(num_val)))} "
           "examples of the train split; the test split is only reported, "
           f"never selected on. Evaluations per stage: {evals}.",
           "", *table(per_stage, labels, figure)]
  if args.notes:
    lines += ["", args.notes]
  text = "\n".join(lines)
  print(text)
  if args.write:
    report.write_section(f"results_{name}", text,
                         path=os.path.join(os.path.dirname(report.DOC),
                                           "results.md"))
  return text


if __name__ == "__main__":
  main()
