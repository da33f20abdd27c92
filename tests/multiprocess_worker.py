"""One process of a multi-process CPU run, started by tests/test_multiprocess.py.

  python -m tests.multiprocess_worker --out DIR --methods supervised,r2d2,mpl \
      [--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I]

The parent sets XLA_FLAGS (fake CPU devices per process) and JAX_PLATFORMS=cpu.
The process joins the run through `r2d2_jax.distributed.initialize` (as
`main.py` does), then trains each method for a few steps with
`train.train_and_evaluate` in `DIR/METHOD` (a workdir shared by all processes)
and reads the final state back from the orbax checkpoint twice: as host arrays
(`checkpoint.restore_raw`) and onto the stage's global shardings
(`Checkpointer.restore`, then `process_allgather`). Process 0 writes
`DIR/METHOD.npz` (every leaf of the state, by path) and `DIR/METHOD.json`
(final metrics and what the run looked like).
"""

import argparse
import json
import os
import sys
import time
import traceback

import ml_collections
import numpy as np

from configs import common
from r2d2_jax import distributed
from tests import helpers


def supervised_config() -> ml_collections.ConfigDict:
  return helpers.tiny_config("supervised")


def r2d2_config() -> ml_collections.ConfigDict:
  c = helpers.tiny_config("r2d2")
  common.r2d2_block(c)
  c.data.uratio = 3
  # Repredict before step 3 (the unlabeled epoch is ~29 steps of 48): the
  # hook's eval pass over the train split and its table writes run too.
  c.r2d2.repredict_epochs = (0.07,)
  return c


CONFIGS = {"supervised": supervised_config, "r2d2": r2d2_config,
           "mpl": helpers.tiny_mpl_config}


def _flat(tree) -> dict[str, np.ndarray]:
  """{'params/conv1/kernel': array, ...}: the same names for a state dataclass
  and for the nested dicts `restore_raw` returns."""
  import jax  # pylint: disable=g-import-not-at-top

  def name(entry):
    for attr in ("key", "name", "idx"):
      if hasattr(entry, attr):
        return str(getattr(entry, attr))
    return str(entry)
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(name(e) for e in path): np.asarray(leaf)
          for path, leaf in leaves}


def run_method(name: str, out: str) -> None:
  """Trains `name` (resuming once, for supervised) and writes its final state."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from r2d2_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from r2d2_jax import train  # pylint: disable=g-import-not-at-top

  config = CONFIGS[name]()
  workdir = os.path.join(out, name)
  t0 = time.time()
  if name == "supervised":
    # Stop after the step-2 checkpoint, as if killed, then resume to the end:
    # every process restores its shards from the same orbax checkpoint.
    stage = train.Stage(config, workdir)
    stage.total_steps = 2
    stage.run()
    del stage
  results = train.train_and_evaluate(config, workdir)

  # The final checkpoint, read back two ways.
  raw, meta = ckpt_lib.restore_raw(workdir)
  stage = train.Stage(config, workdir)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored, _ = ckpt.restore(ckpt.latest_step(), stage.abstract_state)
  ckpt.close()
  global_leaves = jax.tree.leaves(restored)
  gathered = multihost_utils.process_allgather(restored, tiled=True)
  flat_raw, flat_gathered = _flat(raw), _flat(gathered)
  assert flat_raw.keys() == flat_gathered.keys(), (flat_raw.keys(),
                                                   flat_gathered.keys())
  for k, v in flat_raw.items():
    np.testing.assert_array_equal(v, flat_gathered[k], err_msg=k)

  if jax.process_index() == 0:
    np.savez(os.path.join(out, f"{name}.npz"), **flat_raw)
    record = dict(
        results=results, step=meta["step"], seconds=time.time() - t0,
        process_count=jax.process_count(), device_count=jax.device_count(),
        local_device_count=jax.local_device_count(),
        sharded_leaves=sum(not x.is_fully_replicated for x in global_leaves),
        fully_addressable=all(x.is_fully_addressable for x in global_leaves),
        events_files=sorted(f for f in os.listdir(workdir)
                            if f.startswith("events.out.tfevents")))
    with open(os.path.join(out, f"{name}.json"), "w") as f:
      json.dump(record, f, indent=1, sort_keys=True)
  multihost_utils.sync_global_devices(f"done {name}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--methods", default="supervised,r2d2,mpl")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--cache_dir")
  args = parser.parse_args(argv)

  plan = distributed.initialize(args.coordinator_address, args.num_processes,
                                args.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  if args.cache_dir:
    jax.config.update("jax_compilation_cache_dir", args.cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  print(f"process {jax.process_index()}/{jax.process_count()}: {plan.kind}, "
        f"{jax.local_device_count()} of {jax.device_count()} devices, CPU "
        f"collectives {jax.config.jax_cpu_collectives_implementation}",
        flush=True)
  for name in args.methods.split(","):
    # A method that fails on every process (e.g. at trace time) is reported
    # in DIR/METHOD.error and the others still run.
    try:
      run_method(name, args.out)
    except Exception:  # pylint: disable=broad-except
      with open(os.path.join(args.out, f"{name}.error.{jax.process_index()}"),
                "w") as f:
        f.write(traceback.format_exc())
      traceback.print_exc()
  print(f"process {jax.process_index()}: done", flush=True)
  sys.stdout.flush()


if __name__ == "__main__":
  main()
