r"""One prepared device benchmark: step time, memory, MFU, table, input rates.

On the device machine (one GPU or TPU chip), from the repository root, as
one command with a limit a little above the budget (e.g. 480 s)::

  python -m benchmarks.accelerator --budget_s 420 --json $OUT/accelerator.json

The device's docs/ does not come back; put its table into docs/benchmarks.md
here, from the JSON that came back (`--rows NAME ...` measures only the rows
whose name contains one of the words, e.g. the methods a first run had no time
for)::

  python -m benchmarks.accelerator --from_json accelerator.json --write

`--smoke` runs every row at tiny sizes (CPU). The device image needs jax,
flax, optax, orbax-checkpoint, chex and numpy (with their own dependencies:
absl-py, PyYAML); nothing here imports TensorFlow, tensorflow-datasets or clu.
It does need `ml_collections` (the configs and `r2d2_jax.methods.base` import
it): where the image lacks it, bring its pure-Python wheel (77 KB) in the
git-ignored `.whl/` folder of the repository, made beforehand on a machine
with the registry::

  pip download ml_collections==1.1.0 --no-deps -d .whl/

and send `.whl` with the code (the device tool's `carry: [".whl"]`). This
module puts each wheel of `.whl/` whose package does not import on `sys.path`
before anything else is imported (a pure-Python wheel imports from the zip; a
binary one, e.g. Pillow's, is unpacked to a temporary folder first and must
match the device's Python), so no `pip install` is needed there. Pillow is
optional: without it the JPEG row is n/a, with the reason.

Rows (synthetic arrays only, one device):

* step rows: the trainer's jitted train step (`train.Stage.train_step`: the
  augmentation on device, the method's step, optimizer and EMA updates) on
  random uint8 images, through `lower` + `compile` (compile s); step ms is the
  median of `--steps` calls after one warm-up call, each synchronised with
  `block_until_ready`; images/s counts source images of the step (labeled +
  unlabeled, not their views). Supervised WRN-28-2 on 512 CIFAR-sized images
  (the 64 + 7x64 of FixMatch / MPL) and ResNet-50 on 128 224x224 images, in
  float32 and bfloat16 (`config.model.dtype`); then every method's step on
  WRN-28-2 at its paper batch (B labeled + μB unlabeled from its
  configs/*_cifar10*.py; Π-model and Pseudo-Label, which have none, at USB's
  classic-CV CIFAR-10 batch 64 + 1x64), fp32, with 50,000 train rows (R2-D2's
  table has CIFAR-10's real size).
* MFU: FLOPs of the compiled step from XLA's cost analysis
  (`compiled.cost_analysis()['flops']`, else the lowered program's) / step
  time / the device's dense peak (`PEAKS`, named in the table; fp32 rows are
  compared with the TF32 tensor-core peak on NVIDIA, since JAX's default
  matmul precision runs float32 convolutions on TF32 there). The FLOPs count
  the whole step (augmentation included).
* memory: `device.memory_stats()['peak_bytes_in_use']` after the row (the
  process's peak so far: it never goes down, so read it as an upper bound per
  row; n/a where the backend has no memory stats, e.g. CPU), and XLA's
  `memory_analysis()` estimate of the step (args + out + temp - alias).
* R2-D2 table: a 1,281,167 x 1000 float32 table on one device; gather ms is
  `table.gather_rows` of a batch of rows, scatter ms `table.scatter_add_rows`
  of the same rows (the table donated), medians.
* JPEG input: host-side decode + Inception random-resized crop (area 8-100 %,
  aspect 3/4-4/3) to 224x224 with Pillow, one thread, of synthetic JPEGs of
  ImageNet's typical size (500x375, quality 90); images/s per core = images /
  process CPU seconds. The streamed ImageNet pipeline
  (`r2d2_jax.data.imagenet`) decodes with TensorFlow, which the image lacks,
  so Pillow stands in for it. "cores per device" = the fastest ResNet-50 row's
  images/s / the per-core rate.

`--budget_s` (seconds from the start of the process): before each row its
cost is estimated from the rows measured so far (the largest of the last two
of its kind, x1.25, or a first guess); a row that would not end `--reserve_s`
before the budget is skipped and marked so. A row still running when the
budget runs out is marked so too, and the run writes what it has and exits
(status 0), so give the device command a limit a little above the budget
(e.g. `--budget_s 420` under a 480 s limit). Every row is written to the JSON
file (`--json`, default $OUT/accelerator.json, else /tmp/accelerator.json) as
soon as it is measured, so a killed run keeps what it measured.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()  # The budget counts from here (before jax).

# pylint: disable=g-import-not-at-top,wrong-import-position
import argparse
import gc
import glob
import importlib
import io
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import traceback
import zipfile
from typing import Any

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Wheel name prefix -> the module it provides.
_WHEELS = {"ml_collections": "ml_collections", "pillow": "PIL"}


def _use_wheels(folder: str = os.path.join(_ROOT, ".whl")) -> list[str]:
  """Puts the wheels of `folder` whose module does not import on sys.path."""
  used = []
  for path in sorted(glob.glob(os.path.join(folder, "*.whl"))):
    prefix = os.path.basename(path).split("-")[0].lower()
    module = _WHEELS.get(prefix)
    if module is None:
      continue
    try:
      importlib.import_module(module)
      continue
    except ImportError:
      pass
    with zipfile.ZipFile(path) as z:
      binary = any(n.endswith((".so", ".pyd")) for n in z.namelist())
      if binary:
        target = tempfile.mkdtemp(prefix=f"whl_{prefix}_")
        z.extractall(target)
      else:
        target = path
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    used.append(os.path.basename(path))
  return used


WHEELS_USED = _use_wheels()

if __package__ in (None, ""):
  sys.path.insert(0, _ROOT)

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import report
from benchmarks import step_time
from r2d2_jax import sharding
from r2d2_jax import table as table_lib
from r2d2_jax import train
from r2d2_jax.data import pipeline as pipeline_lib

MiB = 2.0**20

# Dense peak FLOP/s by device kind (lower-case substring of
# `device.device_kind`, first match wins): (bf16, fp32 as JAX runs it, name
# of the fp32 figure). Vendor data sheets, without sparsity.
PEAKS: tuple[tuple[str, float, float, str], ...] = (
    ("h200", 989e12, 494.7e12, "TF32"),
    ("h100 pcie", 756e12, 378e12, "TF32"),
    ("h100", 989e12, 494.7e12, "TF32"),   # SXM (HBM3)
    ("a100", 312e12, 156e12, "TF32"),
    ("tpu v6", 918e12, 918e12, "bf16 passes"),
    ("tpu v5 lite", 197e12, 197e12, "bf16 passes"),
    ("tpu v5e", 197e12, 197e12, "bf16 passes"),
    ("tpu v5", 459e12, 459e12, "bf16 passes"),  # v5p
    ("tpu v4", 275e12, 275e12, "bf16 passes"),
)
# Plain (non-tensor-core) FP32 peaks: fp32 rows' `mfu_vs_fp32_simt` in the
# JSON, should XLA not use TF32 for them.
FP32_SIMT = {"h200": 66.9e12, "h100": 66.9e12, "a100": 19.5e12}


def peak_flops(device_kind: str, dtype: str) -> tuple[float | None, str]:
  """(peak FLOP/s, its name) of `device_kind` for a row's compute dtype."""
  kind = device_kind.lower()
  for key, bf16, fp32, fp32_name in PEAKS:
    if key in kind:
      if dtype == "bfloat16":
        return bf16, f"{device_kind} bf16 {bf16 / 1e12:.0f} TFLOP/s"
      return fp32, f"{device_kind} fp32 ({fp32_name}) {fp32 / 1e12:.0f} TFLOP/s"
  return None, f"n/a (no peak known for {device_kind!r})"


