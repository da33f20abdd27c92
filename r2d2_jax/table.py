"""A per-example table sharded along its example axis, read and written inside jit.

R2-D2's pseudo-label table has one row of logits per training image: for
ImageNet 1.28M x 1000 float32, about 5 GB, too big to replicate. It is sharded
row-wise over the `('data',)` mesh (`P('data', None)`), and a step touches only
the rows of its batch:

* `gather_rows`: every device learns the batch's indices (an all-gather of B
  ints), reads the rows it owns (zeros elsewhere) and a reduce-scatter hands
  each device the rows of its own batch shard. Adding zeros is exact, so the
  result equals `table[idx]` bit for bit.
* `scatter_add_rows`: the batch's indices and row updates are all-gathered
  (B x C floats) and each device adds those that fall in its rows.

Communication per step is O(B x C), never O(N x C). The same code runs on one
device, where the collectives are no-ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from r2d2_jax.sharding import DATA

TABLE_SPEC = P(DATA, None)
ROW_SPEC = P(DATA)


def padded_rows(num_rows: int, mesh: Mesh) -> int:
  """Rows of a table holding `num_rows`, rounded up to split over the mesh."""
  n = mesh.devices.size
  return -(-num_rows // n) * n


def table_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, TABLE_SPEC)


def _owned(idx: jax.Array, rows_per_device: int):
  first = jax.lax.axis_index(DATA) * rows_per_device
  local = idx - first
  own = (local >= 0) & (local < rows_per_device)
  return own, jnp.clip(local, 0, rows_per_device - 1)


def gather_rows(table: jax.Array, idx: jax.Array, mesh: Mesh) -> jax.Array:
  """`table[idx]` for a row-sharded table and a batch-sharded `idx`.

  Args:
    table: [N, C] (or [N]) sharded `P('data', ...)`.
    idx: [B] int row indices, sharded `P('data')`.
    mesh: the mesh.

  Returns:
    [B, C] (or [B]) rows, sharded like the batch.
  """
  vector = table.ndim == 1

  def local(tab, ix):
    all_ix = jax.lax.all_gather(ix, DATA, tiled=True)
    own, loc = _owned(all_ix, tab.shape[0])
    rows = tab[loc]
    mask = own if vector else own[:, None]
    rows = jnp.where(mask, rows, jnp.zeros_like(rows))
    return jax.lax.psum_scatter(rows, DATA, scatter_dimension=0, tiled=True)

  spec = ROW_SPEC if vector else TABLE_SPEC
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, ROW_SPEC),
                       out_specs=spec)(table, idx)


def scatter_add_rows(table: jax.Array, idx: jax.Array, delta: jax.Array,
                     mesh: Mesh) -> jax.Array:
  """`table.at[idx].add(delta)` for a row-sharded table; duplicates accumulate.

  Args:
    table: [N, C] sharded `P('data', None)`.
    idx: [B] int row indices, sharded `P('data')`.
    delta: [B, C] row updates, sharded `P('data', None)`.
    mesh: the mesh.

  Returns:
    The updated table, sharded as before.
  """

  def local(tab, ix, d):
    all_ix = jax.lax.all_gather(ix, DATA, tiled=True)
    all_d = jax.lax.all_gather(d, DATA, tiled=True)
    own, loc = _owned(all_ix, tab.shape[0])
    # Rows owned elsewhere go out of bounds and are dropped.
    loc = jnp.where(own, loc, tab.shape[0])
    return tab.at[loc].add(all_d, mode="drop")

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(TABLE_SPEC, ROW_SPEC, TABLE_SPEC),
                       out_specs=TABLE_SPEC)(table, idx, delta)


def set_rows(table: jax.Array, idx: jax.Array, rows: jax.Array,
             write: jax.Array, mesh: Mesh) -> jax.Array:
  """`table[idx] = rows` where `write` is true (others untouched).

  Used by reprediction; `idx` must not repeat among written rows.
  """

  def local(tab, ix, r, w):
    all_ix = jax.lax.all_gather(ix, DATA, tiled=True)
    all_r = jax.lax.all_gather(r, DATA, tiled=True)
    all_w = jax.lax.all_gather(w, DATA, tiled=True)
    own, loc = _owned(all_ix, tab.shape[0])
    loc = jnp.where(own & all_w, loc, tab.shape[0])
    return tab.at[loc].set(all_r.astype(tab.dtype), mode="drop")

  return jax.shard_map(local, mesh=mesh,
                       in_specs=(TABLE_SPEC, ROW_SPEC, TABLE_SPEC, ROW_SPEC),
                       out_specs=TABLE_SPEC)(table, idx, rows, write)
