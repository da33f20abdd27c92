"""r2d2_jax: semi-supervised learning with learned pseudo-labels in JAX."""

from setuptools import find_packages, setup

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
        "clu>=0.0.12",
        "tensorboard",  # clu's summary writers need it installed explicitly.
        "ml-collections>=1.0",
        "absl-py",
        "numpy",
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9",
        "importlib_resources",  # tfds.load needs it (tfds 4.9.10).
        "scikit-learn",  # the embedded digits dataset.
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-xdist", "chex>=0.1.90", "nbclient",
                 "nbformat", "ipykernel", "matplotlib"],
        "notebooks": ["matplotlib", "jupyter"],
    },
)
