"""Orbax checkpoints behind one small API.

Each save holds the whole train state pytree ('state') and a JSON record ('meta':
step, total_steps, stage, config). Saves are atomic (orbax writes a temporary
folder, `STEP.orbax-checkpoint-tmp`, and renames it to `STEP` when complete), so
a run killed while saving resumes from the previous checkpoint: orbax never
lists a temporary folder as a step, and the next save of that step replaces
it. `latest_step` also skips a step folder that lacks one of its items (what an
interrupted deletion or a non-atomic filesystem could leave).

On Cloud Storage (`gs://` folders) there is no rename: orbax writes the step
folder in place and marks it complete with a `commit_success.txt`, and lists
only marked steps; the arrays go through tensorstore's gcs driver.
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from r2d2_jax import paths
from r2d2_jax.errors import R2D2Error

PyTree = Any


class Checkpointer:
  """Periodic and final saves of one run's state in `directory`.

  Args:
    directory: where checkpoints live (created if missing): a local folder
      or a gs:// URL.
    max_to_keep: how many recent checkpoints to keep.
    async_save: write in a background thread while training continues.
  """

  def __init__(self, directory: str, max_to_keep: int = 2,
               async_save: bool = True):
    self.directory = paths.absolute(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    """The step of the newest complete checkpoint, or None if there is none."""
    return _latest_complete_step(self._manager, self.directory)

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Saves `state` at `step` (a no-op if that step is already saved)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                       force=True)

  def restore(self, step: int, abstract_state: PyTree
              ) -> tuple[PyTree, dict[str, Any]]:
    """Restores the state at `step` onto the shardings of `abstract_state`.

    Args:
      step: which checkpoint.
      abstract_state: `jax.ShapeDtypeStruct` pytree with `.sharding` set.

    Returns:
      (state, meta).
    """
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise R2D2Error(
          f"The checkpoint at step {step} in {self.directory} does not match "
          f"this config's state (different method, model or dataset?): {e}. "
          "Use a new --workdir.") from e
    return out.state, out.meta

  def meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _latest_complete_step(manager: ocp.CheckpointManager,
                          directory: str) -> int | None:
  """The newest step whose folder holds both items, each finalised."""
  for step in sorted(manager.all_steps(), reverse=True):
    folder = epath.Path(directory) / str(step)
    # A name format other than plain STEP: trust orbax.
    if not folder.exists() or all((folder / item).is_dir()
                                  for item in ("state", "meta")):
      return step
    logging.warning("Skipping the incomplete checkpoint folder %s.", folder)
  return None


def restore_raw(directory: str) -> tuple[PyTree, dict[str, Any]]:
  """Restores the latest checkpoint of another run as host arrays (for init_from).

  Args:
    directory: a run's checkpoint folder (`WORKDIR/checkpoints`) or its workdir
      (a local folder or a gs:// URL).

  Returns:
    (state as nested dicts of numpy arrays, meta).
  """
  paths.check(directory, what="init_from")
  if paths.path(directory).joinpath("checkpoints").is_dir():
    directory = paths.join(directory, "checkpoints")
  if not paths.path(directory).is_dir():
    raise R2D2Error(f"init_from={directory!r}: no such checkpoint folder.")
  directory = paths.absolute(directory)
  # With the handlers named, `item_metadata` knows the arrays' shapes; without,
  # it is None and the restore below falls back to the saved shardings, which
  # on several processes span devices this process cannot read.
  manager = ocp.CheckpointManager(
      directory, item_names=("state", "meta"),
      options=ocp.CheckpointManagerOptions(read_only=True),
      item_handlers={"state": ocp.StandardCheckpointHandler(),
                     "meta": ocp.JsonCheckpointHandler()})
  step = _latest_complete_step(manager, directory)
  if step is None:
    raise R2D2Error(f"init_from={directory!r} holds no checkpoint.")
  meta = manager.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore())).meta
  # Restore every array onto this process's first device, then to host memory.
  meta_tree = manager.item_metadata(step).state
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      meta_tree)
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state
  manager.close()
  return jax.device_get(state), meta
