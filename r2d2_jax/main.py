"""Command line: `python -m r2d2_jax.main --config configs/NAME.py[:variant] --workdir DIR`.

Any config field can be overridden, e.g. `--config.optimizer.lr=0.1`. This is
the only module that defines flags; the work is `train.train_and_evaluate`.

Multi-host: every process runs the same command. On a Cloud TPU pod, under
SLURM's `srun` or Open MPI's `mpirun` the processes find each other by
themselves; elsewhere pass `--coordinator_address`, `--num_processes` and
`--process_id` (see `r2d2_jax.distributed`). Only process 0 logs at INFO and
prints results.
"""

import difflib
import importlib.util
import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/NAME.py[:variant]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where checkpoints and summaries go; rerun to resume. A "
    "local folder or gs://BUCKET/PATH (needs `pip install 'r2d2_jax[gcs]'`).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None,
    "Multi-host runs started by hand: HOST:PORT of process 0 (with "
    "--num_processes and --process_id). Not needed on TPU pods, SLURM or "
    "Open MPI, where it is detected.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Multi-host runs started by hand: how many "
    "processes (with --coordinator_address and --process_id).", lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "Multi-host runs started by hand: this process's "
    "index, 0..num_processes-1.", lower_bound=0)
flags.mark_flags_as_required(["config", "workdir"])


