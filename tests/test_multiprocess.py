"""Multi-host: cluster detection, and 2 processes x 2 CPU devices = 1 x 4.

The end-to-end test starts real processes (`tests/multiprocess_worker.py`)
joined by `jax.distributed` through a coordinator on 127.0.0.1, with
cross-process CPU collectives (gloo), and checks that supervised, R2-D2 (its
table sharded over the 4 devices of both processes) and MPL end where one
process with 4 devices ends, through orbax checkpoints written by both
processes and, for supervised, a resume.
"""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from r2d2_jax import distributed
from r2d2_jax.errors import R2D2Error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("supervised", "r2d2", "mpl")
TIMEOUT_S = 600

# ---------------------------------------------------------------------------
# Detection, on fake environments

SLURM_STEP = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "node[001-002]",
              "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
              "SLURM_PROCID": "3", "SLURM_LOCALID": "3"}
OMPI = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "1",
        "OMPI_COMM_WORLD_LOCAL_RANK": "1",
        "OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.0.0.1:5000"}


def test_single_process_by_default():
  p = distributed.plan({})
  assert p.kind == distributed.SINGLE and not p.multi_process
  # One task, one rank, one TPU worker: still a single process.
  assert distributed.plan({"SLURM_NTASKS": "1"}).kind == distributed.SINGLE
  assert distributed.plan({"OMPI_COMM_WORLD_SIZE": "1"}).kind == (
      distributed.SINGLE)
  assert distributed.plan({}, tpu_vm=True, tpu_metadata_workers=1).kind == (
      distributed.SINGLE)
  # An srun step of one task inside an 8-task allocation.
  env = dict(SLURM_STEP, SLURM_STEP_NUM_TASKS="1")
  assert distributed.plan(env).kind == distributed.SINGLE


def test_explicit_flags():
  p = distributed.plan({}, "10.0.0.2:1234", 4, 3)
  assert p.kind == distributed.EXPLICIT and p.multi_process
  assert (p.coordinator_address, p.num_processes, p.process_id) == (
      "10.0.0.2:1234", 4, 3)
  # Flags win over a detected cluster.
  assert distributed.plan(SLURM_STEP, "h:1", 2, 0).kind == distributed.EXPLICIT


@pytest.mark.parametrize("flags,match", [
    ((None, None, 1), "--process_id given without --coordinator_address, "
     "--num_processes"),
    (("h:1", 2, None), "--coordinator_address, --num_processes given without "
     "--process_id"),
    (("h:1", None, None), "without --num_processes, --process_id"),
    (("h", 2, 0), "is not HOST:PORT"),
    (("h:99999", 2, 0), "is not HOST:PORT"),
    (("h:1", 2, 2), r"--process_id=2 must be in 0..1"),
    (("h:1", 0, 0), "--num_processes=0 must be at least 1"),
])
def test_bad_flag_combinations(flags, match):
  with pytest.raises(R2D2Error, match=match):
    distributed.plan({}, *flags)


def test_slurm():
  p = distributed.plan(SLURM_STEP)
  assert p.kind == distributed.SLURM and p.num_processes == 8
  assert "task 3 of 8" in p.description
  # Without SLURM_STEP_NUM_TASKS, SLURM_NTASKS counts.
  env = {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NUM_TASKS"}
  assert distributed.plan(env).num_processes == 8
  # The batch script itself (no srun): several tasks but no step variables.
  with pytest.raises(R2D2Error, match="not started by srun"):
    distributed.plan({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "8"})
  with pytest.raises(R2D2Error, match="not an integer"):
    distributed.plan({"SLURM_NTASKS": "eight"})


def test_open_mpi():
  p = distributed.plan(OMPI)
  assert p.kind == distributed.OPENMPI and p.num_processes == 4
  # mpirun inside a SLURM allocation: Open MPI first, as jax checks it first.
  assert distributed.plan({**SLURM_STEP, **OMPI}).kind == distributed.OPENMPI
  # Open MPI 5 has no ORTE URI: jax cannot find the coordinator by itself.
  env = {k: v for k, v in OMPI.items() if k != "OMPI_MCA_orte_hnp_uri"}
  with pytest.raises(R2D2Error, match="--coordinator_address"):
    distributed.plan(env)


def test_tpu_pod():
  hosts = {"TPU_WORKER_HOSTNAMES": "t-w-0,t-w-1,t-w-2,t-w-3",
           "TPU_WORKER_ID": "2"}
  # Not a TPU VM: TPU variables alone do not make a cluster.
  assert distributed.plan(hosts).kind == distributed.SINGLE
  p = distributed.plan(hosts, tpu_vm=True)
  assert p.kind == distributed.TPU_POD and p.num_processes == 4
  # GCE TPU VMs list their workers in the metadata, not the environment.
  p = distributed.plan({}, tpu_vm=True, tpu_metadata_workers=8)
  assert p.kind == distributed.TPU_POD and p.num_processes == 8
  # Multislice: one worker per slice, two slices.
  p = distributed.plan({"TPU_WORKER_HOSTNAMES": "a", "MEGASCALE_NUM_SLICES":
                        "2"}, tpu_vm=True)
  assert p.kind == distributed.TPU_POD and p.num_processes == 2
  assert distributed.plan({"TPU_WORKER_HOSTNAMES": "a"}, tpu_vm=True).kind == (
      distributed.SINGLE)


def test_cli_rejects_partial_flags(tmp_path):
  env = dict(_clean_env(), XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "-m", "r2d2_jax.main", "--config",
       "configs/digits_quickstart.py", "--workdir", str(tmp_path / "wd"),
       "--process_id=1"], cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "error: --process_id given without --coordinator_address" in r.stderr
  assert "Traceback" not in r.stderr
  assert not os.path.exists(tmp_path / "wd")


# ---------------------------------------------------------------------------
# 2 processes x 2 devices against 1 process x 4 devices


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env() -> dict:
  """This environment without cluster variables (the test may run under one)."""
  prefixes = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TPU_", "MEGASCALE_",
              "JAX_COORDINATOR", "JAX_LOCAL_DEVICE_IDS")
  return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _start(out, name, devices, cache_dir, *flags):
  env = dict(_clean_env(), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices}"
                        " --xla_backend_optimization_level=0"
                        " --xla_llvm_disable_expensive_passes=true"))
  os.makedirs(out, exist_ok=True)
  log = open(os.path.join(out, f"{name}.log"), "w")
  cmd = [sys.executable, "-m", "tests.multiprocess_worker", "--out", out,
         "--methods", ",".join(METHODS), "--cache_dir", cache_dir,
         *map(str, flags)]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT), log


