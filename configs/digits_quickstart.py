r"""Quick start: supervised-only, R2-D2, Meta Pseudo Labels and SemiMeta on digits.

1797 real 8x8 handwritten digits ship with scikit-learn, so this runs anywhere
with no download, in a few minutes on a 2-core CPU. 50 labels (5 per class);
the rest of the train split is unlabeled; every method sees the same split.
The stages, in order, and what each row of the final table is:

  supervised     supervised-only baseline on the 50 labels
  d2, r2         R2-D2's Deep Decipher and Repetitive Reprediction stages
  finetune       R2-D2 (all stages): configs/r2d2_digits.py
  mpl            Meta Pseudo Labels' student, trained from scratch beside its
                 teacher: configs/mpl_digits.py
  mpl_finetune   that student finetuned on the labels
  semimeta       SemiMeta, from scratch: configs/semimeta_digits.py

  python -m r2d2_jax.main --config configs/digits_quickstart.py \
      --workdir /tmp/r2d2_jax/digits_quickstart

A subset: `--config.run_stages=mpl,mpl_finetune`. Smoke variant (a few steps
per stage): `--config configs/digits_quickstart.py:runlocal`.
"""

from typing import Any

import ml_collections

from configs import common
from configs import mpl_digits
from configs import r2d2_digits
from configs import semimeta_digits


def get_config(arg: str | None = None):
  c = r2d2_digits.get_config(arg)
  base = _shared_part(c)
  stages = c.stages.to_dict()
  mpl = mpl_digits.get_config(arg)
  mpl_base = _shared_part(mpl)
  for name, renamed in (("mpl", "mpl"), ("finetune", "mpl_finetune")):
    full = common.merged(mpl_base, mpl.stages[name].to_dict())
    stages[renamed] = _diff(full, base)
  stages["mpl"]["init_from_stage"] = "none"
  stages["mpl_finetune"]["init_from_stage"] = "mpl"
  stages["semimeta"] = _diff(semimeta_digits.get_config(arg).to_dict(), base)
  stages["semimeta"]["init_from_stage"] = "none"
  c.stages = ml_collections.ConfigDict(stages)
  c.stage_order = tuple(c.stage_order) + ("mpl", "mpl_finetune", "semimeta")
  return c


def _shared_part(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """A staged config as a dict without its stage list: what every stage shares."""
  out = config.to_dict()
  for k in ("stages", "stage_order", "run_stages"):
    out.pop(k)
  return out


def _diff(full: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
  """The entries of `full` that differ from `base` (so `--config.seed` etc. stay shared)."""
  out = {}
  for k, v in full.items():
    if isinstance(v, dict) and isinstance(base.get(k), dict):
      sub = _diff(v, base[k])
      if sub:
        out[k] = sub
    elif k not in base or base[k] != v:
      out[k] = v
  return out
