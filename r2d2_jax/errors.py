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
