r"""Compile time, step time and compiled memory of each method at its paper batch.

  python -m benchmarks.method_profile --write                  # the paper batches
  python -m benchmarks.method_profile --no_run --write         # compile only
  python -m benchmarks.method_profile --batch_scale 0.0625 --steps 3 --write
  python -m benchmarks.method_profile --table --write          # R2-D2 table plan

Each method (`benchmarks.method_cost.METHODS`) is profiled on its CIFAR-10-4000
config: the model, labeled batch B and ratio μ of `configs/*_cifar10_4k.py`
(supervised: stage 1 of R2-D2's pipeline; R2-D2: its D2 stage; MPL: its MPL
stage), on random CIFAR-10-shaped images (50,000 train rows, so R2-D2's table
has its real size). `--batch_scale` multiplies B (μ is kept); `--dtype
bfloat16` sets `config.model.dtype`.

* compile s: `lower` + `compile` of the trainer's jitted train step (the
  augmentation on device, the method's step, optimizer and EMA updates), from
  the state's and one batch's shapes.
* step ms: median of `--steps` calls of the compiled step after one warm-up
  call (each synchronised with `block_until_ready`); "CPU ms" is the median
  process CPU time of a step (all threads), which other processes sharing the
  machine disturb less than wall time. `--no_run` skips both, and nothing is
  executed: not even the state is created.
* memory: XLA's `compiled.memory_analysis()` of that step: arguments, outputs,
  temporaries and aliased (donated) bytes; "peak" is argument + output + temp −
  alias, an upper bound on the device memory the step holds at once
  (`peak_memory_in_bytes` is shown too where the backend fills it in).

Host-side hooks (R2-D2's reprediction) are not part of the step and not timed.

`--table` prints, instead, the bytes per device of R2-D2's pseudo-label table
for ImageNet (1,281,167 rows x 1000 classes, float32, padded to the device count
by `r2d2_jax.table.padded_rows`) for 1 to 1024 devices. It is planned from
abstract shapes only: `jax.eval_shape` of the method's own `init_state`, and
its own `state_sharding` on a `jax.sharding.AbstractMesh`, so no device (and no
5 GB of memory) is needed.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import statistics
import sys
import tempfile
import time
from typing import Any

if __package__ in (None, ""):
  # Run as a script (`python benchmarks/method_profile.py`): the repository
  # root, not benchmarks/, must be on the path for `benchmarks.*` imports.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from jax.sharding import AbstractMesh, AxisType

from benchmarks import method_cost
from benchmarks import report
from benchmarks import step_time
from r2d2_jax import models
from r2d2_jax import optim
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import pipeline as pipeline_lib
from r2d2_jax.methods import Network, Task
from r2d2_jax.methods import r2d2
from r2d2_jax.methods.base import bind

# method -> (config module, stage of a staged config or None, where from)
PAPER = {
    "supervised": ("r2d2_cifar10_4k", "supervised", "R2-D2 stage 1"),
    "r2d2": ("r2d2_cifar10_4k", "d2", "R2-D2 D2 stage"),
    "uda": ("uda_cifar10_4k", None, "MPL's teacher settings"),
    "mpl": ("mpl_cifar10_4k", "mpl", "MPL stage"),
    "semimeta": ("semimeta_cifar10_4k", None, "SemiMeta"),
}
NUM_TRAIN = 50_000  # CIFAR-10's train split.
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes",
                 "temp_size_in_bytes", "alias_size_in_bytes",
                 "generated_code_size_in_bytes", "peak_memory_in_bytes")
IMAGENET_ROWS, IMAGENET_CLASSES = 1_281_167, 1000
DEVICE_COUNTS = (1, 8, 32, 128, 256, 1024)
MiB = 2.0**20


def paper_config(spec: str, batch_scale: float = 1.0, dtype: str = ""):
  """The config a method's paper runs, with its batch scaled.

  Args:
    spec: a `method_cost.METHODS` entry, e.g. 'mpl:exact'.
    batch_scale: multiplies the labeled batch B (at least 1 per device); the
      unlabeled ratio μ is kept.
    dtype: `config.model.dtype`.

  Returns:
    (config, source): the single-stage config and a note on where it is from.
  """
  method, _, mode = spec.partition(":")
  module, stage, source = PAPER[method]
  c = importlib.import_module(f"configs.{module}").get_config()
  if stage:
    c = train.stage_config(c, stage)
  c.method = method
  if mode:
    c[method].mode = mode
  c.model.dtype = dtype
  n_dev = jax.device_count()
  b = c.data.batch_size
  c.data.batch_size = max(n_dev, int(round(b * batch_scale)) // n_dev * n_dev)
  c.data.eval_batch_size = 8
  c.checkpoint_async = False
  return c, f"configs/{module}.py" + (f" stage {stage}" if stage else "") + (
      f" ({source})")


def profile(spec: str, batch_scale: float = 1.0, steps: int = 3,
            run: bool = True, dtype: str = "") -> dict[str, Any]:
  """Compile time, compiled memory and (if `run`) step time of one method.

  Args:
    spec: a `method_cost.METHODS` entry.
    batch_scale: see `paper_config`.
    steps: timed steps after one warm-up step.
    run: execute the step; False compiles only.
    dtype: compute dtype ('' = float32).

  Returns:
    A dict: method, model, B, mu, images (per step, all views' sources),
    lower_s, compile_s, step_ms and cpu_ms (wall and process CPU time of a
    step, median; None without `run`), the memory fields, peak_estimate.
  """
  c, source = paper_config(spec, batch_scale, dtype)
  mesh = sharding.make_mesh()
  arrays = step_time.fake_arrays(c.data.dataset, NUM_TRAIN)
  with tempfile.TemporaryDirectory() as wd:
    pipe = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
    stage = train.Stage(c, wd, mesh=mesh, pipeline=pipe)
    batches = [pipe.global_batch(k, stage.streams) for k in range(2)]
    t0 = time.perf_counter()
    lowered = stage.train_step.lower(stage.abstract_state, batches[0])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    step_ms = cpu_ms = None
    if run:
      state = stage.init_state()
      state, m = compiled(state, batches[1])
      jax.block_until_ready(m)
      times, cpu_times = [], []
      for k in range(steps):
        t, cpu = time.perf_counter(), time.process_time()
        state, m = compiled(state, batches[k % 2])
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - cpu)
      step_ms = statistics.median(times) * 1e3
      cpu_ms = statistics.median(cpu_times) * 1e3
  out = {"method": spec, "model": c.model.name, "source": source,
         "B": c.data.batch_size, "mu": int(c.data.get("uratio", 0) or 0),
         "images": sum(int(b["image"].shape[0]) for b in batches[0].values()),
         "lower_s": t1 - t0, "compile_s": t2 - t1, "step_ms": step_ms,
         "cpu_ms": cpu_ms}
  for f in MEMORY_FIELDS:
    v = getattr(mem, f, None) if mem is not None else None
    out[f] = None if v is None else int(v)
  if mem is not None:
    out["peak_estimate"] = (out["argument_size_in_bytes"] +
                            out["output_size_in_bytes"] +
                            out["temp_size_in_bytes"] -
                            out["alias_size_in_bytes"])
  else:
    out["peak_estimate"] = None
  return out


# ---------------------------------------------------------------------------
# R2-D2's table per device, planned from abstract shapes


class _PlanningMesh:
  """What `r2d2_jax.table.padded_rows` reads of a mesh: `devices.size`."""

  def __init__(self, n: int):
    self.devices = np.empty((n,), object)


def plan_table(n_devices: int, num_rows: int = IMAGENET_ROWS,
               num_classes: int = IMAGENET_CLASSES) -> dict[str, Any]:
  """Bytes per device of R2-D2's state on `n_devices`, from abstract shapes.

  The state is `jax.eval_shape` of `r2d2.init_state` (network of
  configs/r2d2_imagenet10.py's D2 stage, table padded by the method's own
  `padded_rows`); the shardings are `r2d2.state_sharding` on an
  `AbstractMesh` of `n_devices`.

  Args:
    n_devices: devices of the 1-D data mesh.
    num_rows: train examples (table rows before padding).
    num_classes: classes (table columns).

  Returns:
    padded rows, the table's shard shape, and bytes per device of the table,
    the learnable mask, the rest of the state (replicated) and the total.
  """
  c = importlib.import_module("configs.r2d2_imagenet10").get_config()
  c = train.stage_config(c, "d2")
  size = int(c.data.get("image_size") or 224)
  model = models.get_model(c.model.name, num_classes)
  tx, schedule = optim.make_optimizer(c.optimizer, 1000)
  labeled = np.arange(0, num_rows, 10)
  net = Network(model=model, tx=tx, schedule=schedule,
                image_shape=(size, size, 3))
  task = Task(num_classes=num_classes, num_train=num_rows, total_steps=1000,
              steps_per_epoch=1, mesh=_PlanningMesh(n_devices),
              labeled_index=labeled,
              unlabeled_index=np.setdiff1d(np.arange(num_rows), labeled),
              train_labels=np.zeros(num_rows, np.int32))
  init = bind(r2d2.METHOD.init_state, net=net, task=task,
              hp=r2d2.hparams(c))
  abstract = jax.eval_shape(init, jax.random.key(0))
  mesh = AbstractMesh((n_devices,), (sharding.DATA,),
                      axis_types=(AxisType.Auto,))
  shardings = r2d2.state_sharding(abstract, mesh)

  def per_device(leaf, s):
    return int(np.prod(s.shard_shape(leaf.shape))) * leaf.dtype.itemsize

  sizes = jax.tree.map(per_device, abstract, shardings)
  table = sizes.table
  learnable = sizes.learnable
  total = sum(jax.tree.leaves(sizes))
  return {"devices": n_devices, "rows": abstract.table.shape[0],
          "shard": shardings.table.shard_shape(abstract.table.shape),
          "table": table, "learnable": learnable,
          "rest": total - table - learnable, "total": total,
          "model": c.model.name}


# ---------------------------------------------------------------------------


def _mb(v) -> str:
  return "n/a" if v is None else f"{v / MiB:,.1f}"


def _environment() -> str:
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  return (f"{report.environment()}; device_kind `{jax.devices()[0].device_kind}`"
          f"; load average (1, 5, 15 min) at the end {load}")


def table_section(rows: list[dict[str, Any]]) -> str:
  cmd = " ".join(["python -m benchmarks.method_profile", *sys.argv[1:]])
  lines = [
      "## R2-D2 pseudo-label table per device (ImageNet, planned)", "",
      f"Command: `{cmd}`", "",
      f"Computed {datetime.date.today().isoformat()} with JAX "
      f"{jax.__version__} from abstract shapes only (`jax.eval_shape` of "
      "`r2d2.init_state`, `r2d2.state_sharding` on a "
      "`jax.sharding.AbstractMesh`): 1,281,167 x 1000 float32 rows padded by "
      "`table.padded_rows` to a multiple of the device count, sharded "
      f"`P('data', None)`. \"Rest\" is the replicated {rows[0]['model']} "
      "network of configs/r2d2_imagenet10.py (parameters, SGD momentum, EMA, "
      "BatchNorm statistics) on every device.", "",
      "| devices | padded rows | table shard | table MiB / device | "
      "mask MiB / device | rest MiB / device | total MiB / device |",
      "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(
        f"| {r['devices']} | {r['rows']:,} | {r['shard'][0]:,} x "
        f"{r['shard'][1]} | {_mb(r['table'])} | {_mb(r['learnable'])} | "
        f"{_mb(r['rest'])} | {_mb(r['total'])} |")
  return "\n".join(lines)


def profile_section(rows: list[dict[str, Any]], args) -> str:
  cmd = " ".join(["python -m benchmarks.method_profile", *sys.argv[1:]])
  scaled = (f"labeled batch B x{args.batch_scale:g} of the paper's (μ kept)"
            if args.batch_scale != 1 else "the paper's batches")
  what = ("compile only: nothing was executed" if args.no_run else
          f"step = median of {args.steps} steps after 1 warm-up step (wall "
          "and process CPU time)")
  # XLA's own peak where it means more than the arguments: on CPU it is
  # within a few KiB of the argument bytes (temporaries are not counted).
  xla_peak = any(r["peak_memory_in_bytes"] and
                 r["peak_memory_in_bytes"] > 1.01 * r["argument_size_in_bytes"]
                 for r in rows)
  if xla_peak:
    peak_note = "XLA's own `peak_memory_in_bytes` is the last column"
  elif any(r["peak_memory_in_bytes"] for r in rows):
    peak_note = ("XLA's own `peak_memory_in_bytes` is within 1 % of the "
                 "argument bytes on this backend (temporaries not counted), "
                 "so it is left out")
  else:
    peak_note = "XLA's `peak_memory_in_bytes` is not filled in on this backend"
  lines = [
      f"## Method profile on `{jax.default_backend()}`"
      + (f", {args.dtype}" if args.dtype else ", float32")
      + (f", batch x{args.batch_scale:g}" if args.batch_scale != 1 else "")
      + (", compile only" if args.no_run else ""), "",
      f"Command: `{cmd}`", "",
      f"Measured: {_environment()}.", "",
      f"Each method on its CIFAR-10-4000 config with {scaled}; {what}. "
      "\"images\" counts the source images of one step (labeled B + "
      "unlabeled μB; their weak / strong views are made on device). Compile "
      "s = `lower` + `compile` of the train step. Memory is XLA's "
      "`memory_analysis()` of the compiled step in MiB: arguments, outputs, "
      "temporaries, aliased (the donated state); peak = args + out + temp − "
      f"alias; {peak_note}.", "",
      "| method | model | B | μ | images | compile s | step ms | CPU ms | "
      "args MiB | out MiB | temp MiB | alias MiB | peak MiB |"
      + (" XLA peak MiB |" if xla_peak else ""),
      "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
      "---: | ---: | ---: |" + (" ---: |" if xla_peak else "")]
  for r in rows:
    step = "—" if r["step_ms"] is None else f"{r['step_ms']:,.0f}"
    cpu = "—" if r["cpu_ms"] is None else f"{r['cpu_ms']:,.0f}"
    line = (f"| {r['method']} | {r['model']} | {r['B']} | {r['mu']} | "
            f"{r['images']} | {r['lower_s'] + r['compile_s']:.1f} | {step} | "
            f"{cpu} | "
            f"{_mb(r['argument_size_in_bytes'])} | "
            f"{_mb(r['output_size_in_bytes'])} | "
            f"{_mb(r['temp_size_in_bytes'])} | "
            f"{_mb(r['alias_size_in_bytes'])} | {_mb(r['peak_estimate'])} |")
    if xla_peak:
      line += f" {_mb(r['peak_memory_in_bytes'])} |"
    lines.append(line)
  lines += ["", "Configs: " + "; ".join(
      sorted({f"{r['method'].split(':')[0]}: {r['source']}" for r in rows}))
            + "."]
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--methods", nargs="*",
                      default=list(method_cost.METHODS))
  parser.add_argument("--batch_scale", type=float, default=1.0)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--no_run", action="store_true",
                      help="compile and report memory; execute nothing")
  parser.add_argument("--dtype", default="", help="e.g. bfloat16")
  parser.add_argument("--table", action="store_true",
                      help="plan R2-D2's ImageNet table per device instead")
  parser.add_argument("--write", action="store_true",
                      help="write the section into docs/benchmarks.md")
  args = parser.parse_args()

  if args.table:
    rows = []
    for n in DEVICE_COUNTS:
      r = plan_table(n)
      rows.append(r)
      print(f"{n:5d} devices  rows {r['rows']:>9,}  shard {r['shard']}  "
            f"table {r['table'] / MiB:10,.1f} MiB  total "
            f"{r['total'] / MiB:10,.1f} MiB per device", flush=True)
    if args.write:
      report.write_section("r2d2_table_plan", table_section(rows))
    return

  print(f"{jax.devices()[0].device_kind} ({jax.default_backend()}), JAX "
        f"{jax.__version__}; memory fields: {', '.join(MEMORY_FIELDS)}",
        flush=True)
  rows = []
  for spec in args.methods:
    r = profile(spec, args.batch_scale, args.steps, not args.no_run,
                args.dtype)
    rows.append(r)
    step = ("-" if r["step_ms"] is None else
            f"{r['step_ms']:.0f}ms (CPU {r['cpu_ms']:.0f}ms)")
    print(f"{spec:22s} {r['model']:20s} B {r['B']:4d} mu {r['mu']}  lower "
          f"{r['lower_s']:.1f}s compile {r['compile_s']:.1f}s step {step}  "
          + "  ".join(f"{f.replace('_in_bytes', '')}={_mb(r[f])}MiB"
                      for f in MEMORY_FIELDS)
          + f"  peak_estimate={_mb(r['peak_estimate'])}MiB", flush=True)
  if args.write:
    name = (f"method_profile_{jax.default_backend()}"
            + (f"_{args.dtype}" if args.dtype else "")
            + (f"_scale{args.batch_scale:g}" if args.batch_scale != 1 else "")
            + ("_compile_only" if args.no_run else ""))
    report.write_section(name, profile_section(rows, args))


if __name__ == "__main__":
  main()
