"""The config and entry point of the Cloud Storage workdir test (tests/test_gcs.py).

Two tiny supervised stages on digits, the second initialised from the first's
checkpoint (`restore_raw` of a gs:// folder), 4 steps each, a checkpoint and
an evaluation every 2 steps.

  python -m tests.gcs_worker --config tests/gcs_worker.py --workdir gs://B/P

is `python -m r2d2_jax.main` with the same flags; with $R2D2_GCS_KILL_IN_SAVE
set to a checkpoint folder (gs://B/P/first/checkpoints/4) it SIGKILLs itself
in the last moment of that save: every file written, the `commit_success.txt`
that marks the step complete on Cloud Storage not yet.
"""

import os

from tests import helpers

STEPS = 4  # per stage
STAGES = ("first", "second")


def get_config(arg: str | None = None):
  del arg
  c = helpers.tiny_config(total_steps=STEPS, checkpoint_every_steps=2,
                          eval_every_steps=2, log_every_steps=1,
                          checkpoint_keep=2)
  c.stage_order = STAGES
  c.run_stages = ""
  c.stages = {name: dict(method="supervised") for name in STAGES}
  return c


def _kill_in_commit(final_dir: str) -> None:
  """SIGKILLs this process as orbax marks the save into `final_dir` complete."""
  import signal  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.CommitFileTemporaryPath.finalize

  async def finalize_or_die(self):
    if str(self.get_final()).rstrip("/") == final_dir.rstrip("/"):
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

  atomicity.CommitFileTemporaryPath.finalize = finalize_or_die


if __name__ == "__main__":
  if os.environ.get("R2D2_GCS_KILL_IN_SAVE"):
    _kill_in_commit(os.environ["R2D2_GCS_KILL_IN_SAVE"])
  from r2d2_jax import main  # pylint: disable=g-import-not-at-top
  main.run()
