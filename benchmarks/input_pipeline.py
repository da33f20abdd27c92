"""Throughput of on-device view generation (weak + strong augmentation).

Times `r2d2_jax.data.augment.make_views` with a weak view (flip + translate)
and a strong view (weak + RandAugment + cutout) on batches of random uint8
images, jitted, after warm-up, on the default backend::

  python -m benchmarks.input_pipeline            # print
  python -m benchmarks.input_pipeline --write    # and update docs/benchmarks.md

"images/s" counts source images; each yields both views.  "per core" divides
by the CPU cores this process may use.  Wall-clock figures suffer when other
processes share the machine, so the CPU time this process used per batch is
reported too ("images per CPU-second" = images / process CPU seconds), which
is a contention-robust per-core figure on CPU backends.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from benchmarks import report
from r2d2_jax.data import augment

TARGET_PER_CORE = 1500.0  # images/s per core, weak + strong at 32x32x3
SHAPES = ((32, 32, 3), (28, 28, 1))


def views_config(translate: int, num_ops: int, magnitude: float,
                 cutout: int) -> dict[str, dict[str, Any]]:
  """The weak + strong views that are timed (FixMatch / MPL CIFAR style)."""
  return {
      "weak": dict(kind="weak", flip=True, translate=translate),
      "strong": dict(kind="strong", flip=True, translate=translate,
                     num_ops=num_ops, magnitude=magnitude, cutout=cutout),
  }


def num_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # Not Linux.
    return os.cpu_count() or 1


def device_description() -> str:
  """Backend and device, plus the CPU model on CPU backends."""
  dev = jax.devices()[0]
  text = f"{jax.default_backend()}: {jax.device_count()} x {dev.device_kind}"
  if dev.platform == "cpu":
    model = platform.processor()
    try:
      with open("/proc/cpuinfo") as f:
        found = re.search(r"model name\s*:\s*(.*)", f.read())
      model = found.group(1).strip() if found else model
    except OSError:
      pass
    if model:
      text += f" ({model})"
  return text


def bench_shape(shape: tuple[int, int, int], views: dict[str, dict[str, Any]],
                batch: int, warmup: int, iters: int) -> dict[str, float]:
  """Times `iters` batches (a different step each) after `warmup` batches.

  Args:
    shape: image shape (H, W, C).
    views: the `make_views` description.
    batch: images per batch.
    warmup: untimed batches after compilation.
    iters: timed batches.

  Returns:
    Median wall and CPU seconds per batch and the derived rates.
  """
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, *shape), np.uint8))
  indices = jax.device_put(np.arange(batch, dtype=np.int32))
  key = jax.random.key(0)
  fn = jax.jit(lambda k, s, x, i: augment.make_views(k, s, x, i, views))

  t0 = time.perf_counter()
  jax.block_until_ready(fn(key, jnp.int32(0), images, indices))
  compile_s = time.perf_counter() - t0
  for step in range(1, warmup + 1):
    jax.block_until_ready(fn(key, jnp.int32(step), images, indices))
  walls, cpus = [], []
  for step in range(warmup + 1, warmup + 1 + iters):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(key, jnp.int32(step), images, indices))
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  wall = statistics.median(walls)
  cpu = statistics.median(cpus)
  cores = num_cores()
  return dict(compile_s=compile_s, wall_s=wall, best_wall_s=min(walls),
              cpu_s=cpu, images_per_s=batch / wall,
              images_per_s_per_core=batch / wall / cores,
              images_per_cpu_s=batch / cpu if cpu > 0 else float("nan"))


def markdown(results: dict[str, dict[str, float]], args: argparse.Namespace,
             command: str) -> str:
  """The docs/benchmarks.md section, between the markers."""
  cores = num_cores()
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  r32 = results.get("32x32x3")
  lines = [
      "## Input pipeline",
      "",
      "On-device generation of a weak view (flip + translate "
      f"{args.translate}) and a strong view (weak + RandAugment "
      f"N={args.num_ops}, M={args.magnitude:g} + cutout {args.cutout}) with "
      "`r2d2_jax.data.augment.make_views`, jitted, on batches of "
      f"{args.batch} random uint8 images; median over {args.iters} batches "
      f"after {args.warmup} warm-up batches.  \"images/s\" counts source "
      "images (each yields both views); \"per core\" divides by the "
      f"{cores} CPU cores the process may use; \"images per CPU-second\" "
      "divides by the CPU time the process used, which is robust to other "
      "processes sharing the machine; \"cores busy\" = CPU time / wall time "
      "(XLA:CPU runs most of this program on one thread).",
      "",
      f"- Command: `{command}`",
      f"- Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
      f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
      f"Python {platform.python_version()}",
      f"- Device: {device_description()}; {cores} CPU cores; load average "
      f"(1, 5, 15 min) at the end: {load}",
      "",
      "| images | batch | ms / batch (median) | ms / batch (best) | images/s "
      "| images/s per core | CPU ms / batch | images per CPU-second "
      "| cores busy |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, r in results.items():
    lines.append(
        f"| {name} | {args.batch} | {1e3 * r['wall_s']:.1f} "
        f"| {1e3 * r['best_wall_s']:.1f} | {r['images_per_s']:,.0f} "
        f"| {r['images_per_s_per_core']:,.0f} | {1e3 * r['cpu_s']:.1f} "
        f"| {r['images_per_cpu_s']:,.0f} | {r['cpu_s'] / r['wall_s']:.2f} |")
  if r32 is not None:
    ok = r32["images_per_s_per_core"] >= TARGET_PER_CORE
    lines += ["", f"Target: at least {TARGET_PER_CORE:,.0f} images/s per core "
              f"at 32x32x3 (weak + strong): {'met' if ok else 'NOT met'} "
              f"({r32['images_per_s_per_core']:,.0f})."]
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=512)
  parser.add_argument("--iters", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--translate", type=int, default=4)
  parser.add_argument("--num_ops", type=int, default=2)
  parser.add_argument("--magnitude", type=float, default=10.0)
  parser.add_argument("--cutout", type=int, default=16)
  parser.add_argument("--write", action="store_true",
                      help="update the 'Input pipeline' section of --doc")
  parser.add_argument("--doc", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
      "benchmarks.md"))
  args = parser.parse_args(argv)
  command = "python -m benchmarks.input_pipeline " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])

  views = views_config(args.translate, args.num_ops, args.magnitude,
                       args.cutout)
  print(f"jax {jax.__version__}; {device_description()}; "
        f"{num_cores()} CPU cores")
  results = {}
  for shape in SHAPES:
    name = "x".join(map(str, shape))
    r = bench_shape(shape, views, args.batch, args.warmup, args.iters)
    results[name] = r
    print(f"{name}: compile {r['compile_s']:.1f} s; "
          f"{1e3 * r['wall_s']:.1f} ms/batch of {args.batch} "
          f"(best {1e3 * r['best_wall_s']:.1f}); "
          f"{r['images_per_s']:,.0f} images/s (weak + strong), "
          f"{r['images_per_s_per_core']:,.0f} images/s per core; "
          f"{r['images_per_cpu_s']:,.0f} images per CPU-second")
  r32 = results["32x32x3"]["images_per_s_per_core"]
  print(f"target {TARGET_PER_CORE:,.0f} images/s per core at 32x32x3: "
        f"{'met' if r32 >= TARGET_PER_CORE else 'NOT met'}")
  if args.write:
    report.write_section("input_pipeline", markdown(results, args, command),
                         path=args.doc)
    print(f"wrote {args.doc}")


if __name__ == "__main__":
  main()
