r"""Methods side by side at an equal budget: same splits, model and images seen.

  python -m benchmarks.compare --setting digits \
      --methods supervised fixmatch vat r2d2 --steps 2000 --seeds 0 1 2 --write
  python -m benchmarks.compare --setting mnist_pi \
      --methods supervised vat r2d2 --steps 6000 --seeds 0 1 2 \
      --override data.manual_dir=../shared/data/mnist --write

A setting names, for every method, the config it starts from and what the
harness makes equal (`SETTINGS`):

  digits     configs/<method>_digits.py (the stages of configs/digits_compare.py
             and configs/digits_quickstart.py; `supervised` is R2-D2's
             supervised stage, `fixmatch_cta` FixMatch with CTAugment); cnn_small
  mnist_cnn  configs/<method>_mnist.py with cnn_small, augmentation as each
             config has it, except VAT's (`method_values`): its config is
             permutation-invariant MNIST's, so here it gets the ±2 px
             translation of every other method and an ε chosen for cnn_small
             on seed 0's validation split (docs/results.md,
             "compare_mnist_cnn_vat")
  mnist_pi   permutation-invariant MNIST-100: configs/<method>_mnist.py with
             mlp_mnist and no augmentation in any view (`augmentation_off`:
             weak and strong are the image itself); the network's noise is
             VAT's TPAMI one (Gaussian, std 0.5, after each hidden BatchNorm,
             train mode) for every method, so Π, Mean Teacher and MPL's UDA
             term see two different passes; only methods that need no image
             augmentation

Forced equal in every stage of every method: the model (name and kwargs; a
stage's own kwargs, e.g. MPL's finetune without dropout, stay), the dataset,
`num_labels`, `num_val`, `batch_size`, `uratio`, `eval_batch_size`, and the
seed (so the split). The budget: `--steps` training steps per method; a staged
method (R2-D2: supervised → d2 → r2 → finetune; MPL: mpl → finetune) gets its
stages' lengths scaled proportionally to sum to `--steps`. With equal batch
size and μ, equal steps are equal training images seen, steps × B × (1 + μ).
Every step-valued hyperparameter (keys ending in `_steps`, piecewise
`boundaries`, R2-D2's `repredict_epochs`) is rescaled with its stage
(`rescale_steps`); the harness sets `log_every_steps`, `eval_every_steps`
(about `--evals` evaluations per stage, at least `--min-last-evals` in the
last) and `checkpoint_every_steps`.

Runs go to ROOT/<method>/<seed> through `train.train_and_evaluate`; a finished
run is read back (its `compare_done.json`), an interrupted one resumes. After
the runs every seed's splits are checked equal across methods
(`check_splits`). The table (`benchmarks.results`'s figures: test error at
best val, median of the last 20 evaluations, final) and three plots (test
error vs step; pseudo-label accuracy and mask rate; R2-D2's table entropy with
its repredictions) are printed / written; `--write` puts them in
docs/results.md (section `compare_<setting>`) and `--figures`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import shlex
import sys
import time
from typing import Any, Sequence

import numpy as np

from benchmarks import report
from benchmarks import results
from r2d2_jax import analysis
from r2d2_jax.errors import R2D2Error

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
CONFIG_FILE = "compare_config.json"
DONE_FILE = "compare_done.json"
# The harness sets these; they are never rescaled.
HARNESS_KEYS = ("log_every_steps", "eval_every_steps", "checkpoint_every_steps")
PSEUDO_LABEL_METRICS = ("monitors/pseudo_label_accuracy", "monitors/mask")
ENTROPY_METRIC = "pseudo_labels/entropy"
REPREDICTED_METRIC = "r2d2/repredicted"


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a comparison holds equal.

  Attributes:
    name: the setting's name (`--setting`).
    suffix: configs/<method>_<suffix>.py is a method's config.
    model: forced `config.model` (name, kwargs).
    data: forced `config.data` entries.
    augment_off: no image augmentation in any view (`augmentation_off`).
    allowed: the methods the setting accepts (None: every method with a config).
    method_values: {method: {dotted key: value}} set on every stage of that
      method after the forced values and before `--override`, for a method
      whose config was written for another setting (a value chosen here is
      chosen on the validation split; docs/results.md says how).
  """
  name: str
  suffix: str
  model: dict
  data: dict
  augment_off: bool = False
  allowed: tuple[str, ...] | None = None
  method_values: dict = dataclasses.field(default_factory=dict)


# configs/vat_mnist.py's PIXEL_TO_INPUT (MNIST standardised by std 78.6 of 0..255;
# tests/test_compare.py checks the two agree).
_PIXEL_TO_INPUT = 255.0 / 78.6

