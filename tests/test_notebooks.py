"""The MNIST 2D-FC notebook runs top to bottom in FAST mode (so it never rots)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")


@pytest.mark.skipif(not os.path.isdir(MNIST),
                    reason="needs the MNIST files in ../shared/data/mnist")
def test_mnist_2dfc_notebook_runs_fast(tmp_path, monkeypatch):
  path = os.path.join(ROOT, "notebooks", "mnist_2dfc.ipynb")
  nb = nbformat.read(path, as_version=4)
  # Parameters are overridden through the environment the kernel inherits.
  monkeypatch.setenv("WORKDIR", str(tmp_path / "wd"))
  monkeypatch.setenv("MNIST_MANUAL_DIR", MNIST)
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
  # The kernel runs as a user's would: one CPU device, not the tests' eight
  # fake ones (XLA:CPU collectives across 8 fake devices can stall inside a
  # kernel's threads).
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                     "--xla_llvm_disable_expensive_passes=true")
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "finetune   test accuracy" in outputs
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the feature scatter plots and the curves


def test_compare_methods_notebook_runs_fast(tmp_path, monkeypatch):
  """FAST mode trains a tiny digits comparison, then the table and the plots."""
  path = os.path.join(ROOT, "notebooks", "compare_methods.ipynb")
  nb = nbformat.read(path, as_version=4)
  monkeypatch.setenv("FAST", "1")
  monkeypatch.setenv("WORKDIR", str(tmp_path / "wd"))
  monkeypatch.delenv("RESULTS_ROOT", raising=False)
  # One CPU device in the kernel, as in the test above.
  monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0 "
                     "--xla_llvm_disable_expensive_passes=true")
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "methods: ['supervised', 'pseudo_label'] seeds: [0]" in outputs
  assert "| method | raw at best val (headline)" in outputs
  assert "| pseudo_label | " in outputs and "8 steps, 512 images seen" in outputs
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # test error; pseudo-label accuracy and mask (no R2-D2)
