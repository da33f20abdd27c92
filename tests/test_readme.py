"""The README's first two commands are what CI runs."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ci_runs_the_readme_commands():
  readme = open(os.path.join(ROOT, "README.md")).read()
  ci = open(os.path.join(ROOT, ".ci", "run")).read()
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  install_and_run, install_and_test = blocks[0].strip(), blocks[1].strip()
  assert "r2d2_jax.main" in install_and_run
  assert "pytest" in install_and_test
  ci_lines = [l.strip() for l in ci.splitlines()]
  assert install_and_run in ci_lines
  assert install_and_test in ci_lines
  assert "venv" in ci
