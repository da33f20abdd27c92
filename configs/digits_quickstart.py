r"""Quick start: supervised-only and R2-D2 side by side on scikit-learn's digits.

1797 real 8x8 handwritten digits ship with scikit-learn, so this runs anywhere
with no download, in about two minutes on a 2-core CPU. 50 labels (5 per class);
the rest of the train split is unlabeled. It is configs/r2d2_digits.py: the
`supervised` stage is the supervised-only baseline on the same 50 labels and the
`finetune` stage is R2-D2; the test accuracy of each stage is printed at the end.

  python -m r2d2_jax.main --config configs/digits_quickstart.py \
      --workdir /tmp/r2d2_jax/digits_quickstart

Smoke variant (a few steps): `--config configs/digits_quickstart.py:runlocal`.
"""

from configs import r2d2_digits


def get_config(arg: str | None = None):
  return r2d2_digits.get_config(arg)
