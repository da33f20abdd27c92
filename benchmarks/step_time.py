r"""Compiled train-step time and images/s per model, on the current backend.

  python -m benchmarks.step_time --write            # every model, paper batches
  python -m benchmarks.step_time --models wrn28_2 --batch_scale 0.25

Each model runs the supervised step of the trainer (augmentation on device,
forward, backward, optimizer and EMA update) on random uint8 images of its
dataset's shape, at its paper batch size times `--batch_scale`. Compile time is
the first call; step time is the median over `--steps` timed calls, each
synchronised with `block_until_ready`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import report
from configs import common
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.data import sources

# model -> (dataset whose image shape it takes, paper batch size, where from)
PAPER = {
    "cnn_small": ("digits", 32, "quick start"),
    "lenet_2d": ("mnist", 100, "R2-D2 MNIST illustration"),
    "mlp_mnist": ("mnist", 128, "our MNIST-100 runs: 32 + 96"),
    "cnn13": ("cifar10", 256, "SemiMeta: 128 labeled + 128 unlabeled"),
    "wrn28_2": ("cifar10", 512, "FixMatch/MPL: 64 + 7x64"),
    "shake_shake26_2x96d": ("cifar10", 512, "R2-D2 D2: 128 + 384"),
    "resnet18": ("imagenet2012", 512, "R2-D2 ImageNet"),
    "resnet50": ("imagenet2012", 1024, "MPL ImageNet, labeled batch"),
}


def fake_arrays(dataset: str, n: int) -> dict[str, sources.ArraySplit]:
  info = sources.get_info(dataset)
  rng = np.random.default_rng(0)
  mk = lambda k: sources.ArraySplit(
      rng.integers(0, 256, (k, *info.image_shape), dtype=np.uint8),
      (np.arange(k) % info.num_classes).astype(np.int32))
  return {"train": mk(n), "test": mk(8)}


def add_method_blocks(c, method: str, mode: str = "") -> None:
  """The method's own config block, from the configs that use it."""
  if method == "r2d2":
    common.r2d2_block(c)
  elif method in ("mpl", "uda"):
    from configs import mpl_digits  # pylint: disable=g-import-not-at-top
    src = mpl_digits.get_config()
    c.mpl, c.uda = src.mpl, src.uda
    c.optimizer.schedule.wait_steps = 0  # time the student's real step
    if mode:
      c.mpl.mode = mode
  elif method == "semimeta":
    from r2d2_jax.methods import semimeta  # pylint: disable=g-import-not-at-top
    c.semimeta = semimeta.default_block()
    if mode:
      c.semimeta.mode = mode


def _stage_config(model: str, batch: int, steps: int, dtype: str,
                  method: str, dataset: str, uratio: int):
  """The config of `measure`'s run and its fake training images."""
  c = common.base_config()
  c.model.name = model
  c.model.dtype = dtype
  c.data.dataset = dataset
  c.data.eval_batch_size = 8
  c.total_steps = steps + 1
  n_train = max(2 * batch, 64)
  method, _, mode = method.partition(":")
  c.method = method
  if method == "supervised":
    c.data.num_labels = -1
    c.data.batch_size = batch
  else:
    add_method_blocks(c, method, mode)
    c.data.batch_size = batch // (1 + uratio)
    c.data.uratio = uratio
    c.data.unlabeled = "all"
    c.data.num_labels = max(10, n_train // 20 // 10 * 10)
  return c, fake_arrays(dataset, n_train)


def params_after(model: str, dataset: str, batch: int, steps: int):
  """The parameters after `steps` supervised steps from the seed-0 start.

  A pure function of the arguments and the backend's arithmetic: two XLA
  settings that compute the same agree to round-off
  (benchmarks/cpu_options.py compares them).
  """
  c, arrays = _stage_config(model, batch, steps, "", "supervised", dataset, 0)
  with tempfile.TemporaryDirectory() as wd:
    mesh = sharding.make_mesh()
    pipe = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
    stage = train.Stage(c, wd, mesh=mesh, pipeline=pipe)
    state = stage.init_state()
    for k in range(steps):
      state, _ = stage.train_step(state, pipe.global_batch(k, stage.streams))
    return jax.device_get(state.params)


def measure(model: str, batch: int, steps: int, dtype: str = "",
            method: str = "supervised", dataset: str | None = None,
            uratio: int = 3) -> dict:
  """Compile time and median step time of one method's train step.

  Args:
    model: registry name.
    batch: images per step; methods with an unlabeled stream get
      batch // (1 + uratio) labeled and uratio times as many unlabeled (by
      default a quarter and three quarters: R2-D2's mixed batch).
    steps: timed steps.
    dtype: compute dtype ('' for float32).
    method: registry name of the method, optionally ':mode' (e.g. 'mpl:exact').
    dataset: whose image shape to use (default: the model's paper dataset).
    uratio: unlabeled images per labeled one (methods with that stream).
  """
  dataset = dataset or PAPER[model][0]
  c, arrays = _stage_config(model, batch, steps, dtype, method, dataset,
                            uratio)
  method = method.partition(":")[0]
  with tempfile.TemporaryDirectory() as wd:
    mesh = sharding.make_mesh()
    pipe = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
    stage = train.Stage(c, wd, mesh=mesh, pipeline=pipe)
    state = stage.init_state()
    batches = [pipe.global_batch(k, stage.streams) for k in range(2)]
    t0 = time.perf_counter()
    state, m = stage.train_step(state, batches[0])
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for k in range(steps):
      t0 = time.perf_counter()
      state, m = stage.train_step(state, batches[k % 2])
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)
  return {"model": model, "method": method, "batch": batch,
          "compile_s": compile_s,
          "step_ms": step_s * 1e3, "images_per_s": batch / step_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", nargs="*", default=list(PAPER))
  parser.add_argument("--batch_scale", type=float, default=1.0)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--dtype", default="", help="e.g. bfloat16")
  parser.add_argument("--write", action="store_true",
                      help="write the table into docs/benchmarks.md")
  args = parser.parse_args()
  rows = []
  for name in args.models:
    batch = max(jax.device_count(),
                int(PAPER[name][1] * args.batch_scale) // jax.device_count() *
                jax.device_count())
    r = measure(name, batch, args.steps, args.dtype)
    r["source"] = PAPER[name][2]
    rows.append(r)
    print(f"{name:22s} batch {batch:5d}  compile {r['compile_s']:7.1f}s  "
          f"step {r['step_ms']:9.1f}ms  {r['images_per_s']:9.1f} img/s",
          flush=True)
  if args.write:
    cmd = " ".join(["python -m benchmarks.step_time", *sys.argv[1:]])
    lines = [
        "## Supervised train step per model" + (
            f" (batches x{args.batch_scale:g} of the paper's)"
            if args.batch_scale != 1 else ""), "",
        f"Command: `{' '.join(cmd.split())}`", "",
        f"Measured: {report.environment()}.", "",
        "| model | batch | paper batch (source) | compile s | step ms | images/s |",
        "| --- | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
      lines.append(
          f"| {r['model']} | {r['batch']} | {PAPER[r['model']][1]} "
          f"({r['source']}) | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
          f"{r['images_per_s']:.0f} |")
    report.write_section(
        "step_time" + (f"_{args.dtype}" if args.dtype else "") +
        (f"_scale{args.batch_scale:g}" if args.batch_scale != 1 else ""),
        "\n".join(lines))


if __name__ == "__main__":
  main()
