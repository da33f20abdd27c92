"""r2d2_jax: semi-supervised image classification with learned pseudo-labels in JAX.

R2-D2 (Deep Decipher + Repetitive Reprediction), Meta Pseudo Labels, meta-gradient
pseudo-labels and the methods they are compared with, as pure-function train steps
compiled with `jax.jit` over a `('data',)` device mesh.
"""

__version__ = "0.1.0"