def cost_flops(compiled, lowered) -> tuple[float | None, str]:
  """FLOPs of one step from XLA's cost analysis: compiled's, else lowered's."""
  for name, obj in (("compiled", compiled), ("lowered", lowered)):
    try:
      cost = obj.cost_analysis()
    except Exception:  # pylint: disable=broad-except
      continue
    if isinstance(cost, (list, tuple)):
      cost = cost[0] if cost else None
    if not cost:
      continue
    flops = cost.get("flops")
    if flops is not None and flops > 0 and math.isfinite(flops):
      return float(flops), name
  return None, "n/a (no 'flops' in the cost analysis)"


def device_peak_bytes(device) -> int | None:
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  v = stats.get("peak_bytes_in_use")
  return None if v is None else int(v)


def xla_memory_estimate(compiled) -> int | None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if mem is None:
    return None
  try:
    return int(mem.argument_size_in_bytes + mem.output_size_in_bytes +
               mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  except AttributeError:
    return None


# ---------------------------------------------------------------------------
# Row specifications

# method spec -> (config module, stage or None, (B, μ) override or None, source)
MethodRow = tuple[str, str, str | None, tuple[int, int] | None, str]
METHODS: tuple[MethodRow, ...] = (
    ("r2d2", "r2d2_cifar10_4k", "d2", None, "R2-D2 D2 stage"),
    ("fixmatch", "fixmatch_cifar10", None, None, "FixMatch"),
    ("uda", "uda_cifar10_4k", None, None, "UDA (MPL's teacher settings)"),
    ("mpl:first_order", "mpl_cifar10_4k", "mpl", None, "MPL stage"),
    ("mpl:exact", "mpl_cifar10_4k", "mpl", None, "MPL stage"),
    ("semimeta:first_order", "semimeta_cifar10_4k", None, None, "SemiMeta"),
    ("semimeta:exact", "semimeta_cifar10_4k", None, None, "SemiMeta"),
    ("flexmatch", "flexmatch_cifar10", None, None, "FlexMatch"),
    ("freematch", "freematch_cifar10", None, None, "FreeMatch"),
    ("softmatch", "softmatch_cifar10", None, None, "SoftMatch"),
    ("adamatch", "adamatch_cifar10", None, None, "AdaMatch"),
    ("mixmatch", "mixmatch_cifar10", None, None, "MixMatch"),
    ("mean_teacher", "mean_teacher_cifar10", None, None, "Mean Teacher"),
    ("pi_model", "pi_model_digits", None, (64, 1),
     "USB classic CV CIFAR-10 (64 + 1x64)"),
    ("vat", "vat_cifar10", None, None, "VAT"),
    ("pseudo_label", "pseudo_label_digits", None, (64, 1),
     "USB classic CV CIFAR-10 (64 + 1x64)"),
)
NUM_TRAIN = 50_000  # CIFAR-10's train split.
# Smoke stand-ins (compile in seconds on CPU): WRN-28-2 -> a one-hidden-layer
# MLP; ResNet-50 -> one bottleneck stage of 4 filters, on 32x32 images.
SMOKE_WRN = ("mlp_mnist", {"widths": (16,)})
SMOKE_R50 = ("resnet50", {"stage_sizes": (1,), "num_filters": 4})
IMAGENET_ROWS, IMAGENET_CLASSES = 1_281_167, 1000


def _model_kwargs(**kw) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kw)


