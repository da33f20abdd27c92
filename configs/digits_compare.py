r"""Every method side by side on scikit-learn's embedded digits, 50 labels.

One command, one workdir, one split (the seed's: 50 labels, 5 per class; 200
validation images; the rest unlabeled), the same network (cnn_small) and the
same batch of 16 labeled + 48 unlabeled images. Each stage is one method,
trained from scratch beside the others (`init_from_stage='none'`; R2-D2's and
MPL's own stages follow each other as in their configs), with that method's
digits config (configs/<method>_digits.py: its settings, and why).

  python -m r2d2_jax.main --config configs/digits_compare.py \
      --workdir /tmp/r2d2_jax/digits_compare

The table over seeds (test error at best validation, median of the last 20
evaluations, final; docs/results.md):

  python -m benchmarks.results --config configs/digits_compare.py \
      --seeds 0 1 2 --write

A subset: `--config.run_stages=supervised,fixmatch,vat`. `fixmatch_cta` is
FixMatch with CTAugment (`configs/fixmatch_digits.py:cta`). Smoke variant (a
few steps per stage): `--config configs/digits_compare.py:runlocal`.
The stages are the quick start's (configs/digits_quickstart.py: supervised,
d2, r2, finetune, mpl, mpl_finetune, semimeta) and then `COMPARED`.
"""

import ml_collections

from configs import adamatch_digits
from configs import digits_quickstart
from configs import fixmatch_digits
from configs import flexmatch_digits
from configs import freematch_digits
from configs import mean_teacher_digits
from configs import mixmatch_digits
from configs import pi_model_digits
from configs import pseudo_label_digits
from configs import softmatch_digits
from configs import temporal_ensembling_digits
from configs import uda_digits
from configs import vat_digits

# Stage name -> the single-stage digits config it runs (a module, or a module
# and its variant).
COMPARED = {
    "uda": uda_digits,
    "fixmatch": fixmatch_digits,
    "fixmatch_cta": (fixmatch_digits, "cta"),
    "flexmatch": flexmatch_digits,
    "freematch": freematch_digits,
    "softmatch": softmatch_digits,
    "adamatch": adamatch_digits,
    "mixmatch": mixmatch_digits,
    "mean_teacher": mean_teacher_digits,
    "pi_model": pi_model_digits,
    "temporal_ensembling": temporal_ensembling_digits,
    "vat": vat_digits,
    "pseudo_label": pseudo_label_digits,
}


def get_config(arg: str | None = None):
  c = digits_quickstart.get_config(arg)
  base = digits_quickstart._shared_part(c)  # pylint: disable=protected-access
  stages = c.stages.to_dict()
  for name, entry in COMPARED.items():
    module, variant = entry if isinstance(entry, tuple) else (entry, None)
    parts = [p for p in (variant, arg) if p]
    full = module.get_config(",".join(parts) or None).to_dict()
    stage = digits_quickstart._diff(full, base)  # pylint: disable=protected-access
    # Keys the base has and this method's config does not (another method's
    # block) do no harm: each method parses only its own block.
    stage["init_from_stage"] = "none"
    stages[name] = stage
  c.stages = ml_collections.ConfigDict(stages)
  c.stage_order = tuple(c.stage_order) + tuple(COMPARED)
  return c

