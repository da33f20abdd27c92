"""The command line end to end, in a subprocess, as a user runs it."""

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
            "--config.optimizer.lr=0.05"])
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
