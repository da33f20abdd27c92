"""The MNIST 2D-FC notebook runs top to bottom in FAST mode (so it never rots)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")


@pytest.mark.skipif(not os.path.isdir(MNIST),
                    reason="needs the MNIST files in ../shared/data/mnist")
def test_mnist_2dfc_notebook_runs_fast(tmp_path):
  path = os.path.join(ROOT, "notebooks", "mnist_2dfc.ipynb")
  nb = nbformat.read(path, as_version=4)
  # Parameters are overridden through the environment the kernel inherits.
  os.environ["WORKDIR"] = str(tmp_path / "wd")
  os.environ["MNIST_MANUAL_DIR"] = MNIST
  os.environ["TFDS_DATA_DIR"] = str(tmp_path / "tfds")
  os.environ["MPLBACKEND"] = "Agg"
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(path)}})
  client.execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "finetune   test accuracy" in outputs
  images = [o for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the feature scatter plots and the curves