def supervised_config(model: str, dataset: str, batch: int, dtype: str,
                      kwargs: dict[str, Any] | None = None):
  c = step_time.common.base_config()
  c.method = "supervised"
  c.model.name = model
  c.model.dtype = dtype
  if kwargs:
    c.model.kwargs = _model_kwargs(**kwargs)
  c.data.dataset = dataset
  c.data.num_labels = -1
  c.data.batch_size = batch
  c.data.eval_batch_size = 8
  c.total_steps = 1000
  c.checkpoint_async = False
  return c


def method_config(spec: str, smoke: bool):
  """A method's CIFAR-10 config, on WRN-28-2 (smoke: `SMOKE_WRN`, B = 2)."""
  method, _, mode = spec.partition(":")
  _, module, stage, batch, _ = next(m for m in METHODS if m[0] == spec)
  src = importlib.import_module(f"configs.{module}").get_config()
  if stage:
    src = train.stage_config(src, stage)
  if module.endswith("_digits"):
    # No CIFAR-10 config: FixMatch's CIFAR-10 data and optimizer, the
    # method's own block.
    c = importlib.import_module("configs.fixmatch_cifar10").get_config()
    c.method = method
    c[method] = src[method]
  else:
    c = src
  c.method = method
  if mode:
    c[method].mode = mode
  if batch:
    c.data.batch_size, c.data.uratio = batch
  if method in ("mpl", "uda") and "schedule" in c.optimizer:
    c.optimizer.schedule.wait_steps = 0  # time the student's real step
  c.model.name = "wrn28_2"
  c.model.dtype = ""
  c.model.kwargs = _model_kwargs()
  c.data.eval_batch_size = 8
  c.checkpoint_async = False
  if smoke:
    c.model.name = SMOKE_WRN[0]
    c.model.kwargs = _model_kwargs(**SMOKE_WRN[1])
    c.data.batch_size = 2
    c.data.num_labels = 40
    c.data.num_val = 0
  return c


def measure_step(c, n_train: int, steps: int) -> dict[str, Any]:
  """Compile, time and profile the trainer's step of config `c`."""
  device = jax.devices()[0]
  mesh = sharding.make_mesh([device])
  arrays = _fake_arrays(c.data.dataset, n_train)
  with tempfile.TemporaryDirectory() as wd:
    pipe = pipeline_lib.InMemoryPipeline(c.data, 0, mesh, arrays=arrays)
    stage = train.Stage(c, wd, mesh=mesh, pipeline=pipe)
    batches = [pipe.global_batch(k, stage.streams) for k in range(2)]
    t0 = time.perf_counter()
    lowered = stage.train_step.lower(stage.abstract_state, batches[0])
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    flops, flops_source = cost_flops(compiled, lowered)
    state = stage.init_state()
    state, m = compiled(state, batches[1])
    jax.block_until_ready((state, m))
    times = []
    for k in range(steps):
      t = time.perf_counter()
      state, m = compiled(state, batches[k % 2])
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t)
    loss = m.get("losses/total") if isinstance(m, dict) else None
    out = {
        "images": int(sum(int(b["image"].shape[0])
                          for b in batches[0].values())),
        "streams": {k: int(b["image"].shape[0]) for k, b in batches[0].items()},
        "image_shape": list(pipe.info.image_shape),
        "compile_s": compile_s,
        "step_ms": statistics.median(times) * 1e3,
        "flops": flops, "flops_source": flops_source,
        "xla_memory_estimate_bytes": xla_memory_estimate(compiled),
        "loss_finite": None if loss is None else bool(
            np.all(np.isfinite(np.asarray(loss)))),
    }
    del state, m, batches, compiled, lowered, stage, pipe
  out["images_per_s"] = out["images"] / (out["step_ms"] / 1e3)
  out["device_peak_bytes"] = device_peak_bytes(device)
  return out


