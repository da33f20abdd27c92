"""The command line end to end, in a subprocess, as a user runs it.

Break checks (main.py's override check): the command line's run_stages not
applied before the check, and a stage that reads the top-level value counted
as setting it -> test_override_check_reads_the_stages_that_run.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, mock_tfds=False):
  """Runs `python -m r2d2_jax.main ARGS`, inside tfds mock data if asked."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  if mock_tfds:
    code = (f"import sys; sys.argv = ['r2d2_jax.main'] + {args!r}\n"
            "import tensorflow_datasets as tfds\n"
            "from r2d2_jax import main\n"
            "with tfds.testing.mock_data(num_examples=60):\n"
            "  main.run()\n")
    cmd = [sys.executable, "-c", code]
  else:
    cmd = [sys.executable, "-m", "r2d2_jax.main", *args]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_cli_digits_quickstart_runlocal(tmp_path):
  wd = str(tmp_path / "wd")
  r = _run(["--config", "configs/digits_quickstart.py:runlocal",
            "--workdir", wd, "--config.run_stages=supervised",
            "--config.stages.supervised.total_steps=6",
            "--config.stages.supervised.optimizer.lr=0.05"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Final results" in r.stdout and "accuracy/test/raw" in r.stdout
  assert r.stdout.strip().splitlines()[-1].startswith("supervised ")
  stage = os.path.join(wd, "supervised")
  assert os.path.exists(os.path.join(stage, "split.json"))
  assert os.path.isdir(os.path.join(stage, "checkpoints", "6"))
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(stage))


def test_cli_mnist_on_mock_data(tmp_path):
  r = _run(["--config", "configs/supervised_mnist.py:runlocal",
            "--workdir", str(tmp_path / "wd"), "--config.data.num_labels=20",
            "--config.data.batch_size=8", "--config.data.eval_batch_size=20",
            # 60 mock images with random labels: too few for MNIST's 1000
            # validation images.
            "--config.data.num_val=0", "--config.total_steps=4"],
           mock_tfds=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Final results" in r.stdout


@pytest.mark.parametrize("override,message", [
    ("--config.method=fixmatchh", "Unknown method 'fixmatchh'. Valid methods:"),
    ("--config.data.manual_dir=/nonexistent",
     "train-images-idx3-ubyte.gz"),
])
def test_cli_bad_input_is_one_paragraph(tmp_path, override, message):
  r = _run(["--config", "configs/supervised_mnist.py:runlocal", "--workdir", str(tmp_path / "wd"), override])
  assert r.returncode == 1
  assert message in r.stderr
  assert "Traceback" not in r.stderr


def test_cli_too_large_num_val_names_the_largest(tmp_path):
  r = _run(["--config", "configs/digits_quickstart.py:runlocal",
            "--workdir", str(tmp_path / "wd"), "--config.run_stages=supervised",
            "--config.data.num_val=1500"])
  assert r.returncode == 1
  # The smallest digits class has 141 train images, 5 of them labeled.
  assert "The largest possible data.num_val here is 1360" in r.stderr
  assert "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "data.num_val=1500" in errors[0]


@pytest.mark.parametrize("override,message", [
    # Staged: every stage sets its own method, so the top-level one is unread.
    ("--config.method=nosuchmethod",
     "--config.method: no stage of this config reads it; every stage that "
     "runs sets its own (config.stages.supervised.method, "),
    ("--config.nosuchkey=3", "this config has no field 'nosuchkey'"),
    ("--config.optimizer.lrr=3", "Nearest valid keys: --config.optimizer.lr"),
])
def test_cli_override_that_does_nothing_is_an_error(tmp_path, override,
                                                    message):
  wd = tmp_path / "wd"
  r = _run(["--config", "configs/digits_quickstart.py:runlocal", "--workdir",
            str(wd), override])
  assert r.returncode == 2, r.stderr[-2000:]
  assert message in r.stderr and "Traceback" not in r.stderr
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and "no run was started" in errors[0].lower()
  assert not wd.exists()


def test_override_check_reads_the_stages_that_run():
  """`override_error` by hand: which stages run decides what is unread."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from r2d2_jax import main  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(dict(
      method="supervised", optimizer=dict(lr=0.1, name="sgd"),
      stage_order=("a", "b"), run_stages="",
      stages=dict(a=dict(method="x", optimizer=dict(lr=1.0)),
                  b=dict(method="y"))))
  assert main.override_error(c, "optimizer.lr") is None    # b reads it
  assert main.override_error(c, "optimizer.name") is None  # nobody sets it
  err = main.override_error(c, "method")
  assert "config.stages.a.method, config.stages.b.method" in err
  c.run_stages = "a"
  assert "config.stages.a.optimizer.lr" in main.override_error(c,
                                                               "optimizer.lr")
  d = c.to_dict()
  d["stages"]["a"]["optimizer"] = 5      # a stage replacing the whole block
  assert "config.stages.a.optimizer)" in main.override_error(
      ml_collections.ConfigDict(d), "optimizer.lr")
  assert main.override_error(c, "stages.a.method") is None
  assert "optimizer.lrr" in main.override_error(c, "optimizer.lrr")
  path, overrides = main.parse_overrides(
      ["m", "--config", "f.py:v", "--config.a.b=1", "--config.c", "2"])
  assert path == "f.py:v" and overrides == {"a.b": "1", "c": "2"}


def test_cli_digits_compare_runlocal(tmp_path):
  """The README's every-method command, at smoke scale, two of its stages."""
  r = _run(["--config", "configs/digits_compare.py:runlocal",
            "--workdir", str(tmp_path / "wd"),
            "--config.run_stages=supervised,fixmatch"])
  assert r.returncode == 0, r.stderr[-3000:]
  last = r.stdout.strip().splitlines()[-2:]
  assert [line.split()[0] for line in last] == ["supervised", "fixmatch"]


def test_cli_folder_dataset(tmp_path):
  """The README's bring-your-own-data command on a generated folder."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("test", 2)):
    for c in ("ant", "bee"):
      folder = tmp_path / "my_images" / split / c
      folder.mkdir(parents=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 10, 3), np.uint8)).save(
            folder / f"{i}.png")
  wd = str(tmp_path / "wd")
  r = _run(["--config", "configs/fixmatch_digits.py:runlocal",
            "--workdir", wd,
            f"--config.data.dataset=folder:{tmp_path / 'my_images'}",
            "--config.data.image_size=8", "--config.data.num_labels=4",
            "--config.data.num_val=2", "--config.data.batch_size=4",
            "--config.data.eval_batch_size=8"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "accuracy/test/raw" in r.stdout
  assert os.path.isfile(os.path.join(wd, "config.json"))
