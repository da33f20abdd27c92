"""Command line: classify image files with a trained run's network.

  python -m r2d2_jax.predict --workdir DIR [--stage NAME] \\
      [--weights final|best] [--variables ema|raw|...] \\
      [--config configs/NAME.py[:variant] [--config.KEY=VALUE ...]] \\
      --images PATH_OR_GLOB [...] [--out predictions.csv]

Writes one CSV row per image (to --out, or to stdout): `path`, `class` (its
name when the dataset's names are known, else its index), `class_index`,
`confidence` (the softmax probability of that class) and `top5`, the five most
probable classes as `class:probability` separated by ';', most probable
first. `--config` (with the `--config.KEY=VALUE` overrides the run was
trained with) is needed while the workdir holds no `config.json`. Images are
read with Pillow, converted to the network's channels,
resized (bilinear) to its input size and normalised as evaluation does; see
`r2d2_jax.inference` for which checkpoint and weights are loaded.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from typing import Sequence

COLUMNS = ("path", "class", "class_index", "confidence", "top5")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m r2d2_jax.predict",
      description="Classify images with a trained run's checkpoint.")
  p.add_argument("--workdir", required=True,
                 help="The run's --workdir (a staged run: the folder of its "
                 "stage folders).")
  p.add_argument("--stage", default=None,
                 help="Stage of a staged run (default: the last that ran).")
  p.add_argument("--weights", default="final", choices=("final", "best"),
                 help="final: the newest kept checkpoint; best: the kept "
                 "checkpoint with the best validation accuracy.")
  p.add_argument("--variables", default="ema",
                 help="Which evaluated network: ema, raw (MPL also teacher).")
  p.add_argument("--bn_stats", default=None, choices=("trained", "unlabeled"),
                 help="BatchNorm statistics: the checkpoint's running "
                 "averages, or those re-estimated on the unlabeled pool at "
                 "the run's evaluation (default: the run's eval_bn_stats)")
  p.add_argument("--config", default=None,
                 help="The config the run was trained with, "
                 "configs/NAME.py[:variant] (default: WORKDIR/config.json).")
  p.add_argument("--images", required=True, nargs="+",
                 help="Image files, folders of PNG/JPEG files, or quoted "
                 "globs ('imgs/**/*.png').")
  p.add_argument("--out", default=None,
                 help="CSV file to write (default: stdout).")
  args, rest = p.parse_known_args(list(argv))
  args.overrides = {}
  for arg in rest:
    key, eq, value = arg.partition("=")
    if not key.startswith("--config.") or not eq:
      p.error(f"unrecognized argument {arg!r} (config overrides are "
              "--config.KEY=VALUE)")
    args.overrides[key[len("--config."):]] = value
  return args


def apply_overrides(config, overrides: dict[str, str]):
  """`config` with `--config.KEY=VALUE` overrides (values as Python literals).

  Raises:
    R2D2Error: a key the config does not have.
  """
  import ast  # pylint: disable=g-import-not-at-top
  from r2d2_jax.errors import R2D2Error  # pylint: disable=g-import-not-at-top
  for key, text in overrides.items():
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node = config
    *path, last = key.split(".")
    for i, part in enumerate(path + [last]):
      if not hasattr(node, "keys") or part not in node:
        raise R2D2Error(f"--config.{key}: the config has no field {part!r}; "
                        "give the overrides the run was trained with.")
      if i < len(path):
        node = node[part]
    if isinstance(node[last], float) and isinstance(value, int):
      value = float(value)
    try:
      node[last] = value
    except TypeError as e:
      raise R2D2Error(f"--config.{key}={text}: {e}") from None
  return config


def rows(paths: Sequence[str], probs, predictor) -> list[dict[str, str]]:
  """The CSV rows of images `paths` with probabilities `probs` [N, classes]."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = []
  k = min(5, probs.shape[1])
  for path, p in zip(paths, probs):
    order = np.argsort(-p, kind="stable")[:k]
    out.append({
        "path": path,
        "class": predictor.class_name(order[0]),
        "class_index": str(int(order[0])),
        "confidence": f"{p[order[0]]:.6f}",
        "top5": ";".join(f"{predictor.class_name(i)}:{p[i]:.6f}"
                         for i in order),
    })
  return out


def write_csv(records: list[dict[str, str]], out) -> None:
  writer = csv.DictWriter(out, fieldnames=COLUMNS)
  writer.writeheader()
  writer.writerows(records)


def run(argv: Sequence[str]) -> int:
  """Runs the command line `argv` (without the program name); the exit status."""
  args = parse_args(argv)
  from r2d2_jax import inference  # pylint: disable=g-import-not-at-top
  from r2d2_jax.errors import R2D2Error  # pylint: disable=g-import-not-at-top
  try:
    paths = inference.image_paths(args.images)
    config = args.config
    if args.overrides:
      if not config:
        raise R2D2Error("--config.KEY=VALUE overrides need --config.")
      config = apply_overrides(inference.load_config_file(config),
                               args.overrides)
    predictor = inference.load(args.workdir, stage=args.stage,
                               which=args.weights, variables=args.variables,
                               config=config, bn_stats=args.bn_stats)
    print(f"Predicting {len(paths)} images with {predictor.describe()}.",
          file=sys.stderr)
    images = inference.load_images(paths, predictor)
    records = rows(paths, predictor.probabilities(images), predictor)
  except R2D2Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if args.out:
    with open(args.out, "w", newline="") as f:
      write_csv(records, f)
    print(f"Wrote {len(records)} rows to {args.out}.", file=sys.stderr)
  else:
    buf = io.StringIO()
    write_csv(records, buf)
    sys.stdout.write(buf.getvalue())
  return 0


def main() -> None:
  sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
  main()