_ARRAYS: dict[tuple[str, int], Any] = {}


def _fake_arrays(dataset: str, n: int):
  key = (dataset, n)
  if key not in _ARRAYS:
    _ARRAYS.clear()
    _ARRAYS[key] = step_time.fake_arrays(dataset, n)
  return _ARRAYS[key]


def measure_table(num_rows: int, num_classes: int, batch: int,
                  steps: int) -> dict[str, Any]:
  """Median ms of `gather_rows` and of `scatter_add_rows` on one device."""
  device = jax.devices()[0]
  mesh = sharding.make_mesh([device])
  rows = table_lib.padded_rows(num_rows, mesh)
  tsh = table_lib.table_sharding(mesh)
  bsh = sharding.batch_sharding(mesh)
  t0 = time.perf_counter()
  tab = jax.jit(lambda: jnp.zeros((rows, num_classes), jnp.float32),
                out_shardings=tsh)()
  jax.block_until_ready(tab)
  alloc_s = time.perf_counter() - t0
  rng = np.random.default_rng(0)
  idx = [jax.device_put(rng.choice(num_rows, batch, replace=False)
                        .astype(np.int32), bsh) for _ in range(2)]
  delta = jax.device_put(rng.standard_normal((batch, num_classes))
                         .astype(np.float32), bsh)
  gather = jax.jit(lambda t, i: table_lib.gather_rows(t, i, mesh))
  scatter = jax.jit(lambda t, i, d: table_lib.scatter_add_rows(t, i, d, mesh),
                    donate_argnums=(0,), out_shardings=tsh)
  t0 = time.perf_counter()
  g = gather.lower(tab, idx[0]).compile()
  s = scatter.lower(tab, idx[0], delta).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(g(tab, idx[1]))
  tab = s(tab, idx[1], delta)
  jax.block_until_ready(tab)
  gt, st = [], []
  for k in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(g(tab, idx[k % 2]))
    gt.append(time.perf_counter() - t)
    t = time.perf_counter()
    tab = s(tab, idx[k % 2], delta)
    jax.block_until_ready(tab)
    st.append(time.perf_counter() - t)
  got = np.asarray(g(tab, idx[0]))
  ok = bool(np.all(np.isfinite(got)))
  table_bytes = rows * num_classes * 4
  del tab
  gather_ms = statistics.median(gt) * 1e3
  scatter_ms = statistics.median(st) * 1e3
  return {"table_rows": num_rows, "padded_rows": rows,
          "classes": num_classes, "batch": batch,
          "table_bytes": table_bytes, "alloc_s": alloc_s,
          "compile_s": compile_s, "gather_ms": gather_ms,
          "scatter_ms": scatter_ms, "step_ms": gather_ms + scatter_ms,
          "rows_finite": ok, "device_peak_bytes": device_peak_bytes(device)}


def synthetic_jpegs(n: int, size: tuple[int, int], quality: int = 90):
  """`n` JPEG byte strings of smooth random pictures (ImageNet-like sizes)."""
  from PIL import Image
  rng = np.random.default_rng(0)
  out = []
  w, h = size
  for _ in range(n):
    small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3),
                         dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    arr = np.asarray(img).astype(np.int16)
    arr = np.clip(arr + rng.integers(-12, 13, arr.shape), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=quality)
    out.append(buf.getvalue())
  return out


def decode_random_resized_crop(data: bytes, out: int, rng) -> np.ndarray:
  """Decode + Inception random-resized crop (area 8-100 %, aspect 3/4-4/3)."""
  from PIL import Image
  img = Image.open(io.BytesIO(data))
  img = img.convert("RGB")
  w, h = img.size
  box = None
  for _ in range(10):
    area = w * h * rng.uniform(0.08, 1.0)
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(math.sqrt(area * aspect)))
    ch = int(round(math.sqrt(area / aspect)))
    if 0 < cw <= w and 0 < ch <= h:
      x0 = int(rng.integers(0, w - cw + 1))
      y0 = int(rng.integers(0, h - ch + 1))
      box = (x0, y0, x0 + cw, y0 + ch)
      break
  if box is None:  # centre crop of the shorter side
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
  return np.asarray(img.resize((out, out), Image.BILINEAR, box=box))


