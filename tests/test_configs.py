"""Every config loads, documents its command, and matches the paper where it claims to."""

import glob
import importlib
import os

import pytest

from r2d2_jax import methods
from r2d2_jax import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith(("__init__.py", "common.py")))


def _module(name):
  return importlib.import_module(f"configs.{name}")


def _parse_hparams(cfg):
  """The method's hyperparameters parse (no unknown key, all in range)."""
  task = methods.Task(num_classes=10, num_train=1000,
                      total_steps=int(cfg.get("total_steps") or 1000),
                      steps_per_epoch=10)
  method = methods.get_method(cfg.method)
  return methods.base.bind(method.hparams, task=task)(cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_with_command_and_runlocal(name):
  mod = _module(name)
  assert f"--config configs/{name}.py" in mod.__doc__
  for arg in (None, "runlocal"):
    c = mod.get_config(arg)
    assert c.method and c.model.name and c.data.dataset
    stages = ([train.stage_config(c, stage) for stage in
               train.selected_stages(c)] if c.get("stages") else [c])
    for cfg in stages:
      _parse_hparams(cfg)
  with pytest.raises(ValueError, match="Unknown variant"):
    mod.get_config("nope")


def test_r2d2_cifar10_matches_the_paper():
  c = _module("r2d2_cifar10_4k").get_config()
  assert c.model.name == "shake_shake26_2x96d"
  assert c.data.dataset == "cifar10" and c.data.num_labels == 4000
  assert (c.r2d2.alpha, c.r2d2.beta) == (0.1, 0.03)
  assert c.r2d2.label_lr == 4000 / 512
  assert c.optimizer.nesterov and c.optimizer.momentum == 0.9
  assert c.optimizer.weight_decay == 2e-4
  s = {n: train.stage_config(c, n) for n in c.stage_order}
  assert list(c.stage_order) == ["supervised", "d2", "r2", "finetune"]
  sup = s["supervised"]
  assert (sup.total_epochs, sup.data.batch_size, sup.optimizer.lr) == (
      300, 40, 0.05)
  assert sup.optimizer.schedule.name == "cosine"
  assert sup.optimizer.schedule.decay_steps == 350 * 4000 // 40
  assert sup.data.augment.weak.cutout == 16 and sup.data.augment.weak.translate == 4
  d2 = s["d2"]
  assert d2.method == "r2d2" and d2.total_epochs == 300
  assert d2.data.batch_size == 128 and d2.data.batch_size * d2.data.uratio == 384
  assert d2.optimizer.lr == 0.12 and d2.optimizer.schedule.name == "constant"
  assert tuple(d2.r2d2.repredict_epochs) == (0.0,)
  r2 = s["r2"]
  assert r2.total_epochs == 300
  assert tuple(r2.r2d2.repredict_epochs) == (0, 75, 150, 225)
  lrs, lr = [0.12], 0.12
  for scale in r2.optimizer.schedule.scales:
    lr *= scale
    lrs.append(lr)
  assert [round(x, 6) for x in lrs] == [0.12, 0.08, 0.04, 0.004]
  ft = s["finetune"]
  assert ft.method == "r2d2_finetune" and ft.total_epochs == 50
  assert ft.data.batch_size * ft.data.uratio == 512
  assert ft.data.unlabeled == "all"
  assert ft.optimizer.lr == 0.01 and ft.optimizer.schedule.name == "cosine"
  assert ft.data.augment.weak.cutout == 16


def test_r2d2_imagenet_shards_the_table():
  c = _module("r2d2_imagenet10").get_config()
  assert c.model.name == "resnet18" and c.data.labeled_fraction == 0.1
  from r2d2_jax.methods import r2d2
  assert train.stage_config(c, "d2").method == "r2d2"
  assert r2d2.METHOD.state_sharding is r2d2.state_sharding


@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_quickstart_stages_are_the_standalone_configs(arg):
  """The quick start's MPL and SemiMeta stages run exactly their own configs."""
  q = _module("digits_quickstart").get_config(arg)
  mpl = _module("mpl_digits").get_config(arg)
  same = [("mpl", mpl, "mpl"), ("mpl_finetune", mpl, "finetune"),
          ("semimeta", _module("semimeta_digits").get_config(arg), None),
          ("finetune", _module("r2d2_digits").get_config(arg), "finetune")]
  for name, other, other_stage in same:
    got = train.stage_config(q, name).to_dict()
    want = (train.stage_config(other, other_stage) if other_stage
            else other).to_dict()
    for k in ("stages", "stage_order", "run_stages"):
      want.pop(k, None)
    # Extra blocks of the other methods (e.g. `r2d2`) are unused; all else equal.
    assert {k: got[k] for k in want} == want, name
  assert q.stages.mpl.init_from_stage == "none"
  assert q.stages.semimeta.init_from_stage == "none"
  assert q.stages.mpl_finetune.init_from_stage == "mpl"
  # One seed for every method.
  q.seed = 3
  assert all(train.stage_config(q, s).seed == 3 for s in q.stage_order)


# Each paper config's strong view uses its paper's RandAugment policy
# (r2d2_jax/data/randaugment.py): MPL's and UDA's configs the MPL / UDA TF
# code's, FixMatch's FixMatch's.
PAPER_POLICY = {"mpl_": "mpl", "uda_": "mpl", "fixmatch_": "fixmatch"}


@pytest.mark.parametrize("name", [n for n in CONFIGS
                                  if n.startswith(tuple(PAPER_POLICY))])
def test_paper_configs_use_their_papers_augmentation_policy(name):
  policy = next(v for k, v in PAPER_POLICY.items() if name.startswith(k))
  c = _module(name).get_config()
  configs = ([train.stage_config(c, s) for s in train.selected_stages(c)]
             if c.get("stages") else [c])
  for sc in configs:
    assert sc.data.augment.strong.policy == policy, name
