"""User-facing errors.

Every error a user can cause with a config, a command line or a data directory is
an `R2D2Error`: `main.py` prints its message as one paragraph instead of a stack of
traces.
"""

from typing import Iterable


class R2D2Error(Exception):
  """An error in the user's input (config, data, workdir), with a readable message."""


class NonFiniteError(R2D2Error):
  """Training produced a non-finite loss or metric."""


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint; a rerun resumes.

  Not an `R2D2Error`: nothing is wrong with the input. `main.py` prints the
  message and exits with status 143 (128 + SIGTERM), as a process killed by
  SIGTERM would.

  Attributes:
    step: the step of the checkpoint that was saved.
    stage: the stage's name ('' for a single-stage run).
  """

  def __init__(self, message: str, step: int, stage: str = ""):
    super().__init__(message)
    self.step = step
    self.stage = stage


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> R2D2Error:
  """Builds the error for a name missing from a registry.

  Args:
    kind: what was looked up, e.g. "method" or "dataset".
    name: the name the user gave.
    valid: the names that exist.

  Returns:
    An `R2D2Error` whose message lists the valid names.
  """
  return R2D2Error(
      f"Unknown {kind} {name!r}. Valid {kind}s: {', '.join(sorted(valid))}.")
