"""Joins the processes of a multi-host run (`jax.distributed`) before jax starts.

`initialize()` must run before anything touches a jax backend (`main.py` calls it
first). It picks one of:

1. Explicit coordinator flags (`--coordinator_address`, `--num_processes`,
   `--process_id`, all three): `jax.distributed.initialize(address, n, id)`.
   Use them where jax cannot detect the cluster (plain ssh, Open MPI 5, a CPU
   test on one machine).
2. A detected multi-process cluster: `jax.distributed.initialize()`, which
   reads the same environment:
   * Open MPI 4 (`mpirun`): `OMPI_COMM_WORLD_SIZE` > 1 and
     `OMPI_MCA_orte_hnp_uri` (the coordinator's address comes from it);
   * SLURM (`srun`): `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`) > 1, with
     `SLURM_JOB_ID`, `SLURM_STEP_NODELIST`, `SLURM_PROCID`, `SLURM_LOCALID`;
   * a Cloud TPU pod slice with several workers (or several slices): on a TPU
     VM, `TPU_PROCESS_ADDRESSES` / `TPU_WORKER_HOSTNAMES` (GKE) or else the
     VM's metadata (`worker-network-endpoints`), times `MEGASCALE_NUM_SLICES`.
     The metadata server is asked only on a TPU VM.
   The order is jax's own (`jax/_src/clusters/__init__.py`), so the cluster
   named in the log is the one jax joins.
3. Otherwise a single process: nothing to do.

Which case applies is decided by `plan()`, a pure function of the flags and the
environment (a mapping), so it is tested with dictionaries.
"""

from __future__ import annotations

import dataclasses
import os
import urllib.request
from typing import Mapping

from absl import logging

from r2d2_jax.errors import R2D2Error

SINGLE = "single"
EXPLICIT = "explicit"
OPENMPI = "openmpi"
SLURM = "slurm"
TPU_POD = "tpu_pod"

# What jax's cluster plugins need to find the coordinator, rank and size.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS",
               "SLURM_PROCID", "SLURM_LOCALID")
_TPU_HOSTNAMES_VARS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
_METADATA_TIMEOUT_S = 10


@dataclasses.dataclass(frozen=True)
class Plan:
  """How this process joins the run.

  Attributes:
    kind: SINGLE, EXPLICIT, OPENMPI, SLURM or TPU_POD.
    description: one line for the log.
    num_processes: the number of processes, where known before joining.
    coordinator_address: 'host:port' (EXPLICIT only; jax finds it otherwise).
    process_id: this process's index (EXPLICIT only).
  """
  kind: str
  description: str
  num_processes: int | None = None
  coordinator_address: str | None = None
  process_id: int | None = None

  @property
  def multi_process(self) -> bool:
    return self.kind != SINGLE