class _QuietLibraries(pylogging.Filter):
  """Drops library chatter that says nothing about the run; keeps the rest.

  Dropped: the INFO lines of orbax and tensorflow_datasets; orbax's warnings
  that a checkpoint opened read-only (the previous stage's, on purpose) is
  read-only; and jax's INFO line for each accelerator backend it probed and
  did not find (e.g. "Unable to initialize backend 'tpu'" on a CPU machine).
  jax's warnings (e.g. "An NVIDIA GPU may be present on this machine, but a
  CUDA-enabled jaxlib is not installed") and every error are kept, and the
  backend jax chose is logged by `main`.
  """

  def filter(self, record: pylogging.LogRecord) -> bool:
    path = record.pathname.replace(os.sep, "/")
    if record.levelno >= pylogging.ERROR:
      return True
    if (path.endswith("/orbax/checkpoint/checkpoint_manager.py") and
        "read only" in record.getMessage().replace("_", " ")):
      return False  # read_only=True, as asked
    if record.levelno >= pylogging.WARNING:
      return True
    if path.endswith("/jax/_src/xla_bridge.py"):
      return not record.getMessage().startswith("Unable to initialize backend")
    return not any(f"/{lib}/" in path
                   for lib in ("orbax", "tensorflow_datasets"))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so `--help` is fast and flags parse before jax starts.
  from r2d2_jax import distributed  # pylint: disable=g-import-not-at-top
  from r2d2_jax.errors import R2D2Error  # pylint: disable=g-import-not-at-top

  try:
    # Before anything else touches jax: joining a multi-host run must come
    # before the backend starts.
    distributed.initialize(_COORDINATOR_ADDRESS.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
  except R2D2Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() > 0:
    logging.set_verbosity(logging.WARNING)  # process 0 speaks for the run
  from r2d2_jax import train  # pylint: disable=g-import-not-at-top

  logging.info("JAX %s, %d processes, %d devices (%s).", jax.__version__,
               jax.process_count(), jax.device_count(), jax.default_backend())
  from r2d2_jax.errors import Preempted  # pylint: disable=g-import-not-at-top
  try:
    results = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Preempted as e:
    # SIGTERM: a checkpoint was saved at e.step; the same command resumes.
    if jax.process_index() == 0:
      print(str(e), file=sys.stderr)
    sys.exit(143)
  except R2D2Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if jax.process_index() == 0:
    print("Final results:", json.dumps(results, indent=1, sort_keys=True))
    print(summary(results))


SUMMARY_COLUMNS = ("test/raw", "test/ema", "val/raw", "val/ema")


def summary(results: dict) -> str:
  """A table of the final top-1 accuracy per stage (or for the single run).

  Columns: accuracy/test/raw, accuracy/test/ema, accuracy/val/raw,
  accuracy/val/ema; '-' where a run has no such figure (no validation set:
  data.num_val=0). Final values only: benchmarks/results.py gives the
  figures chosen on the validation set.
  """
  rows = results if results and all(
      isinstance(v, dict) for v in results.values()) else {"run": results}
  lines = [f"{'final top-1':12s} " +
           " ".join(f"{c:>9s}" for c in SUMMARY_COLUMNS)]
  for name, r in rows.items():
    cells = [r.get(f"accuracy/{c}") for c in SUMMARY_COLUMNS]
    lines.append(f"{name:12s} " + " ".join(
        f"{'-':>9s}" if v is None else f"{v:9.4f}" for v in cells))
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Overrides checked before anything runs


def parse_overrides(argv: list[str]) -> tuple[str | None, dict[str, str]]:
  """The --config file and its --config.KEY overrides {dotted key: value}."""
  path, overrides = None, {}
  for i, arg in enumerate(argv[1:], start=1):
    name = arg.lstrip("-").partition("=")[0] if arg.startswith("--") else ""
    value = arg.partition("=")[2] if "=" in arg else (
        argv[i + 1] if i + 1 < len(argv) else "")
    if name == "config":
      path = value or None
    elif name.startswith("config."):
      overrides[name[len("config."):]] = value
  return path, overrides


def _leaf_keys(d, prefix: str = "") -> list[str]:
  out = []
  for k, v in d.items():
    out.append(prefix + k)
    if isinstance(v, dict):
      out += _leaf_keys(v, f"{prefix}{k}.")
  return out


def override_error(config, key: str) -> str | None:
  """Why `--config.KEY=...` cannot do what it says, or None if it can.

  Two cases: the key is not in the config (the message lists the nearest valid
  keys), or the config is staged and every stage that runs sets the key itself
  in `config.stages.NAME`, so the top-level value is never read (the message
  names those stage fields).
  """
  d = config.to_dict()
  node, parts = d, key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, dict) or part not in node:
      valid = _leaf_keys(d)
      near = difflib.get_close_matches(key, valid, n=5, cutoff=0.6)
      here = ".".join(parts[:i])
      siblings = (sorted(node) if isinstance(node, dict) else [])
      return (f"--config.{key}: this config has no field {key!r}"
              + (f" (config.{here} has {siblings})" if here and siblings
                 else "")
              + (". Nearest valid keys: " + ", ".join(f"--config.{k}"
                                                      for k in near)
                 if near else ". Its top-level fields are " + ", ".join(
                     sorted(d)))
              + ". Fix the key; no run was started.")
    node = node[part]
  stages = d.get("stages")
  if not stages or parts[0] in ("stages", "stage_order", "run_stages"):
    return None
  order = list(d.get("stage_order") or stages)
  chosen = [s.strip() for s in (d.get("run_stages") or "").split(",")
            if s.strip()] or order
  setters = []
  for name in (s for s in order if s in chosen and s in stages):
    node, hit = stages[name], None
    for j, part in enumerate(parts):
      if not isinstance(node, dict) or part not in node:
        break
      node = node[part]
      if not isinstance(node, dict) or j == len(parts) - 1:
        hit = "stages." + name + "." + ".".join(parts[:j + 1])
        break
    if hit is None:
      return None        # this stage reads the top-level value
    setters.append(hit)
  shown = ", ".join(f"config.{s}" for s in setters[:6]) + (
      ", ..." if len(setters) > 6 else "")
  return (f"--config.{key}: no stage of this config reads it; every stage that "
          f"runs sets its own ({shown}). Override the stage you mean, e.g. "
          f"--config.{setters[0]}=..., or choose stages with "
          "--config.run_stages. No run was started.")


def _load_config(path: str):
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    return None
  spec = importlib.util.spec_from_file_location("_override_check", file)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or None) if arg else mod.get_config()


def check_overrides(argv: list[str]) -> str | None:
  """The first override error of this command line (`override_error`), if any."""
  path, overrides = parse_overrides(argv)
  if not path or not overrides:
    return None
  config = _load_config(path)
  if config is None:
    return None          # config_flags reports a missing file itself
  if "run_stages" in overrides and "run_stages" in config:
    config.run_stages = overrides["run_stages"]   # which stages run decides
  for key in overrides:
    error = override_error(config, key)
    if error:
      return error
  return None


def run():
  error = check_overrides(sys.argv)
  if error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  app.run(main)


if __name__ == "__main__":
  run()
