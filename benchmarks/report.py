"""Writing measured figures into docs/benchmarks.md, one marked section per script; pyplot for the plots."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import jax

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                   "docs", "benchmarks.md")


def pyplot():
  """matplotlib.pyplot; the Agg backend unless pyplot is already set up (a notebook)."""
  if "matplotlib.pyplot" not in sys.modules:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def environment() -> str:
  """One line naming the backend, devices and versions the figures come from."""
  d = jax.devices()[0]
  return (f"{datetime.date.today().isoformat()}, JAX {jax.__version__}, backend "
          f"`{jax.default_backend()}`, {jax.device_count()} x {d.device_kind}, "
          f"{os.cpu_count()} CPU cores, Python {platform.python_version()}")


def write_section(name: str, body: str, path: str = DOC) -> None:
  """Replaces (or appends) the section between BEGIN/END markers for `name`."""
  begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
  title = os.path.basename(path)[:-3].capitalize()
  text = open(path).read() if os.path.exists(path) else (
      f"# {title}\n\nEvery figure here was measured by the command shown "
      "beside it; rerun it to update its section.\n")
  block = f"{begin}\n{body.rstrip()}\n{end}"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + block + rest.split(end, 1)[1]
  else:
    text = text.rstrip() + "\n\n" + block + "\n"
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)


def named_roots(parser, items) -> dict[str, str]:
  """`--runs NAME=ROOT ...` as {NAME: ROOT}; a malformed item is a usage error."""
  runs = {}
  for item in items:
    name, eq, root = item.partition("=")
    if not eq or not name or not root:
      parser.error(f"--runs {item!r}: write NAME=ROOT")
    runs[name] = root
  return runs