def _wait(procs, deadline):
  """Waits for all; on a failure or the deadline, kills the rest."""
  failed = None
  for p, log in procs:
    try:
      rc = p.wait(timeout=max(deadline - time.time(), 1))
    except subprocess.TimeoutExpired:
      rc = "timeout"
    log.close()
    if rc != 0 and failed is None:
      failed = (rc, log.name)
      for q, _ in procs:
        if q.poll() is None:
          q.kill()
  if failed:
    rc, name = failed
    with open(name) as f:
      tail = f.read()[-5000:]
    pytest.fail(f"worker exited with {rc}; {name}:\n{tail}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs 2 x 2 and 1 x 4 side by side; returns their output folders."""
  base = tmp_path_factory.mktemp("multiprocess")
  multi, single = str(base / "two_processes"), str(base / "one_process")
  # Each stage (and the resumed one) compiles its steps anew: a persistent
  # cache turns the repeats into loads, and a kept R2D2_TEST_JAX_CACHE the
  # next session's compiles too.
  cache = os.environ.get("R2D2_TEST_JAX_CACHE") or str(base / "jax_cache")
  address = f"127.0.0.1:{_free_port()}"
  t0 = time.time()
  procs = [_start(multi, f"process{i}", 2, cache, "--coordinator_address",
                  address, "--num_processes", 2, "--process_id", i)
           for i in (0, 1)]
  procs.append(_start(single, "process0", 4, cache))
  _wait(procs, t0 + TIMEOUT_S)
  print(f"multi-process runs took {time.time() - t0:.1f}s")
  return multi, single


def _load(out, method):
  error = os.path.join(out, f"{method}.error.0")
  if os.path.exists(error):
    with open(error) as f:
      pytest.fail(f"{method} failed in {out}:\n{f.read()[-4000:]}")
  with open(os.path.join(out, f"{method}.json")) as f:
    record = json.load(f)
  with np.load(os.path.join(out, f"{method}.npz")) as z:
    return record, dict(z)


@pytest.mark.parametrize("method", [
    "supervised", "r2d2", "mpl"])
def test_two_processes_equal_one(runs, method):
  multi, single = runs
  rec_m, state_m = _load(multi, method)
  rec_s, state_s = _load(single, method)
  assert (rec_m["process_count"], rec_m["local_device_count"],
          rec_m["device_count"]) == (2, 2, 4)
  assert (rec_s["process_count"], rec_s["device_count"]) == (1, 4)
  assert not rec_m["fully_addressable"] and rec_s["fully_addressable"]
  assert rec_m["step"] == rec_s["step"] == 4
  # Only process 0 writes summaries (one events file per run of the stage).
  assert len(rec_m["events_files"]) == len(rec_s["events_files"])
  assert sorted(state_m) == sorted(state_s)
  for k in sorted(state_s):
    np.testing.assert_allclose(state_m[k], state_s[k], rtol=1e-5, atol=1e-6,
                               err_msg=f"{method}: {k}")
  assert rec_m["results"].keys() == rec_s["results"].keys()
  for k, v in rec_s["results"].items():
    np.testing.assert_allclose(rec_m["results"][k], v, rtol=1e-5, atol=1e-6,
                               err_msg=f"{method}: {k}")
  different = [k for k in state_s if not np.array_equal(state_m[k], state_s[k])]
  print(f"{method}: {len(state_s) - len(different)}/{len(state_s)} leaves "
        f"bitwise equal; different: {different}")


def test_r2d2_table_sharded_and_repredicted(runs):
  multi, _ = runs
  rec, state = _load(multi, "r2d2")
  assert rec["sharded_leaves"] == 2  # the table and its learnable mask
  table, learnable = state["table"], state["learnable"]
  assert table.shape == (1440, 10)  # 1437 digits, padded to split over 4
  # Reprediction wrote every learnable row, not only the few steps' batches.
  rows = np.flatnonzero(learnable > 0)
  assert np.all(np.abs(table[rows]).sum(-1) > 0)