def _int_var(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  if value is None or not str(value).strip():
    return None
  try:
    return int(str(value).strip())
  except ValueError:
    raise R2D2Error(f"Environment variable {name}={value!r} is not an "
                    "integer.") from None


def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise R2D2Error(
        f"--coordinator_address={address!r} is not HOST:PORT (e.g. "
        "10.0.0.2:1234): the address of process 0 and a free port on it.")


def _explicit(coordinator_address: str | None, num_processes: int | None,
              process_id: int | None) -> Plan | None:
  given = {"--coordinator_address": coordinator_address,
           "--num_processes": num_processes, "--process_id": process_id}
  missing = [k for k, v in given.items() if v is None or v == ""]
  if len(missing) == len(given):
    return None
  if missing:
    named = [k for k in given if k not in missing]
    raise R2D2Error(
        f"{', '.join(named)} given without {', '.join(missing)}: a multi-host "
        "run started by hand needs all three flags on every process "
        "(the same --coordinator_address=HOST:PORT of process 0 and "
        "--num_processes, and --process_id=0..num_processes-1), or none of "
        "them to detect the cluster (TPU pod, SLURM, Open MPI).")
  _check_address(coordinator_address)
  if num_processes < 1:
    raise R2D2Error(f"--num_processes={num_processes} must be at least 1.")
  if not 0 <= process_id < num_processes:
    raise R2D2Error(f"--process_id={process_id} must be in 0.."
                    f"{num_processes - 1} (--num_processes={num_processes}).")
  return Plan(EXPLICIT,
              f"coordinator flags: process {process_id} of {num_processes}, "
              f"coordinator {coordinator_address}",
              num_processes=num_processes,
              coordinator_address=coordinator_address, process_id=process_id)


def _openmpi(env: Mapping[str, str]) -> Plan | None:
  size = _int_var(env, "OMPI_COMM_WORLD_SIZE")
  if size is None or size <= 1:
    return None
  if "OMPI_MCA_orte_hnp_uri" not in env:
    raise R2D2Error(
        f"Open MPI started {size} processes (OMPI_COMM_WORLD_SIZE={size}) "
        "but OMPI_MCA_orte_hnp_uri is unset (Open MPI 5 / PRRTE), so jax "
        "cannot find the coordinator. Pass --coordinator_address=HOST:PORT "
        f"(of rank 0), --num_processes={size} and "
        "--process_id=$OMPI_COMM_WORLD_RANK.")
  rank = env.get("OMPI_COMM_WORLD_RANK", "?")
  return Plan(OPENMPI, f"Open MPI: rank {rank} of {size}",
              num_processes=size)


def _slurm(env: Mapping[str, str]) -> Plan | None:
  step_tasks = _int_var(env, "SLURM_STEP_NUM_TASKS")
  tasks = step_tasks if step_tasks is not None else _int_var(
      env, "SLURM_NTASKS")
  if tasks is None or tasks <= 1:
    return None
  missing = [v for v in _SLURM_VARS if v not in env]
  if missing:
    raise R2D2Error(
        f"SLURM allocated {tasks} tasks but {', '.join(missing)} "
        f"{'is' if len(missing) == 1 else 'are'} unset: this process was not "
        "started by srun. Start one process per task with `srun python -m "
        "r2d2_jax.main ...` (see launch/slurm.sbatch), or run a single "
        "process in a job step of one task (`srun --ntasks=1 ...`).")
  return Plan(SLURM,
              f"SLURM job {env['SLURM_JOB_ID']}: task {env['SLURM_PROCID']} "
              f"of {tasks} on {env['SLURM_STEP_NODELIST']}",
              num_processes=tasks)


def tpu_hostnames_from_env(env: Mapping[str, str]) -> list[str] | None:
  """The TPU slice's worker hostnames set in the environment (GKE), if any."""
  for name in _TPU_HOSTNAMES_VARS:
    if env.get(name) is not None:
      return [h for h in env[name].split(",") if h.strip()]
  return None


def _tpu(env: Mapping[str, str], tpu_vm: bool,
         tpu_metadata_workers: int | None) -> Plan | None:
  if not tpu_vm:
    return None
  hostnames = tpu_hostnames_from_env(env)
  workers = len(hostnames) if hostnames is not None else tpu_metadata_workers
  slices = _int_var(env, "MEGASCALE_NUM_SLICES") or 1
  total = (workers or 1) * slices
  if total <= 1:
    return None
  where = "TPU_WORKER_HOSTNAMES" if hostnames is not None else "metadata"
  return Plan(TPU_POD,
              f"Cloud TPU pod: {workers or 1} worker(s) per slice ({where}) x "
              f"{slices} slice(s)", num_processes=total)


def plan(env: Mapping[str, str], coordinator_address: str | None = None,
         num_processes: int | None = None, process_id: int | None = None,
         tpu_vm: bool = False, tpu_metadata_workers: int | None = None) -> Plan:
  """Decides how this process joins the run (pure: no I/O, no jax).

  Args:
    env: the environment variables (`os.environ` or a test's dict).
    coordinator_address: --coordinator_address ('host:port' of process 0).
    num_processes: --num_processes.
    process_id: --process_id.
    tpu_vm: whether this machine is a Cloud TPU VM (TPU chips attached).
    tpu_metadata_workers: on a TPU VM, the number of workers in its slice as
      the metadata server lists them (None: not asked or unknown).

  Returns:
    The `Plan`.

  Raises:
    R2D2Error: only some of the three flags, bad flag values, or a cluster
      that started several processes but lacks what jax needs to join them.
  """
  explicit = _explicit(coordinator_address, num_processes, process_id)
  if explicit is not None:
    return explicit
  for detect in (_openmpi, _slurm):
    found = detect(env)
    if found is not None:
      return found
  found = _tpu(env, tpu_vm, tpu_metadata_workers)
  if found is not None:
    return found
  return Plan(SINGLE, "single process (no coordinator flags, no multi-process "
              "cluster detected)", num_processes=1)


def _on_cloud_tpu_vm() -> bool:
  """Whether TPU chips are attached (as `import jax` itself decides)."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  except ImportError:
    return False
  return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _tpu_workers_from_metadata(env: Mapping[str, str]) -> int | None:
  """Workers of this TPU VM's slice, from the GCE metadata server (TPU VMs only)."""
  host = env.get("GCE_METADATA_IP", "metadata.google.internal")
  url = (f"http://{host}/computeMetadata/v1/instance/attributes/"
         "worker-network-endpoints")
  request = urllib.request.Request(url, headers={"Metadata-Flavor": "Google"})
  try:
    with urllib.request.urlopen(request, timeout=_METADATA_TIMEOUT_S) as r:
      text = r.read().decode()
  except OSError as e:
    logging.warning("Could not read the TPU worker list from the metadata "
                    "server (%s); assuming a single-host TPU VM.", e)
    return None
  return len([w for w in text.split(",") if w.strip()])


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> Plan:
  """Joins the multi-process run if there is one; call before any other jax use.

  Args:
    coordinator_address: 'host:port' of process 0 (with the other two flags).
    num_processes: how many processes the run has.
    process_id: this process's index, 0..num_processes-1.

  Returns:
    The `Plan` that applied.

  Raises:
    R2D2Error: see `plan`.
  """
  import jax  # pylint: disable=g-import-not-at-top

  env = os.environ
  explicit = coordinator_address or num_processes is not None or (
      process_id is not None)
  tpu_vm = False if explicit else _on_cloud_tpu_vm()
  metadata_workers = None
  if (tpu_vm and tpu_hostnames_from_env(env) is None and
      env.get("TPU_SKIP_MDS_QUERY") is None):
    metadata_workers = _tpu_workers_from_metadata(env)
  p = plan(env, coordinator_address, num_processes, process_id,
           tpu_vm=tpu_vm, tpu_metadata_workers=metadata_workers)
  if jax.distributed.is_initialized():
    logging.info("jax.distributed is already initialized (%d processes); "
                 "not joining again.", jax.process_count())
    return p
  logging.info("Multi-host: %s.", p.description)
  if p.kind == SINGLE:
    return p
  try:
    if p.kind == EXPLICIT:
      jax.distributed.initialize(p.coordinator_address, p.num_processes,
                                 p.process_id)
    else:
      jax.distributed.initialize()
  except (RuntimeError, ValueError) as e:
    raise R2D2Error(f"Could not join the multi-host run ({p.description}): "
                    f"{e}") from e
  logging.info("Joined as process %d of %d (%d local devices, %d in all).",
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return p
