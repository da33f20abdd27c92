"""The config of the fault-tolerance tests (tests/test_faults.py).

Three tiny stages on digits in one command, so one subprocess covers every kind
of state: supervised (a network), R2-D2 initialised from it (network and
pseudo-label table, with a reprediction in mid-stage) and MPL (teacher, student
and baseline). A checkpoint every 2 steps.

  python -m r2d2_jax.main --config tests/fault_worker.py --workdir DIR

`--config tests/fault_worker.py:async` saves checkpoints in the background (the
library's default); without it saves are synchronous.
"""

import os

from configs import common
from tests import helpers

STEPS = 6  # per stage
STAGES = ("supervised", "r2d2", "mpl")


def get_config(arg: str | None = None):
  c = helpers.tiny_config(total_steps=STEPS, checkpoint_every_steps=2,
                          log_every_steps=1, checkpoint_keep=2)
  c.checkpoint_async = arg == "async"
  common.r2d2_block(c)
  # Reprediction before R2-D2's first step and before its step 3 (87 steps
  # per epoch at 16 unlabeled examples a step).
  c.r2d2.repredict_epochs = (0.0, 0.035)
  c.uda = common.uda_block(weight=1.0, ramp_steps=2, temperature=0.7,
                           threshold=0.6, label_smoothing=0.0)
  teacher = c.optimizer.to_dict()
  c.mpl = dict(mode="first_order", h="difference", sample_labels=False,
               temperature=1.0, baseline_decay=0.01, teacher_optimizer=teacher)
  c.stage_order = STAGES
  c.run_stages = ""
  c.stages = {
      "supervised": dict(method="supervised", data=dict(uratio=0)),
      "r2d2": dict(method="r2d2", data=dict(uratio=1)),
      "mpl": dict(method="mpl", data=dict(uratio=1)),
  }
  return c


def _kill_in_save(final_dir: str) -> None:
  """SIGKILLs this process while orbax finalises the save into `final_dir`.

  Every file of the checkpoint is written by then; only the rename of
  `STEP.orbax-checkpoint-tmp` to `STEP` is missing: the last moment of a save.
  """
  import signal  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  target = os.path.abspath(final_dir)

  async def finalize_or_die(self):
    if os.path.abspath(str(self.get_final())) == target:
      os.kill(os.getpid(), signal.SIGKILL)
    return await finalize(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize_or_die


if __name__ == "__main__":
  # `python -m tests.fault_worker ARGS` is `python -m r2d2_jax.main ARGS`,
  # killed in the save into $R2D2_FAULT_KILL_IN_SAVE if that is set.
  if os.environ.get("R2D2_FAULT_KILL_IN_SAVE"):
    _kill_in_save(os.environ["R2D2_FAULT_KILL_IN_SAVE"])
  from r2d2_jax import main  # pylint: disable=g-import-not-at-top
  main.run()
