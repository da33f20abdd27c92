"""Optimizer, model and method details the references use (docs/algorithms.md).

Each test runs the real step, hook or init_from on a tiny model and checks the
result against an expectation written out here, not against the library's own
helper: which leaves weight decay touches, channel-wise dropout and BatchNorm
momentum, the weak view's border fill, the UDA mask's softmax, R2-D2's
finetune labels and the MPL finetune's starting weights.
"""

import os
import shutil

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import methods
from r2d2_jax import models
from r2d2_jax import optim
from r2d2_jax import train
from r2d2_jax.data import augment
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import mpl
from r2d2_jax.methods import supervised
from r2d2_jax.methods import uda
from tests import helpers


class DenseBN(nn.Module):
  """Dense(+bias) → BatchNorm → tanh → Dense(+bias), the trainer's interface."""
  num_classes: int = 3
  rng_names = ()

  @nn.compact
  def __call__(self, x, *, train: bool):
    x = nn.Dense(5, name="hidden")(x)
    x = nn.BatchNorm(use_running_average=not train, name="norm")(x)
    return nn.Dense(self.num_classes, name="head")(jnp.tanh(x))


def _ctx(cfg, tx, lr, method=None):
  """What the trainer binds (net, task, hp) for `cfg`, on `DenseBN`."""
  return helpers.StepContext(
      cfg, DenseBN(), tx, lambda step: jnp.float32(lr), image_shape=(4,),
      num_classes=3, num_train=0, total_steps=10, steps_per_epoch=1,
      method=method)


def _batch(seed=0, n_l=6, n_u=8):
  rng = np.random.default_rng(seed)
  x = lambda n: jnp.asarray(rng.normal(size=(n, 4)) * 2, jnp.float32)
  y = lambda n: jnp.asarray(rng.integers(0, 3, n), jnp.int32)
  return {"labeled": {"weak": x(n_l), "label": y(n_l)},
          "unlabeled": {"weak": x(n_u), "strong": x(n_u), "label": y(n_u)}}


# Which leaves each mask decays, written out by hand for DenseBN.
DECAYED = {
    "all": {"hidden/kernel", "hidden/bias", "norm/scale", "norm/bias",
            "head/kernel", "head/bias"},
    "kernels": {"hidden/kernel", "head/kernel"},
    "no_bn": {"hidden/kernel", "hidden/bias", "head/kernel", "head/bias"},
    "no_bn_bias": {"hidden/kernel", "head/kernel"},
}


