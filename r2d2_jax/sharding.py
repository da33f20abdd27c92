"""One `('data',)` mesh over every device of every process, and global batches on it.

Batches are sharded along their leading axis; train state is replicated except
where a method asks otherwise (R2-D2's pseudo-label table is sharded along its
example axis).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from r2d2_jax.errors import R2D2Error

DATA = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the 1-D data-parallel mesh.

  Args:
    devices: devices to use (default: all devices of all processes).

  Returns:
    A `Mesh` with one axis named 'data', in Auto mode (plain data parallelism;
    the compiler propagates shardings).
  """
  devices = list(jax.devices() if devices is None else devices)
  return jax.make_mesh((len(devices),), (DATA,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def check_batch_size(name: str, batch_size: int, mesh: Mesh) -> None:
  """Raises a readable error unless `batch_size` splits evenly over the mesh."""
  n = mesh.devices.size
  if batch_size % n:
    raise R2D2Error(
        f"{name}={batch_size} is not divisible by the number of devices ({n}). "
        f"Choose a multiple of {n}, e.g. {max(n, batch_size // n * n)}.")


def process_slice(global_size: int, mesh: Mesh) -> slice:
  """The rows of a global batch that this process feeds.

  Each process owns the contiguous block of rows that lands on its addressable
  devices, so it reads only its share of the data.
  """
  sharding = batch_sharding(mesh)
  idx = sharding.addressable_devices_indices_map((global_size,))
  starts = sorted({s[0].start or 0 for s in idx.values()})
  stops = sorted({s[0].stop if s[0].stop is not None else global_size
                  for s in idx.values()})
  return slice(starts[0], stops[-1])


def to_global(tree: Any, mesh: Mesh) -> Any:
  """Turns this process's share of a batch (numpy) into global sharded arrays.

  Args:
    tree: pytree of host arrays, each holding this process's rows.
    mesh: the mesh.

  Returns:
    The same pytree of `jax.Array`s sharded along 'data'.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      tree)
