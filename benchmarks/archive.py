r"""Finished benchmark runs kept without their checkpoints, to continue a table later.

A results root (`benchmarks.results --root`, `benchmarks.compare --root`)
holds checkpoints, which are large and needed only to resume a run that has
not finished. A finished run is read back from its small files alone: its done
file (`results_done.json` or `compare_done.json`), configs, `split.json`,
`eval_history.jsonl` and event files. This copies every finished run of a root
without `checkpoints/` and `best_checkpoint/`, so the runs of a table too long
for one session survive into the next one's fresh machine:

  python -m benchmarks.archive /tmp/r2d2_jax/results/vat_mnist runs/vat_mnist
  # a later session, on a fresh machine:
  python -m benchmarks.archive runs/vat_mnist /tmp/r2d2_jax/results/vat_mnist
  python -m benchmarks.results --config configs/vat_mnist.py --seeds 0 1 2 \
      --root /tmp/r2d2_jax/results/vat_mnist ...   # seed 0 is read back

A run that has not finished is not copied (it is listed). A run already in the
destination is kept if its done file is the same, and is an error if it
differs (two different runs under one name).
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
from typing import Sequence

from r2d2_jax.errors import R2D2Error

# benchmarks.results.DONE_FILE, benchmarks.compare.DONE_FILE (not imported:
# this module needs neither JAX nor the configs).
DONE_FILES = ("results_done.json", "compare_done.json")
SKIP = ("checkpoints", "best_checkpoint", "*.tmp")


def runs(root: str) -> tuple[list[str], list[str]]:
  """(finished, unfinished) runs of `root`, as paths relative to it.

  A run is a directory with a done file (finished) or a `config.json` and no
  done file above or in it (unfinished: the trainer's own record of a start).
  """
  finished, unfinished = [], []
  for d, subdirs, files in os.walk(root):
    rel = os.path.relpath(d, root)
    if any(f in files for f in DONE_FILES):
      finished.append(rel)
      subdirs[:] = []  # a run's stages are inside it
    elif "config.json" in files or "compare_config.json" in files:
      unfinished.append(rel)
      subdirs[:] = []
    else:
      subdirs[:] = sorted(s for s in subdirs if s not in SKIP[:2])
  return sorted(finished), sorted(unfinished)


def copy(src: str, dst: str, log=print) -> list[str]:
  """Copies the finished runs of `src` into `dst`, without checkpoints.

  Returns:
    The runs copied (relative paths); runs already in `dst` are not.

  Raises:
    R2D2Error: `src` has no finished run, or a run in `dst` is another run.
  """
  if not os.path.isdir(src):
    raise R2D2Error(f"{src} is not a directory.")
  finished, unfinished = runs(src)
  for rel in unfinished:
    log(f"not finished, not copied: {os.path.join(src, rel)}")
  if not finished:
    raise R2D2Error(f"{src} holds no finished run (no {' or '.join(DONE_FILES)}"
                    "); let a benchmark finish first.")
  copied = []
  for rel in finished:
    s, d = os.path.join(src, rel), os.path.join(dst, rel)
    done = next(f for f in DONE_FILES if os.path.exists(os.path.join(s, f)))
    if os.path.exists(os.path.join(d, done)):
      if not filecmp.cmp(os.path.join(s, done), os.path.join(d, done),
                         shallow=False):
        raise R2D2Error(
            f"{d} holds another run than {s} (their {done} differ). Delete "
            f"one, or copy to another destination.")
      log(f"already there: {d}")
      continue
    if os.path.exists(d):  # an unfinished copy of the same run: replace it
      shutil.rmtree(d)
    tmp = d.rstrip(os.sep) + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(s, tmp, ignore=shutil.ignore_patterns(*SKIP))
    os.replace(tmp, d)
    copied.append(rel)
    log(f"copied: {s} -> {d}")
  return copied


def main(argv: Sequence[str] | None = None) -> list[str]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("src", help="a results root (or an archive)")
  parser.add_argument("dst", help="where the finished runs go")
  args = parser.parse_args(argv)
  return copy(args.src, args.dst)


if __name__ == "__main__":
  main()
