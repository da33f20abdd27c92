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


# Every command the README shows, and what runs it: 'ci' (.ci/run runs it as
# written), a test (module::function) that runs it or a smaller variant, or
# "not run: why". A command without an entry fails the test below.
README_COMMANDS = [
    (r"^pip install -e \. && python -m r2d2_jax\.main --config "
     r"configs/digits_quickstart\.py", "ci"),
    (r'^pip install -e "\.\[test\]" && python -m pytest', "ci"),
    (r"--config configs/digits_compare\.py",
     "tests/test_cli.py::test_cli_digits_compare_runlocal"),
    (r"--config configs/NAME\.py\[:variant\]",
     "not run: the pattern of every command, not a command"),
    (r"^python -m r2d2_jax\.predict",
     "tests/test_predict.py::test_cli_writes_csv"),
    (r"^from r2d2_jax import inference|^p = inference\.load|"
     r"^probs = p\.probabilities|^p\.describe\(\)",
     "tests/test_predict.py::test_load_equals_trainer_eval"),
    (r"^TPU_NAME=.*launch/tpu_pod\.sh",
     "not run: needs a Cloud TPU pod (tests/test_multiprocess.py::"
     "test_tpu_pod checks the pod detection)"),
    (r"^CONFIG=.*sbatch launch/slurm\.sbatch",
     "not run: needs a SLURM cluster (tests/test_multiprocess.py checks the "
     "SLURM detection)"),
    (r"^export XLA_FLAGS=|^for i in 0 1; do|^done; wait|"
     r"--coordinator_address=127\.0\.0\.1",
     "tests/test_multiprocess.py::test_two_processes_equal_one"),
    (r'^pip install -e "\.\[tfds,gcs\]"',
     "not run: the extras' contents are what `.[test]` installs in CI"),
    (r"--workdir gs://BUCKET",
     "tests/test_gcs.py::test_gs_workdir_killed_twice_resumes_bitwise"),
    (r"^python -m benchmarks\.compare",
     "tests/test_compare.py::test_written_section_and_plots"),
    (r"--config\.data\.dataset=folder:",
     "tests/test_cli.py::test_cli_folder_dataset"),
    (r"--config configs/supervised_mnist\.py",
     "tests/test_cli.py::test_cli_mnist_on_mock_data"),
]


def _readme_commands():
  readme = open(os.path.join(ROOT, "README.md")).read()
  out = []
  for lang, block in re.findall(r"```(\w*)\n(.*?)```", readme, re.S):
    block = block.replace("\\\n", " ")
    for line in block.splitlines():
      line = re.sub(r"\s+", " ", line.strip())
      if not line or line.startswith("#"):
        continue
      if lang in ("bash", "python") or re.match(
          r"(pip |python |[A-Z_]+=\S+ |launch/\S|tensorboard )", line):
        out.append(line)
  return out


def test_every_readme_command_is_run_by_ci_or_a_test():
  commands = _readme_commands()
  assert len(commands) >= 15
  for command in commands:
    entries = [what for pattern, what in README_COMMANDS
               if re.search(pattern, command)]
    assert entries, (f"README command without a test: {command!r}; add it "
                     "to README_COMMANDS with the test that runs it.")
    for what in entries:
      if what == "ci":
        ci = open(os.path.join(ROOT, ".ci", "run")).read()
        assert command in [l.strip() for l in ci.splitlines()], command
      elif not what.startswith("not run: "):
        module, name = what.split("::")
        source = open(os.path.join(ROOT, module)).read()
        assert f"def {name}(" in source, (command, what)