SETTINGS = {
    "digits": Setting(
        "digits", "digits", dict(name="cnn_small", kwargs={}),
        dict(dataset="digits", num_labels=50, num_val=200, batch_size=16,
             uratio=3, eval_batch_size=360)),
    "mnist_cnn": Setting(
        "mnist_cnn", "mnist", dict(name="cnn_small", kwargs={}),
        dict(dataset="mnist", num_labels=100, num_val=1000, batch_size=32,
             uratio=3, eval_batch_size=1000),
        # VAT's config is permutation-invariant MNIST's (no translation, ε =
        # 5.0 for the noisy MLP); ε = 2.0 in [0, 1] pixel units, on the
        # standardised inputs' scale (configs/vat_mnist.py PIXEL_TO_INPUT).
        method_values={"vat": {"data.augment.weak.translate": 2,
                               "vat.epsilon": 2.0 * _PIXEL_TO_INPUT}}),
    "mnist_pi": Setting(
        "mnist_pi", "mnist", dict(name="mlp_mnist", kwargs=dict(noise_std=0.5)),
        dict(dataset="mnist", num_labels=100, num_val=1000, batch_size=32,
             uratio=3, eval_batch_size=1000), augment_off=True,
        allowed=("supervised", "pseudo_label", "pi_model", "mean_teacher",
                 "vat", "r2d2", "mpl", "semimeta")),
}


# ---------------------------------------------------------------------------
# Which config a method starts from


def _configs_importable() -> None:
  """Puts the repository on sys.path, for `configs/` (not a package install)."""
  if REPO not in sys.path:
    sys.path.insert(0, REPO)


def method_source(setting: Setting, method: str
                  ) -> tuple[str, str | None, str | None]:
  """(config file, variant, stage to take alone) of `method` in `setting`.

  Raises:
    R2D2Error: the setting refuses the method, or its config does not exist.
  """
  if setting.allowed is not None and method not in setting.allowed:
    raise R2D2Error(
        f"--setting {setting.name} compares methods that need no image "
        f"augmentation: {', '.join(setting.allowed)}; {method!r} is not one. "
        "Use --setting mnist_cnn for it.")
  variant = stage = None
  base = method
  if setting.name == "digits":
    _configs_importable()
    from configs import digits_compare  # pylint: disable=g-import-not-at-top
    entry = digits_compare.COMPARED.get(method)
    if entry is not None:
      module, variant = entry if isinstance(entry, tuple) else (entry, None)
      return module.__file__, variant, None
    if method == "supervised":
      # digits_quickstart's supervised stage: R2-D2's supervised-only baseline.
      return os.path.join(CONFIGS, "r2d2_digits.py"), None, "supervised"
  if method.endswith("_cta"):
    base, variant = method[:-len("_cta")], "cta"
  path = os.path.join(CONFIGS, f"{base}_{setting.suffix}.py")
  if not os.path.exists(path):
    raise R2D2Error(
        f"Method {method!r} has no config for --setting {setting.name}: "
        f"{os.path.relpath(path, REPO)} does not exist. Write it, or drop "
        f"{method!r} from --methods.")
  return path, variant, stage


def load_method_config(setting: Setting, method: str,
                       variant: str | None = None):
  """The method's config as its file gives it (a staged or a one-stage config)."""
  path, own, stage = method_source(setting, method)
  parts = ",".join(p for p in (own, variant) if p) or None
  _configs_importable()
  try:
    config = results.load_config(f"{path}:{parts}" if parts else path)
  except ValueError as e:
    raise R2D2Error(f"{os.path.relpath(path, REPO)} with variant {parts!r}: "
                    f"{e}") from None
  if stage is not None:
    from r2d2_jax import train  # pylint: disable=g-import-not-at-top
    config = train.stage_config(config, stage)
  return config


# ---------------------------------------------------------------------------
# The budget (pure functions)


def allocate(lengths: Sequence[int], budget: int) -> list[int]:
  """Stage lengths scaled to sum to `budget`: proportional, integers, each ≥ 1.

  Largest remainder: each stage gets floor(budget · length / total) (at least
  1), and the steps left go to the largest fractional parts (ties: earlier).

  Raises:
    R2D2Error: fewer budget steps than stages, or a length < 1.
  """
  if any(n < 1 for n in lengths):
    raise R2D2Error(f"Stage lengths {list(lengths)} must each be ≥ 1 step.")
  if budget < len(lengths):
    raise R2D2Error(f"--steps {budget} is fewer than the {len(lengths)} stages "
                    "of this method; each stage needs at least one step.")
  total = sum(lengths)
  exact = [budget * n / total for n in lengths]
  out = [max(1, math.floor(x)) for x in exact]
  order = sorted(range(len(lengths)), key=lambda i: (-(exact[i] - out[i]), i))
  k = 0
  while sum(out) < budget:
    out[order[k % len(out)]] += 1
    k += 1
  while sum(out) > budget:  # the max(1, ·) floors took too much
    i = max((j for j in range(len(out)) if out[j] > 1),
            key=lambda j: (out[j] - exact[j], j))
    out[i] -= 1
  return out


def _scale_int(v, factor: float) -> int:
  """round(v · factor), never 0 for a nonzero v (a warmup stays a warmup)."""
  if not v:
    return v
  return max(1, int(round(v * factor)))