def measure_jpeg(n_images: int, passes: int, size: tuple[int, int],
                 out: int) -> dict[str, Any]:
  try:
    import PIL  # pylint: disable=unused-import
  except ImportError:
    return {"status": "n/a", "reason": (
        "Pillow is not importable (the streamed ImageNet pipeline decodes with "
        "TensorFlow, which this image lacks); bring a Pillow wheel for the "
        "device's Python in .whl/")}
  import PIL as pil  # pylint: disable=reimported
  data = synthetic_jpegs(n_images, size)
  rng = np.random.default_rng(0)
  decode_random_resized_crop(data[0], out, rng)  # warm-up
  w0, c0 = time.perf_counter(), time.process_time()
  count = 0
  for _ in range(passes):
    for d in data:
      x = decode_random_resized_crop(d, out, rng)
      count += 1
  wall, cpu = time.perf_counter() - w0, time.process_time() - c0
  assert x.shape == (out, out, 3), x.shape
  return {"pillow": pil.__version__, "images": count,
          "jpeg_size": list(size), "mean_jpeg_bytes": float(np.mean(
              [len(d) for d in data])), "out_size": out,
          "wall_s": wall, "cpu_s": cpu,
          "images_per_s": count / wall,
          "images_per_s_per_core": count / cpu if cpu > 0 else count / wall}


# ---------------------------------------------------------------------------
# The plan


def plan(smoke: bool) -> list[dict[str, Any]]:
  """The rows, in the order they run (most wanted first)."""
  rows, host_rows = [], [
      dict(row="R2-D2 table 1.28M x 1000" if not smoke else
           "R2-D2 table (smoke 20000 x 100)", kind="table"),
      dict(row="JPEG decode + random-resized crop", kind="jpeg")]
  if smoke:  # the cheap rows first: a short budget still measures them
    rows += host_rows
    wrn = (*SMOKE_WRN, "cifar10", 8)
    r50 = (*SMOKE_R50, "cifar10", 4)
  else:
    wrn = ("wrn28_2", {}, "cifar10", 512)
    r50 = ("resnet50", {}, "imagenet2012", 128)
  for label, (model, kw, dataset, batch) in (("WRN-28-2", wrn),
                                             ("ResNet-50", r50)):
    for dtype in ("bfloat16", ""):
      rows.append(dict(
          row=f"supervised {label} {dtype or 'float32'}", kind="step",
          method="supervised", model=model, dtype=dtype or "float32",
          source=f"supervised, {batch} images",
          build=(lambda m=model, d=dataset, b=batch, t=dtype, k=kw:
                 supervised_config(m, d, b, t, k)),
          n_train=max(2 * batch, 64)))
  if not smoke:
    rows += host_rows
  for spec, module, stage, _, source in METHODS:
    rows.append(dict(
        row=f"{spec} WRN-28-2", kind="step", method=spec,
        model=SMOKE_WRN[0] if smoke else "wrn28_2",
        dtype="float32",
        source=f"configs/{module}.py" + (f" stage {stage}" if stage else "")
        + f" ({source})",
        build=lambda s=spec: method_config(s, smoke),
        n_train=256 if smoke else NUM_TRAIN))
  return rows


FIRST_GUESS_S = {"step": 60.0, "table": 30.0, "jpeg": 20.0}


def estimate(kind: str, costs: dict[str, list[float]], smoke: bool) -> float:
  past = costs.get(kind, [])
  if past:
    return 1.25 * max(past[-2:])
  return 0.0 if smoke else FIRST_GUESS_S[kind]


def run_row(spec: dict[str, Any], args) -> dict[str, Any]:
  kind = spec["kind"]
  if kind == "step":
    c = spec["build"]()
    r = measure_step(c, spec["n_train"], args.steps)
    r["model"] = c.model.name + (
        f" {dict(c.model.kwargs)}" if len(c.model.kwargs) else "")
    r["B"] = int(c.data.batch_size)
    r["mu"] = int(c.data.get("uratio", 0) or 0)
    peak, peak_name = peak_flops(jax.devices()[0].device_kind,
                                 c.model.dtype or "float32")
    r["peak_flops"], r["peak_name"] = peak, peak_name
    r["tflop_per_step"] = None if r["flops"] is None else r["flops"] / 1e12
    r["mfu"] = (None if r["flops"] is None or peak is None else
                r["flops"] / (r["step_ms"] / 1e3) / peak)
    simt = next((v for k, v in FP32_SIMT.items()
                 if k in jax.devices()[0].device_kind.lower()), None)
    if simt and not c.model.dtype and r["flops"] is not None:
      # Against the plain FP32 peak too, in the JSON only (see PEAKS).
      r["mfu_vs_fp32_simt"] = r["flops"] / (r["step_ms"] / 1e3) / simt
    if peak is None:
      r["mfu_reason"] = peak_name
    elif r["flops"] is None:
      r["mfu_reason"] = r["flops_source"]
    return r
  if kind == "table":
    if args.smoke:
      return measure_table(20_000, 100, 64, args.steps)
    return measure_table(IMAGENET_ROWS, IMAGENET_CLASSES, 512, args.steps)
  if kind == "jpeg":
    if args.smoke:
      return measure_jpeg(4, 1, (500, 375), 224)
    return measure_jpeg(64, 3, (500, 375), 224)
  raise ValueError(kind)