def _leaves(tree):
  return {"/".join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _decay_moves(mask, step_fn, wd=0.1, lr=0.5):
  """(θ_decayed − θ_plain) per leaf and θ0, from two real steps (wd vs 0)."""
  out = {}
  for w in (wd, 0.0):
    block = ml_collections.ConfigDict(dict(
        name="sgd", lr=lr, momentum=0.0, nesterov=False, weight_decay=w,
        decay_mask=mask, schedule=dict(name="constant")))
    out[w] = step_fn(block)
  (p0, new_wd), (_, new_0) = out[wd], out[0.0]
  return {k: _leaves(new_wd)[k] - _leaves(new_0)[k] for k in _leaves(p0)}, \
      _leaves(p0)


@pytest.mark.parametrize("mask", sorted(DECAYED))
def test_decay_mask_through_supervised_step(mask):
  """Coupled L2 on SGD: a decayed leaf moves by −lr·wd·θ more, others not at all."""
  def step(block):
    tx, schedule = optim.make_optimizer(block, 10)
    cfg = helpers.tiny_config()
    ctx = _ctx(cfg, tx, 0.5)
    state = ctx.bind(supervised.METHOD.init_state)(jax.random.key(0))
    step_fn = ctx.bind(supervised.train_step)
    new, _ = jax.jit(lambda s, b: step_fn(s, b, jax.random.key(1)))(
        state, _batch())
    return state.params, new.params

  moved, p0 = _decay_moves(mask, step)
  assert set(moved) == DECAYED["all"]
  for name, d in moved.items():
    expected = -0.5 * 0.1 * p0[name] if name in DECAYED[mask] else 0.0
    np.testing.assert_allclose(d, expected, atol=1e-6, err_msg=name)


def test_decay_mask_reaches_the_mpl_teacher():
  """`mpl.teacher_optimizer.decay_mask` applies to the teacher's real step."""
  def step(block):
    cfg = helpers.tiny_mpl_config()
    cfg.mpl.teacher_optimizer = block
    ctx = _ctx(cfg, optax.sgd(0.25), 0.25)
    state = ctx.bind(mpl.init_state)(jax.random.key(0))
    step_fn = ctx.bind(mpl.train_step)
    new, _ = jax.jit(lambda s, b: step_fn(s, b, jax.random.key(1)))(
        state, _batch())
    return state.teacher.params, new.teacher.params

  moved, p0 = _decay_moves("no_bn", step)
  for name, d in moved.items():
    expected = -0.5 * 0.1 * p0[name] if name in DECAYED["no_bn"] else 0.0
    np.testing.assert_allclose(d, expected, atol=1e-6, err_msg=name)


def test_decay_mask_on_real_models_and_bad_names():
  v = models.get_model("wrn28_2", 10).init(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)["params"]
  leaves = _leaves(optim.decay_mask("no_bn")(v))
  # Every BatchNorm leaf is spared, the classifier bias and every kernel decay.
  for name, keep in leaves.items():
    assert bool(keep) == ("bn" not in name.split("/")[-2]), name
  assert leaves["classifier/bias"] and leaves["stem/kernel"]
  assert not _leaves(optim.decay_mask("no_bn_bias")(v))["classifier/bias"]
  with pytest.raises(R2D2Error, match="all, kernels, no_bn, no_bn_bias"):
    optim.make_optimizer(ml_collections.ConfigDict(dict(
        name="sgd", lr=0.1, weight_decay=1e-4, decay_mask="kernel")), 10)


# ---------------------------------------------------------------------------
# ConvLarge as SemiMeta runs it; WRN's BatchNorm momentum


def test_convlarge_channel_dropout_and_batchnorm_settings():
  model = models.get_model("cnn13", 10, bn_momentum=0.9, bn_epsilon=1e-5,
                           channel_dropout=True)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  _, out = model.apply(variables, x, train=True, rngs={"dropout":
                                                       jax.random.key(2)},
                       mutable=["batch_stats", "intermediates"],
                       capture_intermediates=True)
  inter = out["intermediates"]
  # Dropout2d: each (example, channel) map is all zero or all kept × 2.
  pooled = nn.max_pool(inter["bn1c"]["__call__"][0], (2, 2), strides=(2, 2))
  pooled = nn.leaky_relu(pooled, 0.1)  # max-pool and LeakyReLU commute
  dropped = inter["Dropout_0"]["__call__"][0]
  zero = np.asarray(jnp.all(dropped == 0, axis=(1, 2)))
  kept = np.asarray(jnp.all(
      jnp.isclose(dropped, 2 * pooled, rtol=1e-4, atol=1e-5), axis=(1, 2)))
  assert (zero | kept).all() and zero.any() and kept.any()
  # BatchNorm: running mean ← 0.9·0 + 0.1·batch mean; y = (x − μ)/√(σ² + 1e-5).
  conv = inter["conv1a"]["__call__"][0]
  mean, var = conv.mean((0, 1, 2)), conv.var((0, 1, 2))
  np.testing.assert_allclose(out["batch_stats"]["bn1a"]["mean"], 0.1 * mean,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(inter["bn1a"]["__call__"][0],
                             (conv - mean) / jnp.sqrt(var + 1e-5),
                             rtol=1e-3, atol=1e-3)


def test_mpl_wrn_batchnorm_momentum_is_099():
  c = train.stage_config(_config("mpl_cifar10_4k"), "mpl")
  model = models.get_model(c.model.name, 10, **c.model.kwargs)
  x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
  variables = model.init(jax.random.key(1), x, train=False)
  _, out = model.apply(variables, x, train=True,
                       rngs={"dropout": jax.random.key(2)},
                       mutable=["batch_stats", "intermediates"],
                       capture_intermediates=True)
  stem = out["intermediates"]["stem"]["__call__"][0]
  np.testing.assert_allclose(
      out["batch_stats"]["stage1_block1"]["bn1"]["mean"],
      0.01 * stem.mean((0, 1, 2)), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# The weak view's border


def test_semimeta_weak_view_pads_with_black():
  weak = dict(_config("semimeta_cifar10_4k").data.augment.weak)
  weak["flip"] = False
  fn = augment.view_fn({"kind": "weak", **weak})
  img = jnp.full((32, 32, 3), 200.0)
  outs = np.stack([np.asarray(fn(jax.random.key(i), img)) for i in range(12)])
  assert set(np.unique(outs)) == {0.0, 200.0}   # shifted in: black, not 128
  # Shifts up to 4 px: at most 4 rows / columns exposed on each side.
  assert (outs[:, 4:28, 4:28] == 200.0).all()


# ---------------------------------------------------------------------------
# UDA: which softmax the confidence mask reads


def _uda_expected(ctx, state, batch, model_state, mask_on):
  """mask and consistency loss rebuilt from the train-mode forward pass."""
  cfg = ctx.config.uda
  lab, unl = batch["labeled"], batch["unlabeled"]
  x = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
  logits = ctx.model.apply({"params": state, **model_state}, x, train=True,
                           mutable=["batch_stats"])[0]
  n_l, n_u = lab["weak"].shape[0], unl["weak"].shape[0]
  w, s = logits[n_l:n_l + n_u], logits[n_l + n_u:]
  target = np.exp(w / cfg.temperature)
  target /= target.sum(-1, keepdims=True)
  plain = np.exp(w) / np.exp(w).sum(-1, keepdims=True)
  conf = target if mask_on == "sharpened" else plain
  mask = (conf.max(-1) >= cfg.threshold).astype(np.float32)
  log_q = s - jax.scipy.special.logsumexp(s, -1, keepdims=True)
  xe = -(target * log_q).sum(-1)
  return mask.mean(), float((mask * xe).mean()), plain, target


@pytest.mark.parametrize("method", ["uda", "mpl"])
@pytest.mark.parametrize("mask_on", ["sharpened", "unsharpened"])
def test_uda_mask_reads_the_configured_softmax(method, mask_on):
  cfg = helpers.tiny_mpl_config()
  cfg.uda.ramp_steps = 0
  cfg.uda.temperature = 0.4
  ctx = _ctx(cfg, optax.sgd(0.1), 0.1, method=method)
  init = uda.METHOD.init_state if method == "uda" else mpl.METHOD.init_state
  state = ctx.bind(init)(jax.random.key(0))
  net = state if method == "uda" else state.teacher
  batch = _batch(3)
  # A threshold between the two softmaxes' confidence on some rows, so that
  # the two masks differ.
  _, _, plain, sharp = _uda_expected(ctx, net.params, batch, net.model_state,
                                     "unsharpened")
  gap = sharp.max(-1) - plain.max(-1)
  i = int(np.argmax(gap))
  cfg.uda.threshold = float((sharp.max(-1)[i] + plain.max(-1)[i]) / 2)
  cfg.uda.mask_on = mask_on
  ctx = _ctx(cfg, optax.sgd(0.1), 0.1, method=method)  # hp parsed again
  step = ctx.bind(uda.train_step if method == "uda" else mpl.train_step)
  _, metrics = jax.jit(lambda s, b: step(s, b, jax.random.key(1)))(
      state, batch)
  want = {m: _uda_expected(ctx, net.params, batch, net.model_state, m)
          for m in ("sharpened", "unsharpened")}
  assert want["sharpened"][0] > want["unsharpened"][0]
  np.testing.assert_allclose(metrics["monitors/mask"], want[mask_on][0],
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["losses/xeu" if method == "uda"
                                     else "cross_entropy/teacher_on_u"],
                             want[mask_on][1], rtol=1e-4)


def test_unknown_uda_mask_on_is_an_error():
  cfg = helpers.tiny_mpl_config()
  cfg.uda.mask_on = "soft"
  with pytest.raises(R2D2Error, match="config.uda: mask_on='soft'.*"
                     "'sharpened', 'unsharpened'"):
    _ctx(cfg, optax.sgd(0.1), 0.1, method="uda")


# ---------------------------------------------------------------------------
# R2-D2's finetune labels


def _r2d2_pipeline():
  c = helpers.tiny_config()
  common.r2d2_stages(
      c, supervised=dict(total_steps=2), d2=dict(total_steps=2),
      r2=dict(total_steps=3, r2d2=dict(repredict_epochs=(0.0,))),
      finetune=dict(total_steps=1, data=dict(uratio=1)))
  c.data.uratio = 3
  c.checkpoint_every_steps = 1
  return c


def test_r2d2_finetune_trains_on_repredicted_or_table_labels(tmp_path):
  """'repredict': the R2 network's eval-mode logits on unlabeled rows, labeled
  rows logit 10 at their class; 'table': the table exactly as R2 left it."""
  c = _r2d2_pipeline()
  assert c.r2d2.finetune_labels == "repredict"
  work = str(tmp_path / "run")
  train.train_and_evaluate(c, work)
  r2, _ = ckpt_lib.restore_raw(os.path.join(work, "r2"))
  ft, _ = ckpt_lib.restore_raw(os.path.join(work, "finetune"))

  stage = train.Stage(train.stage_config(c, "finetune"),
                      str(tmp_path / "probe"))
  split = stage.pipeline.split
  images = stage.pipeline.train.images
  x = (np.asarray(images, np.float32) - np.asarray(stage.info.mean)) / \
      np.asarray(stage.info.std)
  logits = stage.net.model.apply({"params": r2["params"], **r2["model_state"]},
                                 jnp.asarray(x), train=False)
  unl = np.setdiff1d(split.unlabeled, split.labeled)
  np.testing.assert_allclose(ft["table"][unl], np.asarray(logits)[unl],
                             rtol=1e-4, atol=1e-4)
  labels = stage.pipeline.train.labels
  onehot = 10.0 * np.eye(stage.info.num_classes)[labels[split.labeled]]
  np.testing.assert_array_equal(ft["table"][split.labeled], onehot)
  # The R2 table had moved away from those predictions (its last D2 steps).
  assert np.abs(r2["table"][unl] - np.asarray(logits)[unl]).max() > 1e-3

  # 'table': rerun the finetune stage alone on the same R2 checkpoint.
  def without_finetune(name):
    out = str(tmp_path / name)
    shutil.copytree(work, out, ignore=lambda d, names: ["finetune"]
                    if os.path.abspath(d) == os.path.abspath(work) else [])
    return out
  other = without_finetune("table")
  c.r2d2.finetune_labels = "table"
  c.run_stages = "finetune"
  train.train_and_evaluate(c, other)
  ft_table, _ = ckpt_lib.restore_raw(os.path.join(other, "finetune"))
  np.testing.assert_array_equal(ft_table["table"], r2["table"])

  c.r2d2.finetune_labels = "argmax"
  with pytest.raises(R2D2Error, match="config.r2d2: finetune_labels='argmax'; "
                     "choose one of 'repredict', 'table'"):
    train.train_and_evaluate(c, without_finetune("bad"))


# ---------------------------------------------------------------------------
# MPL's finetune starts from the EMA student, without dropout


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_mpl_finetune_starts_from_the_chosen_student(which):
  cfg = helpers.tiny_mpl_config()
  cfg.mpl.finetune_from = which
  ctx = _ctx(cfg, optax.sgd(0.1), 0.1)
  prev = ctx.bind(mpl.init_state)(jax.random.key(0))
  shift = lambda t, d: jax.tree.map(lambda a: np.asarray(a) + d, t)
  student = {"params": shift(prev.student.params, 0.0),
             "model_state": shift(prev.student.model_state, 0.0),
             "ema_params": shift(prev.student.params, 0.5),
             "ema_model_state": shift(prev.student.model_state, 0.25)}
  previous = {"student": student, "teacher": jax.device_get(prev.teacher)}
  # The finetune stage's config still holds the mpl block (inherited).
  ft = _ctx(cfg, optax.sgd(0.1), 0.1, method="mpl_finetune")
  assert ft.hp.finetune_from == which
  fresh = ft.bind(mpl.FINETUNE.init_state)(jax.random.key(5))
  state = ft.bind(mpl.FINETUNE.init_from)(fresh, previous)
  src = "ema_" if which == "ema" else ""
  chex.assert_trees_all_close(state.params, student[src + "params"])
  chex.assert_trees_all_close(state.model_state,
                              student[src + "model_state"])
  chex.assert_trees_all_close(state.ema_params, student["ema_params"])
  # The step runs on the copied state (no buffer is donated twice).
  step_fn = ft.bind(mpl.FINETUNE.train_step)
  new, _ = jax.jit(lambda s, b: step_fn(s, b, jax.random.key(1)),
                   donate_argnums=(0,))(state, _batch())
  assert np.isfinite(np.asarray(new.params["head"]["kernel"])).all()

  cfg.mpl.finetune_from = "best"
  with pytest.raises(R2D2Error, match="finetune_from='best'.*'ema', 'raw'"):
    _ctx(cfg, optax.sgd(0.1), 0.1, method="mpl_finetune")


def test_mpl_baseline_name_is_checked():
  cfg = helpers.tiny_mpl_config()
  cfg.mpl.baseline = "before"
  with pytest.raises(R2D2Error,
                     match="config.mpl: baseline='before'.*'updated'"):
    _ctx(cfg, optax.sgd(0.1), 0.1)


# ---------------------------------------------------------------------------
# What each paper config states


def _config(name, arg=None):
  import importlib
  return importlib.import_module(f"configs.{name}").get_config(arg)


@pytest.mark.parametrize("name", ["mpl_cifar10_4k", "mpl_imagenet10",
                                  "mpl_digits", "mpl_mnist"])
def test_mpl_configs_state_the_reference_details(name):
  c = _config(name)
  m, ft = (train.stage_config(c, s) for s in ("mpl", "finetune"))
  assert m.optimizer.decay_mask == "no_bn"
  assert m.mpl.teacher_optimizer.decay_mask == "no_bn"
  assert m.uda.mask_on == "sharpened"
  assert (m.mpl.baseline, m.mpl.finetune_from) == ("updated", "ema")
  if "dropout_rate" in m.model.kwargs or name == "mpl_digits":
    assert ft.model.kwargs.dropout_rate == 0.0
  if name in ("mpl_cifar10_4k", "mpl_imagenet10"):
    assert m.model.kwargs.bn_momentum == 0.99
  if name == "mpl_cifar10_4k":
    assert m.model.kwargs.dropout_rate == 0.2
  for arg in (None, "runlocal"):   # every stage builds its model
    cc = _config(name, arg)
    for s in cc.stage_order:
      sc = train.stage_config(cc, s)
      models.get_model(sc.model.name, 10, **sc.model.kwargs)


def test_uda_semimeta_and_r2d2_configs_state_the_reference_details():
  u = _config("uda_cifar10_4k")
  assert (u.uda.mask_on, u.optimizer.decay_mask) == ("sharpened", "no_bn")
  assert u.model.kwargs.bn_momentum == 0.99
  s = _config("semimeta_cifar10_4k")
  assert s.optimizer.decay_mask == "all"
  assert dict(s.model.kwargs) == dict(bn_momentum=0.9, bn_epsilon=1e-5,
                                      channel_dropout=True)
  w = s.data.augment.weak
  assert (w.translate, w.pad_mode, w.pad_fill, w.flip) == (4, "constant", 0.0,
                                                           True)
  assert _config("semimeta_imagenet10").optimizer.decay_mask == "all"
  for name in ("r2d2_cifar10_4k", "r2d2_cifar100_10k", "r2d2_svhn_1k",
               "r2d2_imagenet10", "r2d2_digits"):
    c = _config(name)
    assert c.r2d2.finetune_labels == "repredict"
    for stage in c.stage_order:
      assert train.stage_config(c, stage).optimizer.decay_mask == "all"