def rescale_steps(cfg: dict, factor: float, epoch_factor: float | None = None,
                  path: str = "") -> dict:
  """A copy of a stage's config dict with its step-valued entries × `factor`.

  Rescaled: every key ending in `_steps` except `total_steps` (the budget) and
  the harness's HARNESS_KEYS; a piecewise schedule's `boundaries` (duplicate
  boundaries after rounding are merged, their `scales` multiplied, since the
  schedule keeps one scale per boundary); R2-D2's `repredict_epochs` by
  `epoch_factor` (default `factor`: new epochs of the same length).
  `boundary_fractions` and `*_epochs` lengths are fractions or handled by the
  caller and stay.

  Args:
    cfg: the stage's config as a nested dict (`ConfigDict.to_dict()`).
    factor: new total steps / original total steps of the stage.
    epoch_factor: the factor of epoch-valued entries.
    path: the key prefix (recursion).

  Returns:
    The rescaled dict; `cfg` is unchanged.
  """
  epoch_factor = factor if epoch_factor is None else epoch_factor
  out = {}
  for k, v in cfg.items():
    if isinstance(v, dict):
      out[k] = rescale_steps(v, factor, epoch_factor, f"{path}{k}.")
    elif (k.endswith("_steps") and k != "total_steps"
          and k not in HARNESS_KEYS and isinstance(v, (int, float))
          and not isinstance(v, bool)):
      out[k] = _scale_int(v, factor)
    elif k == "repredict_epochs":
      out[k] = tuple(e * epoch_factor for e in v)
    else:
      out[k] = v
  if cfg.get("boundaries"):
    bounds = [_scale_int(b, factor) for b in cfg["boundaries"]]
    scales = list(cfg.get("scales", (1.0,) * len(bounds)))
    merged: dict[int, float] = {}
    for b, s in zip(bounds, scales):
      merged[b] = merged.get(b, 1.0) * s
    out["boundaries"] = tuple(merged)
    if "scales" in cfg:
      out["scales"] = tuple(merged.values())
  return out