def header(args) -> dict[str, Any]:
  d = jax.devices()[0]
  return {"device_kind": d.device_kind, "platform": d.platform,
          "backend": jax.default_backend(), "device_count": jax.device_count(),
          "jax": jax.__version__, "python": platform.python_version(),
          "host_cores": os.cpu_count(), "command": command(),
          "smoke": bool(args.smoke), "budget_s": args.budget_s,
          "steps": args.steps, "wheels_used": WHEELS_USED,
          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def command() -> str:
  return " ".join(["python -m benchmarks.accelerator",
                   *map(shlex.quote, sys.argv[1:])])


def write_json(path: str, head: dict[str, Any], rows: list[dict[str, Any]],
               summary: dict[str, Any] | None = None) -> None:
  body = {"header": head, "rows": rows, "summary": summary or {},
          "elapsed_s": time.perf_counter() - T0}
  tmp = f"{path}.tmp.{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(body, f, indent=1, default=_json_default, allow_nan=False)
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, (np.bool_,)):
    return bool(o)
  return str(o)


def _clean(v):
  """NaN / inf -> None, recursively (strict JSON)."""
  if isinstance(v, float) and not math.isfinite(v):
    return None
  if isinstance(v, dict):
    return {k: _clean(x) for k, x in v.items()}
  if isinstance(v, list):
    return [_clean(x) for x in v]
  return v


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Host cores that feed one device at the fastest ResNet-50 step rate."""
  r50 = [r for r in rows if r["status"] == "ok" and "ResNet-50" in r["row"]]
  jpeg = next((r for r in rows if r["kind"] == "jpeg" and r["status"] == "ok"),
              None)
  out: dict[str, Any] = {}
  if not r50:
    out["cores_per_device_reason"] = "n/a: no ResNet-50 row was measured"
  elif jpeg is None:
    out["cores_per_device_reason"] = "n/a: the JPEG row was not measured"
  else:
    best = max(r50, key=lambda r: r["images_per_s"])
    out["resnet50_row"] = best["row"]
    out["resnet50_images_per_s"] = best["images_per_s"]
    out["jpeg_images_per_s_per_core"] = jpeg["images_per_s_per_core"]
    out["cores_per_device"] = (best["images_per_s"] /
                               jpeg["images_per_s_per_core"])
  return out


# ---------------------------------------------------------------------------
# Markdown


def _f(v, fmt: str, na: str = "n/a") -> str:
  return na if v is None else format(v, fmt)


def _mib(v, fmt: str) -> str:
  return _f(None if v is None else v / MiB, fmt)


def markdown(head: dict[str, Any], rows: list[dict[str, Any]],
             summary: dict[str, Any]) -> str:
  smoke = head["smoke"]
  title = ("## Accelerator benchmark" +
           (" — CPU SMOKE RUN (tiny sizes; not a measurement of the models)"
            if smoke else f" on {head['device_kind']}"))
  lines = [title, "",
           f"Command: `{head['command']}`", "",
           f"Measured: {head['date']}, JAX {head['jax']}, backend "
           f"`{head['backend']}`, device_kind `{head['device_kind']}`, "
           f"{head['host_cores']} host cores, Python {head['python']}; "
           f"median of {head['steps']} timed steps after one warm-up step.",
           ""]
  if smoke:
    lines += ["**Smoke run**: WRN-28-2 is a one-hidden-layer MLP (16 "
              "units), ResNet-50 has one bottleneck stage of 4 filters on "
              "32x32 images, "
              "batches are tiny, the table is 20000 x 100 and 4 JPEGs are "
              "decoded once. The figures only show that every row runs.", ""]
  lines += [
      "Step rows: images = source images per step (labeled B + unlabeled "
      "μB); MFU = XLA cost-analysis FLOPs of the compiled step / step time / "
      "the peak named in the last column (fp32 on NVIDIA: TF32 tensor-core "
      "peak, JAX's default precision). Device peak = "
      "`memory_stats()['peak_bytes_in_use']` after the row (the process's "
      "peak so far); XLA est. = args + out + temp − alias of "
      "`memory_analysis()`.", "",
      "| row | model | dtype | B | μ | images | compile s | step ms | "
      "images/s | GFLOP / step | MFU | device peak MiB | XLA est. MiB | "
      "peak used |",
      "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
      "---: | ---: | ---: | --- |"]
  other = []
  for r in rows:
    if r["kind"] != "step":
      other.append(r)
      continue
    if r["status"] != "ok":
      lines.append(f"| {r['row']} | {r.get('model', '')} | "
                   f"{r.get('dtype', '')} | | | | | {r['status']}: "
                   f"{r.get('reason', '')} | | | | | | |")
      continue
    mfu = ("n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %")
    lines.append(
        f"| {r['row']} | {r['model']} | {r['dtype']} | {r['B']} | {r['mu']} | "
        f"{r['images']} | {r['compile_s']:.1f} | {r['step_ms']:.2f} | "
        f"{r['images_per_s']:,.0f} | "
        f"{_f(r['flops'] and r['flops'] / 1e9, ',.4g')} | "
        f"{mfu} | {_mib(r['device_peak_bytes'], ',.0f')} | "
        f"{_mib(r['xla_memory_estimate_bytes'], ',.1f')} | "
        f"{r['peak_name']} |")
  for r in other:
    lines.append("")
    if r["kind"] == "table":
      if r["status"] != "ok":
        lines.append(f"{r['row']}: {r['status']}: {r.get('reason', '')}")
        continue
      lines += [
          f"{r['row']} (R2-D2's pseudo-label table, float32, one device; "
          f"`table.gather_rows` / `table.scatter_add_rows` of {r['batch']} "
          "random rows, the table donated):", "",
          "| rows | classes | table MiB | batch | gather ms | scatter ms | "
          "compile s | device peak MiB |",
          "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
          f"| {r['table_rows']:,} | {r['classes']} | "
          f"{r['table_bytes'] / MiB:,.0f} | {r['batch']} | "
          f"{r['gather_ms']:.3f} | {r['scatter_ms']:.3f} | "
          f"{r['compile_s']:.1f} | "
          f"{_mib(r['device_peak_bytes'], ',.0f')} |"]
    elif r["kind"] == "jpeg":
      if r["status"] != "ok":
        lines.append(f"{r['row']}: {r['status']}: {r.get('reason', '')}")
        continue
      cores = summary.get("cores_per_device")
      lines += [
          f"{r['row']} on the host (Pillow {r['pillow']}, one thread; "
          f"synthetic {r['jpeg_size'][0]}x{r['jpeg_size'][1]} JPEGs of "
          f"{r['mean_jpeg_bytes'] / 1024:.0f} KiB, quality 90, to "
          f"{r['out_size']}x{r['out_size']}; Pillow stands in for the "
          "TensorFlow decode of the streamed ImageNet pipeline):", "",
          "| images | images/s (wall) | images/s per core (CPU time) | "
          "host cores per device |",
          "| ---: | ---: | ---: | --- |",
          f"| {r['images']} | {r['images_per_s']:,.0f} | "
          f"{r['images_per_s_per_core']:,.0f} | " +
          (f"{cores:,.1f} (at {summary['resnet50_row']}: "
           f"{summary['resnet50_images_per_s']:,.0f} images/s)"
           if cores is not None else
           summary.get("cores_per_device_reason", "n/a")) + " |"]
  return "\n".join(lines)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--budget_s", type=float, default=420.0)
  parser.add_argument("--reserve_s", type=float, default=10.0,
                      help="seconds kept for writing the results")
  parser.add_argument("--steps", type=int, default=0,
                      help="timed steps per row (default 10; smoke 2)")
  parser.add_argument("--smoke", action="store_true",
                      help="every row at tiny sizes (CPU, < 1 minute)")
  parser.add_argument("--rows", nargs="*", default=None,
                      help="only rows whose name contains one of these")
  parser.add_argument("--json", default=None,
                      help="default $OUT/accelerator.json, else /tmp")
  parser.add_argument("--write", action="store_true",
                      help="write the section into --doc")
  parser.add_argument("--doc", default=report.DOC)
  parser.add_argument("--from_json", default=None,
                      help="measure nothing: print (and --write) the table "
                      "of a JSON file an earlier run wrote (e.g. on the "
                      "device machine, whose docs/ does not come back)")
  args = parser.parse_args(argv)
  if args.from_json:
    with open(args.from_json) as f:
      body = json.load(f)
    head = body["header"]
    summary = body.get("summary") or _clean(summarise(body["rows"]))
    md = markdown(head, body["rows"], summary)
    print(md)
    if args.write:
      report.write_section(section_name(head), md, path=args.doc)
      print(f"wrote section {section_name(head)} of {args.doc}")
    return 0
  args.steps = args.steps or (2 if args.smoke else 10)
  if args.json is None:
    out = os.environ.get("OUT") or tempfile.gettempdir()
    args.json = os.path.join(out, "accelerator.json")
  head = header(args)
  print(f"{head['device_kind']} ({head['backend']}), JAX {head['jax']}, "
        f"{head['host_cores']} host cores; budget {args.budget_s:.0f}s; "
        f"json {args.json}" + (f"; wheels {WHEELS_USED}" if WHEELS_USED
                               else ""), flush=True)
  specs = plan(args.smoke)
  if args.rows:
    specs = [s for s in specs if any(w in s["row"] for w in args.rows)]
  rows: list[dict[str, Any]] = []
  costs: dict[str, list[float]] = {}
  write_json(args.json, head, rows)
  run = _Run(args, head, specs, rows)
  # A row that runs past the budget: write what was measured and stop.
  watchdog = threading.Timer(
      max(args.budget_s - (time.perf_counter() - T0), 0.0), run.stop)
  watchdog.daemon = True
  watchdog.start()
  for spec in specs:
    kind = spec["kind"]
    public = _public(spec)
    elapsed = time.perf_counter() - T0
    guess = estimate(kind, costs, args.smoke)
    if elapsed + guess > args.budget_s - args.reserve_s:
      row = {**public, "status": "skipped", "reason": (
          f"budget: {elapsed:.0f}s used, this row estimated {guess:.0f}s, "
          f"budget {args.budget_s:.0f}s")}
      with run.lock:
        rows.append(row)
        write_json(args.json, head, rows)
      print(f"{spec['row']:40s} skipped ({row['reason']})", flush=True)
      continue
    t0 = time.perf_counter()
    try:
      r = run_row(spec, args)
      status = r.pop("status", "ok")
      row = {**public, "status": status, **r}
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      first = str(e).splitlines()[0][:300] if str(e) else ""
      row = {**public, "status": "error",
             "reason": f"{type(e).__name__}: {first}"}
    cost = time.perf_counter() - t0
    row["row_s"] = cost
    costs.setdefault(kind, []).append(cost)
    with run.lock:
      rows.append(_clean(row))
      write_json(args.json, head, rows)
    gc.collect()
    if row["status"] != "ok":
      print(f"{spec['row']:40s} {row['status']}: {row.get('reason')}",
            flush=True)
    elif kind == "step":
      print(f"{spec['row']:40s} {row['images']:5d} img  compile "
            f"{row['compile_s']:6.1f}s  step {row['step_ms']:9.2f}ms  "
            f"{row['images_per_s']:9.0f} img/s  MFU "
            f"{_f(row['mfu'] and 100 * row['mfu'], '.1f')}%  peak "
            f"{_mib(row['device_peak_bytes'], ',.0f')}MiB"
            f"  ({cost:.0f}s)", flush=True)
    elif kind == "table":
      print(f"{spec['row']:40s} gather {row['gather_ms']:.3f}ms  scatter "
            f"{row['scatter_ms']:.3f}ms  ({cost:.0f}s)", flush=True)
    else:
      print(f"{spec['row']:40s} {row['images_per_s_per_core']:.0f} img/s "
            f"per core  ({cost:.0f}s)", flush=True)
  watchdog.cancel()
  with run.lock:
    run.done = True
    finish(args, head, rows)
  return 0


def _public(spec: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in spec.items() if k not in ("build", "n_train")}


class _Run:
  """What the budget watchdog needs to finish a run from its own thread."""

  def __init__(self, args, head, specs, rows):
    self.args, self.head, self.specs, self.rows = args, head, specs, rows
    self.lock = threading.Lock()
    self.done = False

  def stop(self) -> None:
    """The budget ran out inside a row: mark the rest, write, exit."""
    with self.lock:
      if self.done:
        return
      seen = {r["row"] for r in self.rows}
      first = True
      for spec in self.specs:
        if spec["row"] in seen:
          continue
        self.rows.append({**_public(spec), "status": "skipped", "reason": (
            f"budget: {'still running' if first else 'not started'} when "
            f"the {self.args.budget_s:.0f}s budget ran out")})
        first = False
      print(f"budget of {self.args.budget_s:.0f}s reached inside a row: "
            "writing what was measured", flush=True)
      finish(self.args, self.head, self.rows)
      sys.stdout.flush()
      os._exit(0)  # pylint: disable=protected-access


def section_name(head: dict[str, Any]) -> str:
  """The docs/benchmarks.md section of a run: one per device kind, + smoke."""
  if head["smoke"]:
    return f"accelerator_smoke_{head['platform']}"
  return "accelerator_" + "".join(
      ch if ch.isalnum() else "_" for ch in head["device_kind"].lower()
  ).strip("_")


def finish(args, head, rows) -> None:
  """Writes the JSON with its summary, prints (and `--write`s) the table."""
  summary = _clean(summarise(rows))
  write_json(args.json, head, rows, summary)
  md = markdown(head, rows, summary)
  print(md, flush=True)
  if args.write:
    name = section_name(head)
    report.write_section(name, md, path=args.doc)
    print(f"wrote section {name} of {args.doc}", flush=True)
  print(f"wrote {args.json} ({time.perf_counter() - T0:.0f}s)", flush=True)


if __name__ == "__main__":
  sys.exit(main())