def every_steps(stage_steps: int, evals: int, last: bool,
                min_last_evals: int = 20) -> dict[str, int]:
  """The harness's log / eval / checkpoint intervals of one stage.

  About `evals` evaluations per stage; the last stage gets at least
  `min_last_evals` (for the median of the last 20) when it has that many steps.
  """
  n = max(evals, min_last_evals) if last else evals
  eval_every = max(1, stage_steps // max(1, n))
  return dict(eval_every_steps=eval_every,
              log_every_steps=max(1, min(eval_every, stage_steps // 50 or 1)),
              checkpoint_every_steps=max(1, -(-stage_steps // 4)))


# ---------------------------------------------------------------------------
# The config of one method at the budget


def _stage_dicts(config) -> tuple[dict, list[str], dict[str, dict], dict]:
  """(base dict, stage order, {stage: full dict}, {stage: init_from_stage})."""
  from r2d2_jax import train  # pylint: disable=g-import-not-at-top
  if not config.get("stages"):
    return config.to_dict(), ["run"], {"run": config.to_dict()}, {}
  base = config.to_dict()
  for k in ("stages", "stage_order", "run_stages"):
    base.pop(k, None)
  order = train.selected_stages(config)
  full = {s: train.stage_config(config, s).to_dict() for s in order}
  init = {s: config.stages[s].init_from_stage for s in order
          if config.stages[s].get("init_from_stage") is not None}
  return base, order, full, init


def _steps_per_epoch(cfg: dict, seed: int) -> int:
  """Steps per epoch of a stage (builds its input pipeline; nothing is saved)."""
  return _steps_per_epoch_cached(json.dumps(cfg["data"], sort_keys=True,
                                            default=str), seed)


@functools.lru_cache(maxsize=None)
def _steps_per_epoch_cached(data_json: str, seed: int) -> int:
  import ml_collections  # pylint: disable=g-import-not-at-top
  from r2d2_jax import sharding  # pylint: disable=g-import-not-at-top
  from r2d2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict(json.loads(data_json))
  return pipeline.make_pipeline(data, seed, sharding.make_mesh()
                                ).steps_per_epoch()


def _set(d: dict, dotted: str, value) -> None:
  *path, last = dotted.split(".")
  for p in path:
    d = d.setdefault(p, {})
  d[last] = value


def _set_existing(d: dict, dotted: str, value, where: str) -> None:
  """Sets a key of a stage dict that must exist (a misspelt key is an error)."""
  *path, last = dotted.split(".")
  for p in path:
    d = d.get(p)
    if not isinstance(d, dict):
      break
  if not isinstance(d, dict) or last not in d:
    raise R2D2Error(f"SETTINGS {where}: method_values key {dotted!r} is not "
                    "in the method's config.")
  d[last] = value


def _overridden(cfg: dict, overrides: Sequence[str]) -> dict:
  """A copy of a stage dict with the `--override key=value` items applied."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict(copy.deepcopy(cfg))
  for item in overrides:
    results.apply_override(c, item)
  return c.to_dict()


def _force(cfg: dict, base: dict, setting: Setting) -> None:
  """Sets the setting's equal parts on a stage dict (in place)."""
  own_kwargs = {k: v for k, v in cfg["model"].get("kwargs", {}).items()
                if base["model"].get("kwargs", {}).get(k, object()) != v}
  cfg["model"] = dict(cfg["model"], name=setting.model["name"],
                      kwargs=dict(setting.model.get("kwargs", {}),
                                  **own_kwargs))
  cfg["data"].update(setting.data)
  if setting.augment_off:
    augmentation_off(cfg["data"]["augment"])


def augmentation_off(augment: dict) -> None:
  """Every view the unaugmented image (in place on `config.data.augment`).

  Weak: no flip, no translation. Strong (it starts from the weak block): no
  translation, no RandAugment layer, no cutout, no jitter after it (and no
  'usb' policy's final cutout). A method whose unlabeled loss needs two
  different views (MPL's UDA term) then differs only by the network's noise.
  """
  from r2d2_jax.data import augment as augment_lib  # pylint: disable=g-import-not-at-top
  augment.setdefault("weak", {}).update(translate=0, flip=False)
  if "strong" in augment:
    strong = augment["strong"]
    policy = strong.get("policy")
    if policy in augment_lib.STATEFUL_POLICIES:
      raise R2D2Error(f"a setting without augmentation cannot take "
                      f"data.augment.strong.policy={policy!r} (a learned "
                      f"augmentation); drop the override or use mnist_cnn")
    strong.update(translate=0, flip=False, num_ops=0, cutout=0,
                  weak_after=False)
    if policy == "usb":
      strong["cutout_frac"] = 0.0


def budget_config(setting: Setting, method: str, steps: int, seed: int, *,
                  evals: int = 25, min_last_evals: int = 20,
                  overrides: Sequence[str] = (), variant: str | None = None):
  """The config `method` runs in the comparison, and how it was made.

  Returns:
    (config, info): the ConfigDict for `train.train_and_evaluate`, and
    {'stages': [names], 'steps': {stage: steps}, 'original_steps':
    {stage: steps}, 'factor': {stage: new / original}, 'source': file}.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  original = load_method_config(setting, method, variant)
  base, order, full, init = _stage_dicts(original)
  orig_steps, spe = {}, {}
  for s in order:
    cfg = full[s]
    if cfg.get("total_epochs"):
      # With the overrides: they may say where the data is.
      spe[s] = _steps_per_epoch(_overridden(cfg, overrides), seed)
      orig_steps[s] = int(round(cfg["total_epochs"] * spe[s]))
    else:
      orig_steps[s] = int(cfg["total_steps"])
  new_steps = dict(zip(order, allocate([orig_steps[s] for s in order], steps)))
  stages = {}
  for i, s in enumerate(order):
    cfg = copy.deepcopy(full[s])
    _force(cfg, base, setting)
    factor = new_steps[s] / orig_steps[s]
    epoch_factor = factor
    if s in spe:  # repredict_epochs are epochs of the forced pipeline now
      epoch_factor = factor * spe[s] / _steps_per_epoch(
          _overridden(cfg, overrides), seed)
    cfg = rescale_steps(cfg, factor, epoch_factor)
    cfg["total_steps"] = new_steps[s]
    cfg["total_epochs"] = 0.0
    cfg["seed"] = seed
    for key, value in setting.method_values.get(method, {}).items():
      _set_existing(cfg, key, value, f"{setting.name} {method} {s}")
    c = ml_collections.ConfigDict(cfg)
    for item in overrides:
      results.apply_override(c, item)
    c.update(every_steps(new_steps[s], evals, i == len(order) - 1,
                         min_last_evals))
    stages[s] = c.to_dict()
  if order == ["run"]:
    config = ml_collections.ConfigDict(stages["run"])
  else:
    top = copy.deepcopy(base)
    _force(top, base, setting)
    top["seed"] = seed
    for s in order:
      if s in init:
        stages[s]["init_from_stage"] = init[s]
    top.update(stages=stages, stage_order=tuple(order), run_stages="")
    config = ml_collections.ConfigDict(top)
  info = dict(stages=order, steps=new_steps, original_steps=orig_steps,
              factor={s: new_steps[s] / orig_steps[s] for s in order},
              source=os.path.relpath(method_source(setting, method)[0], REPO))
  return config, info


def _jsonable(x):
  return json.loads(json.dumps(x, default=str))


def stage_configs(config) -> dict[str, Any]:
  """{stage: its ConfigDict} ({'run': config} for a one-stage config)."""
  from r2d2_jax import train  # pylint: disable=g-import-not-at-top
  if not config.get("stages"):
    return {"run": config}
  return {s: train.stage_config(config, s) for s in config.stage_order}


def images_seen(cfg) -> int:
  """steps × batch_size × (1 + uratio) of one stage's config."""
  return int(cfg.total_steps * cfg.data.batch_size * (1 + cfg.data.uratio))


# ---------------------------------------------------------------------------
# Running


def run_one(config, info: dict, workdir: str) -> tuple[float, bool]:
  """Trains (or resumes, or reads back) one run; (wall seconds, was trained)."""
  from r2d2_jax import train  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  record = _jsonable(dict(config=config.to_dict(), info=info))
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    if saved["config"] != record["config"]:
      diff = sorted(results.diff_keys(saved["config"], record["config"]))
      raise R2D2Error(
          f"{workdir} holds a run of another config (differing: "
          f"{', '.join(diff[:8])}). Use another --root, or delete {workdir}.")
  else:
    with open(path, "w") as f:
      json.dump(record, f, indent=1)
  done = os.path.join(workdir, DONE_FILE)
  if os.path.exists(done):
    with open(done) as f:
      return float(json.load(f)["wall_s"]), False
  t0 = time.time()
  train.train_and_evaluate(config, workdir)
  wall = time.time() - t0
  with open(done, "w") as f:
    json.dump(dict(wall_s=wall, finished=time.time()), f)
  return wall, True


def stage_dir(root: str, method: str, seed: int, stage: str) -> str:
  run = os.path.join(root, method, str(seed))
  return run if stage == "run" else os.path.join(run, stage)


def read_run(root: str, method: str, seed: int) -> dict:
  """A run's saved record: {'config': dict, 'info': dict, 'wall_s': float|None}."""
  workdir = os.path.join(root, method, str(seed))
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise R2D2Error(f"No comparison run in {workdir} ({CONFIG_FILE} is "
                    "missing); run `python -m benchmarks.compare` first.")
  with open(path) as f:
    record = json.load(f)
  done = os.path.join(workdir, DONE_FILE)
  record["wall_s"] = None
  if os.path.exists(done):
    with open(done) as f:
      record["wall_s"] = float(json.load(f)["wall_s"])
  return record


def discover(root: str) -> tuple[list[str], list[int]]:
  """(methods, seeds) of a results root: every method with a run of every seed.

  Methods in the order their runs were made (by their first run's record).

  Raises:
    R2D2Error: the root holds no comparison run.
  """
  runs: dict[str, dict[int, float]] = {}
  for method in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    mdir = os.path.join(root, method)
    for seed in os.listdir(mdir) if os.path.isdir(mdir) else []:
      path = os.path.join(mdir, seed, CONFIG_FILE)
      if seed.isdigit() and os.path.exists(path):
        runs.setdefault(method, {})[int(seed)] = os.path.getmtime(path)
  if not runs:
    raise R2D2Error(f"{root} holds no comparison runs (no "
                    f"<method>/<seed>/{CONFIG_FILE}); run `python -m "
                    "benchmarks.compare --root ...` first.")
  seeds = sorted(set.intersection(*(set(r) for r in runs.values())))
  methods = sorted(runs, key=lambda m: min(runs[m].values()))
  return methods, seeds


def check_splits(root: str, methods: Sequence[str], seeds: Sequence[int]
                 ) -> None:
  """Fails unless, per seed, every method's every stage used the same split.

  Compared in each stage's `split.json` (written by the input pipeline):
  dataset, split seed, labeled indices and validation indices, and, among
  stages with the same `unlabeled` mode ('rest' or 'all'), the size of the
  unlabeled pool (the file stores its size; the pool is the train split minus
  the validation set, and minus the labels for 'rest', so equal labeled and
  validation indices and an equal size mean equal unlabeled indices).

  Raises:
    R2D2Error: naming the seed, the two runs and what differs.
  """
  for seed in seeds:
    first: tuple[str, dict] | None = None
    pools: dict[str, tuple[str, int]] = {}
    for method in methods:
      record = read_run(root, method, seed)
      for stage in record["info"]["stages"]:
        path = os.path.join(stage_dir(root, method, seed, stage), "split.json")
        if not os.path.exists(path):
          raise R2D2Error(f"{path} is missing: the run did not start.")
        with open(path) as f:
          split = json.load(f)
        where = f"{method}/{seed}" + ("" if stage == "run" else f"/{stage}")
        if first is None:
          first = (where, split)
        else:
          ref_where, ref = first
          for key in ("dataset", "seed", "labeled", "val"):
            if split.get(key) != ref.get(key):
              raise R2D2Error(
                  f"Seed {seed}: {where} and {ref_where} trained on different "
                  f"splits ({key!r} differs in their split.json). The "
                  "comparison needs one split per seed; check --override and "
                  "the setting's forced data.")
        mode = split.get("unlabeled", "rest")
        size = int(split.get("num_unlabeled", -1))
        if mode in pools and pools[mode][1] != size:
          raise R2D2Error(
              f"Seed {seed}: {where} has {size} unlabeled examples and "
              f"{pools[mode][0]} has {pools[mode][1]} (both data.unlabeled="
              f"{mode!r}): their unlabeled pools differ.")
        pools.setdefault(mode, (where, size))


# ---------------------------------------------------------------------------
# Reading results back


def run_rows(root: str, methods: Sequence[str], seeds: Sequence[int],
             earlier_stages: bool = True
             ) -> tuple[dict, dict, dict[str, list[int]]]:
  """Per-seed test errors of every method (and its earlier stages).

  Returns:
    (per_row, labels, num_evals): per_row {row: {weights: {figure: [error per
    seed]}}} in `benchmarks.results`'s shape (figures by
    `results.stage_errors`), labels {row: text}, num_evals {row: [per seed]}.
    A method's row is its last stage; earlier stages (R2-D2's, MPL's) are rows
    '<method>/<stage>'.
  """
  per_row: dict[str, dict] = {}
  labels: dict[str, str] = {}
  num_evals: dict[str, list[int]] = {}
  for method in methods:
    stages = read_run(root, method, seeds[0])["info"]["stages"]
    for i, stage in enumerate(stages):
      last = i == len(stages) - 1
      if not last and not earlier_stages:
        continue
      row = method if last else f"{method}/{stage}"
      labels[row] = method if last else f"{method}: {stage} (earlier stage)"
      entry = per_row.setdefault(row, {w: {f: [] for f in results.FIGURES}
                                       for w in results.WEIGHTS})
      for seed in seeds:
        history = analysis.eval_history(stage_dir(root, method, seed, stage))
        num_evals.setdefault(row, []).append(len(history))
        for w in results.WEIGHTS:
          for f, err in results.stage_errors(history, {}, w).items():
            entry[w][f].append(err)
  # Earlier stages after their method's row.
  return per_row, labels, num_evals


def curves(root: str, method: str, seed: int, tag: str | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) over the method's stages, steps cumulative over stages.

  tag None: the test error % of the raw weights from `eval_history.jsonl`;
  otherwise that TensorBoard scalar (`analysis.read_scalars`), from the stages
  that log it. Empty arrays if no stage has it.
  """
  record = read_run(root, method, seed)
  offset, xs, ys = 0, [], []
  for stage in record["info"]["stages"]:
    d = stage_dir(root, method, seed, stage)
    if tag is None:
      hist = analysis.eval_history(d)
      pts = [(r["step"], 100.0 * (1.0 - r["accuracy/test/raw"]))
             for r in hist if "accuracy/test/raw" in r]
    else:
      series = analysis.read_scalars(d).get(tag)
      pts = list(zip(*series)) if series is not None else []
    xs += [offset + int(s) for s, _ in pts]
    ys += [float(v) for _, v in pts]
    offset += int(record["info"]["steps"][stage])
  return np.asarray(xs, np.int64), np.asarray(ys, float)


def stage_boundaries(root: str, method: str, seed: int) -> list[int]:
  """Cumulative steps at which a staged method's later stages start."""
  info = read_run(root, method, seed)["info"]
  steps = np.cumsum([info["steps"][s] for s in info["stages"]])
  return [int(s) for s in steps[:-1]]


def _band(root, methods, seeds, tag):
  """{method: (steps, mean, lo, hi)} over seeds at the steps every seed has."""
  out = {}
  for m in methods:
    per_seed = [dict(zip(*curves(root, m, s, tag))) for s in seeds]
    common = sorted(set.intersection(*(set(p) for p in per_seed)))
    if not common:
      continue
    v = np.array([[p[x] for x in common] for p in per_seed])
    out[m] = (np.asarray(common), v.mean(0), v.min(0), v.max(0))
  return out


def plot_test_error(root, methods, seeds, path=None, title=""):
  """Test error % vs step per method: mean over seeds, min–max band.

  Returns:
    The matplotlib figure (saved to `path` as PNG if given).
  """
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for m, (x, mean, lo, hi) in _band(root, methods, seeds, None).items():
    line, = ax.plot(x, mean, label=m)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    for b in stage_boundaries(root, m, seeds[0]):
      ax.axvline(b, color=line.get_color(), ls=":", lw=0.8)
  ax.set(xlabel="training step (stages concatenated)",
         ylabel="test error % (raw weights)",
         title=title or f"Test error, mean and min–max over seeds "
         f"{', '.join(map(str, seeds))}")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def plot_pseudo_labels(root, methods, seeds, path=None):
  """Pseudo-label accuracy and mask rate vs step, for methods that log them.

  Returns:
    The figure, or None if no method logs `PSEUDO_LABEL_METRICS`.
  """
  bands = {tag: _band(root, methods, seeds, tag) for tag in PSEUDO_LABEL_METRICS}
  if not any(bands.values()):
    return None
  plt = report.pyplot()
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, tag in zip(axes, PSEUDO_LABEL_METRICS):
    for i, m in enumerate(methods):
      if m not in bands[tag]:
        continue
      x, mean, lo, hi = bands[tag][m]
      color = f"C{i}"
      ax.plot(x, mean, label=m, color=color)
      ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    ax.set(xlabel="training step", title=tag, ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


def plot_entropy(root, methods, seeds, path=None):
  """R2-D2's pseudo-label table entropy vs step, repredictions marked.

  Returns:
    The figure, or None if no method logs `ENTROPY_METRIC`.
  """
  bands = _band(root, methods, seeds, ENTROPY_METRIC)
  if not bands:
    return None
  plt = report.pyplot()
  fig, ax = plt.subplots(figsize=(7, 3.8))
  for i, m in enumerate(methods):
    if m not in bands:
      continue
    x, mean, lo, hi = bands[m]
    color = f"C{i}"
    ax.plot(x, mean, label=f"{m}: mean entropy of softmax(Y)", color=color)
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    steps, _ = curves(root, m, seeds[0], REPREDICTED_METRIC)
    for k, s in enumerate(steps):
      ax.axvline(s, color=color, ls="--", lw=0.8,
                 label="reprediction" if k == 0 else None)
  ax.set(xlabel="training step (stages concatenated)",
         ylabel="entropy (nats)", title="R2-D2 pseudo-label table entropy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  if path:
    fig.savefig(path, dpi=110)
  return fig


PLOTS = (("test_error", plot_test_error), ("pseudo_labels", plot_pseudo_labels),
         ("entropy", plot_entropy))


def write_plots(root, methods, seeds, folder, name) -> dict[str, str]:
  """Saves every plot that has data as folder/<name>_<plot>.png; {plot: path}."""
  plt = report.pyplot()
  os.makedirs(folder, exist_ok=True)
  out = {}
  for plot, fn in PLOTS:
    path = os.path.join(folder, f"{name}_{plot}.png")
    fig = fn(root, methods, seeds, path)
    if fig is not None:
      plt.close(fig)
      out[plot] = path
  return out


def summary(root: str, methods: Sequence[str], seeds: Sequence[int], *,
            weights: Sequence[str] = ("raw",), earlier_stages: bool = True,
            title: str = "", command: str = "", wall_s: float | None = None,
            figures: dict[str, str] | None = None,
            figure_dir_link: str | None = None) -> str:
  """The markdown section of a finished comparison, read from `root` alone.

  Args:
    root: the results root.
    methods, seeds: what to read.
    weights: the weights whose columns appear ('raw', 'ema').
    earlier_stages: rows for staged methods' earlier stages.
    title: the section title.
    command: the command line shown.
    wall_s: this invocation's wall time (default: the sum of the runs').
    figures: {plot: png path} to link.
    figure_dir_link: the links' folder relative to the markdown file
      (default: the paths as given).
  """
  records = {m: read_run(root, m, seeds[0]) for m in methods}
  per_row, labels, num_evals = run_rows(root, methods, seeds, earlier_stages)
  figure = results.headline(per_row)
  cfgs = {m: stage_configs(_config(records[m]["config"])) for m in methods}
  any_cfg = next(iter(cfgs[methods[0]].values()))
  images = {m: sum(images_seen(c) for c in cfgs[m].values()) for m in methods}
  steps = {m: sum(records[m]["info"]["steps"].values()) for m in methods}
  run_walls = [read_run(root, m, s)["wall_s"] for m in methods for s in seeds]
  total_wall = sum(w for w in run_walls if w is not None)
  data = any_cfg.data
  budget = ("; ".join(sorted({f"{steps[m]} steps, {images[m]:,} images seen"
                              for m in methods})))
  kwargs = dict(any_cfg.model.get("kwargs", {}))
  evals = ", ".join(f"{labels[r]} {min(n)}" + (f"-{max(n)}" if max(n) != min(n)
                                                else "")
                    for r, n in num_evals.items())
  stage_lines = [
      f"{m} ({records[m]['info']['source']}): " + ", ".join(
          f"{s} {records[m]['info']['steps'][s]} "
          f"(was {records[m]['info']['original_steps'][s]})"
          for s in records[m]["info"]["stages"])
      for m in methods if len(records[m]["info"]["stages"]) > 1]
  lines = [f"## {title}" if title else "", ""]
  if command:
    lines += [f"Command: `{command}`", ""]
  lines += [
      f"Measured: {report.environment()}; {len(seeds)} seeds "
      f"({', '.join(map(str, seeds))}); wall time of the runs "
      f"{total_wall / 60:.1f} minutes (sum of each run's training time)"
      + (f", this table {wall_s / 60:.1f} minutes" if wall_s is not None
         else "") + ".",
      "",
      f"Budget per method: {budget} (steps × batch {data.batch_size} × "
      f"(1 + μ {data.uratio}); a labeled-only stage reads the "
      f"{data.batch_size} labeled images of each step). Same for every method: "
      f"model `{any_cfg.model.name}`"
      f"{' ' + json.dumps(kwargs) if kwargs else ''} "
      f"(a stage's own kwargs, e.g. a finetune without dropout, kept), "
      f"dataset {data.dataset}, {data.num_labels} labels, validation set "
      f"data.num_val={data.num_val}, the seed's split (checked in every "
      f"split.json). Step-valued hyperparameters are rescaled with the "
      f"budget." + (" Stages (steps): " + "; ".join(stage_lines) + "."
                    if stage_lines else ""),
      "",
      "Test error %, mean ± std over the seeds (per seed in brackets). "
      f"Headline: **raw weights, {figure}**. Evaluations per row: {evals}.",
      "", *results.table(per_row, labels, figure, weights=tuple(weights),
                         first="method")]
  if figures:
    lines.append("")
    for plot, path in figures.items():
      link = (os.path.join(figure_dir_link, os.path.basename(path))
              if figure_dir_link is not None else path)
      lines.append(f"![{plot}]({link})")
  return "\n".join(lines).lstrip("\n")


def _config(d: dict):
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(d)


def run_comparison(setting: str, methods: Sequence[str], steps: int,
                   seeds: Sequence[int], root: str, *, evals: int = 25,
                   min_last_evals: int = 20, overrides: Sequence[str] = (),
                   variant: str | None = None, log=print) -> float:
  """Runs (or reads back) every method × seed, then checks the splits.

  Returns:
    The wall seconds of this call.
  """
  if setting not in SETTINGS:
    raise R2D2Error(f"--setting {setting!r}: use one of {sorted(SETTINGS)}.")
  if len(set(methods)) != len(methods):
    raise R2D2Error(f"--methods {list(methods)} names a method twice.")
  s = SETTINGS[setting]
  for m in methods:  # every config error before any training
    method_source(s, m)
  t0 = time.time()
  n, k = len(methods) * len(seeds), 0
  for seed in seeds:
    for m in methods:
      config, info = budget_config(s, m, steps, seed, evals=evals,
                                   min_last_evals=min_last_evals,
                                   overrides=overrides, variant=variant)
      workdir = os.path.join(root, m, str(seed))
      wall, trained = run_one(config, info, workdir)
      k += 1
      last = info["stages"][-1]
      hist = analysis.eval_history(stage_dir(root, m, seed, last))
      errs = results.stage_errors(hist, {}, "raw")
      log(f"[{k}/{n}] {m} seed {seed}: "
          + (f"trained in {wall:.0f} s" if trained else
             f"read back (trained in {wall:.0f} s)")
          + f", {sum(info['steps'].values())} steps; raw test error % at best "
          f"val {errs['at best val']:.2f}, final {errs['final']:.2f}"
          + f" ({workdir})", flush=True)
  check_splits(root, methods, seeds)
  log("Splits checked: every method of each seed trained on the same split.",
      flush=True)
  return time.time() - t0


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--setting", required=True, choices=sorted(SETTINGS))
  parser.add_argument("--methods", nargs="+", required=True)
  parser.add_argument("--steps", type=int, required=True,
                      help="training steps of every method (all its stages)")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--root", default=None,
                      help="where the runs go (default "
                      "/tmp/r2d2_jax/compare/NAME)")
  parser.add_argument("--override", action="append", default=[],
                      help="key=value, applied to every stage of every method "
                      "after the setting's forced values")
  parser.add_argument("--variant", default=None,
                      help="config variant passed to every method's config, "
                      "e.g. runlocal")
  parser.add_argument("--evals", type=int, default=25,
                      help="evaluations per stage (about)")
  parser.add_argument("--min-last-evals", type=int, default=20,
                      help="at least this many evaluations in a method's last "
                      "stage (20: the median of the last 20)")
  parser.add_argument("--weights", nargs="+", default=["raw"],
                      choices=results.WEIGHTS)
  parser.add_argument("--no-earlier-stages", action="store_true",
                      help="one row per method only")
  parser.add_argument("--name", default=None,
                      help="section name in docs/results.md and figure prefix "
                      "(default compare_SETTING)")
  parser.add_argument("--title", default=None)
  parser.add_argument("--write", action="store_true",
                      help="write the section into docs/results.md and the "
                      "plots into --figures")
  parser.add_argument("--figures", default=os.path.join(REPO, "docs",
                                                        "figures"))
  parser.add_argument("--results-md", default=os.path.join(REPO, "docs",
                                                           "results.md"))
  args = parser.parse_args(argv)
  name = args.name or f"compare_{args.setting}"
  root = args.root or os.path.join("/tmp/r2d2_jax/compare", name)
  wall = run_comparison(args.setting, args.methods, args.steps, args.seeds,
                        root, evals=args.evals,
                        min_last_evals=args.min_last_evals,
                        overrides=args.override, variant=args.variant)
  figures = link = None
  if args.write:
    figures = write_plots(root, args.methods, args.seeds, args.figures, name)
    link = os.path.relpath(args.figures, os.path.dirname(
        os.path.abspath(args.results_md)))
  command = shlex.join(["python", "-m", "benchmarks.compare",
                        *(sys.argv[1:] if argv is None else argv)])
  text = summary(root, args.methods, args.seeds, weights=args.weights,
                 earlier_stages=not args.no_earlier_stages,
                 title=args.title or f"Equal-budget comparison: {args.setting}",
                 command=command, wall_s=wall, figures=figures,
                 figure_dir_link=link)
  print(text)
  if args.write:
    report.write_section(name, text, path=args.results_md)
  return text


if __name__ == "__main__":
  main()
