"""Π-model and Temporal Ensembling: the update rules by hand, the sharded table, the trainer.

The float64 tests run the real, jitted `train_step` on a one-layer network and
compare every leaf of the new state with a reference written here from the
formulas (docs/algorithms.md, "Π-model and Temporal Ensembling"): the forward
by hand (BatchNorm included), the loss written out, its gradient by `jax.grad`,
SGD-Nesterov with coupled weight decay and the EMA by hand. The library's
`softmax_mse`, `bias_corrected`, `sigmoid_rampup` are not used by the
references.

Break checks (each line broken in r2d2_jax/methods/pi_model.py, the named
tests failed, the line restored):
  sigmoid_rampup  −5 → −4                   -> test_sigmoid_rampup_values,
                                               test_pi_step, test_te_step
  pi              stop_gradient on view b    -> test_pi_step
  pi              CE on view b (zb_l)        -> test_pi_step
  te              α^n → α^(n+1)              -> test_te_step,
                                               test_te_bias_correction_over_visits
  te              unvisited mask dropped     -> test_te_step,
                                               test_te_bias_correction_over_visits
  te              duplicates: p_mean → p     -> test_te_step
  (`first` → all rows is an equivalent mutant: duplicates write equal rows.)
  te              Z update (1−α)·p → α·p     -> test_te_step,
                                               test_te_bias_correction_over_visits
  te              visits + 1 → + 2           -> test_te_step
  te              state_sharding replicated  -> test_four_devices_equal_one_...
                                               [te_config]
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import pi_model
from r2d2_jax.state import TrainState
from tests import helpers

C, D = 4, 3
LR, WD, MOMENTUM, EMA = 0.125, 0.0625, 0.5, 0.75
BN_MOMENTUM, BN_EPS = 0.75, 1e-5
TOL = 1e-10


# ---------------------------------------------------------------------------
# A float64 network and its forward by hand (shared with test_mean_teacher)


class Net(nn.Module):
  """Optional BatchNorm, optional dropout, then one Dense layer; float64."""
  bn: bool = False
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(jnp.float64)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPS, dtype=jnp.float64,
                       param_dtype=jnp.float64)(x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(C, dtype=jnp.float64, param_dtype=jnp.float64)(x)


def ref_forward(params, model_state, x, train):
  """Net (no dropout) by hand: (logits, new model_state)."""
  x = jnp.reshape(x, (x.shape[0], -1))
  new_state = model_state
  if "BatchNorm_0" in params:
    old = model_state["batch_stats"]["BatchNorm_0"]
    if train:
      mean = jnp.mean(x, 0)
      var = jnp.mean((x - mean) ** 2, 0)
      new_state = {"batch_stats": {"BatchNorm_0": {
          "mean": BN_MOMENTUM * old["mean"] + (1 - BN_MOMENTUM) * mean,
          "var": BN_MOMENTUM * old["var"] + (1 - BN_MOMENTUM) * var}}}
    else:
      mean, var = old["mean"], old["var"]
    bn = params["BatchNorm_0"]
    x = (x - mean) / jnp.sqrt(var + BN_EPS) * bn["scale"] + bn["bias"]
  return x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"], new_state


def softmax(z):
  e = jnp.exp(z - jnp.max(z, -1, keepdims=True))
  return e / jnp.sum(e, -1, keepdims=True)


def ce(z, y):
  return jnp.mean(-jnp.sum(jnp.eye(C)[y] * jnp.log(softmax(z)), -1))


def ramp(t, T):
  return 1.0 if T == 0 else float(np.exp(-5.0 * (1.0 - min(t, T) / T) ** 2))


def tx(lr=LR):
  return optax.chain(optax.add_decayed_weights(WD),
                     optax.sgd(lr, momentum=MOMENTUM, nesterov=True))


def momentum_of(opt_state):
  return [x for x in jax.tree.leaves(opt_state)
          if jnp.issubdtype(x.dtype, jnp.floating)]


def ref_sgd(params, grads, trace):
  """Coupled weight decay, then Nesterov: (params', trace' as a list)."""
  leaves_p, tree = jax.tree.flatten(params)
  new_p, new_t = [], []
  for p, g, m in zip(leaves_p, jax.tree.leaves(grads), trace):
    g = g + WD * p
    m = g + MOMENTUM * m
    new_p.append(p - LR * (g + MOMENTUM * m))
    new_t.append(m)
  return jax.tree.unflatten(tree, new_p), new_t


def random_state(rng, bn=True, cls=TrainState, step=3, **extra):
  """A state mid-training (momentum ≠ 0, EMA ≠ params), float64."""
  n = lambda *s: jnp.asarray(rng.normal(size=s))
  params = {"Dense_0": {"kernel": n(D, C), "bias": 0.3 * n(C)}}
  model_state = {}
  if bn:
    params["BatchNorm_0"] = {"scale": 1 + 0.3 * n(D), "bias": 0.3 * n(D)}
    model_state = {"batch_stats": {"BatchNorm_0": {
        "mean": 0.3 * n(D), "var": jnp.asarray(rng.uniform(0.5, 2.0, D))}}}
  perturb = lambda t: jax.tree.map(lambda x: x + 0.1 * n(*x.shape), t)
  opt_state = jax.tree.map(
      lambda x: n(*x.shape) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tx().init(params))
  return cls(step=jnp.asarray(step, jnp.int32), params=params,
             model_state=model_state, opt_state=opt_state,
             ema_params=perturb(params),
             ema_model_state=jax.tree.map(jnp.abs, perturb(model_state)),
             **extra)


def make_ctx(config, model, mesh=None, lr=LR, num_train=0):
  return helpers.StepContext(config, model, tx(lr), lambda s: LR,
                             image_shape=(1, D, 1), num_classes=C,
                             num_train=num_train, mesh=mesh)


def run_step(fn, state, batch, ctx, key=1):
  return jax.jit(ctx.bind(fn))(state, batch, jax.random.key(key))


def assert_close(a, b, tol=TOL):
  chex.assert_trees_all_close(a, b, rtol=tol, atol=tol)


def check_network(new, old, loss, model_state=None):
  """params, momentum, model_state, EMA of params, step + 1; returns the loss.

  `loss(params) -> (value, model_state)` is the hand-written objective.
  """
  (value, ms), grads = jax.value_and_grad(loss, has_aux=True)(old.params)
  params, trace = ref_sgd(old.params, grads, momentum_of(old.opt_state))
  assert_close(new.params, params)
  assert_close(momentum_of(new.opt_state), trace)
  assert_close(new.model_state, ms if model_state is None else model_state)
  assert_close(new.ema_params, jax.tree.map(
      lambda e, p: EMA * e + (1 - EMA) * p, old.ema_params, params))
  assert int(new.step) == int(old.step) + 1
  return value


@pytest.fixture
def x64():
  """float64 for the update-rule tests; restored afterwards."""
  with jax.enable_x64(True):
    yield


# ---------------------------------------------------------------------------
# The ramp


def test_sigmoid_rampup_values():
  got = [float(pi_model.sigmoid_rampup(t, 8)) for t in (0, 2, 4, 8, 20)]
  want = [np.exp(-5.0), np.exp(-5 * 0.75 ** 2), np.exp(-1.25), 1.0, 1.0]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(pi_model.sigmoid_rampup(0, 0)) == 1.0
  assert float(pi_model.sigmoid_rampup(123, 0)) == 1.0


# ---------------------------------------------------------------------------
# Π-model


def pi_config(weight=3.0, ramp_steps=8):
  c = helpers.tiny_config("pi_model", ema_decay=EMA)
  c.pi_model = ml_collections.ConfigDict(dict(weight=weight,
                                              ramp_steps=ramp_steps))
  return c


def test_pi_step(x64):
  """L = CE(y, f(a_l)) + w(t)·mean (softmax f(a) − softmax f(b))², both trained."""
  rng = np.random.default_rng(0)
  cfg = pi_config()
  ctx = make_ctx(cfg, Net(bn=True))
  state = random_state(rng)
  x = lambda n: jnp.asarray(rng.normal(size=(n, D)))
  lab = {"weak": x(4), "weak_1": x(4), "label": jnp.asarray([0, 1, 3, 1]),
         "index": jnp.arange(4)}
  unl = {"weak": x(6), "weak_1": x(6), "label": jnp.zeros(6, jnp.int32),
         "index": jnp.arange(4, 10)}
  new, m = run_step(pi_model.pi_train_step, state, {"labeled": lab,
                                                    "unlabeled": unl}, ctx)
  w = 3.0 * ramp(3, 8)
  xs = jnp.concatenate([lab["weak"], unl["weak"], lab["weak_1"],
                        unl["weak_1"]])

  def loss(params):
    z, ms = ref_forward(params, state.model_state, xs, train=True)
    za, zb = z[:10], z[10:]
    cons = jnp.mean((softmax(za) - softmax(zb)) ** 2)
    return ce(za[:4], lab["label"]) + w * cons, ms

  total = check_network(new, state, loss)
  np.testing.assert_allclose(float(m["losses/total"]), float(total), rtol=1e-12)
  np.testing.assert_allclose(float(m["monitors/weight"]), w, rtol=1e-12)


# ---------------------------------------------------------------------------
# Temporal Ensembling


def te_config(weight=3.0, ramp_steps=8, decay=0.6):
  c = helpers.tiny_config("temporal_ensembling", ema_decay=EMA)
  c.temporal_ensembling = ml_collections.ConfigDict(dict(
      weight=weight, ramp_steps=ramp_steps, decay=decay))
  return c


def te_state(rng, z, n, mesh, bn=True):
  state = random_state(rng, bn=bn, cls=pi_model.TemporalEnsemblingState,
                       ensemble=jnp.asarray(z), visits=jnp.asarray(n, jnp.int32))
  return jax.device_put(state, pi_model.te_state_sharding(state, mesh))


def put_batch(batch, mesh):
  return jax.device_put(batch, NamedSharding(mesh, P("data")))


def test_te_step(x64):
  """Targets Z/(1 − α^n) where n > 0, masked elsewhere; Z, n of the batch's rows."""
  rng = np.random.default_rng(1)
  mesh = sharding.make_mesh(jax.devices()[:4])
  alpha = 0.6
  cfg = te_config(decay=alpha)
  ctx = make_ctx(cfg, Net(bn=True), mesh=mesh, num_train=12)
  z0 = rng.uniform(0.0, 0.5, (12, C))
  n0 = np.array([2, 0, 1, 3, 0, 5, 1, 0, 2, 2, 1, 4])
  state = te_state(rng, z0, n0, mesh)
  x = lambda k: jnp.asarray(rng.normal(size=(k, D)))
  # Row 5 twice in the unlabeled batch, row 1 (unvisited) in both streams.
  lab = {"weak": x(4), "label": jnp.asarray([0, 1, 3, 1], jnp.int32),
         "index": jnp.asarray([0, 1, 2, 3], jnp.int32)}
  unl = {"weak": x(4), "label": jnp.zeros(4, jnp.int32),
         "index": jnp.asarray([5, 1, 7, 5], jnp.int32)}
  batch = put_batch({"labeled": lab, "unlabeled": unl}, mesh)
  new, m = run_step(pi_model.te_train_step, state, batch, ctx)

  idx = np.concatenate([lab["index"], unl["index"]])
  xs = jnp.concatenate([lab["weak"], unl["weak"]])
  n_i = n0[idx]
  mask = (n_i > 0).astype(np.float64)
  target = np.where(mask[:, None] > 0,
                    z0[idx] / np.maximum(1 - alpha ** n_i, 1e-300)[:, None], 0)
  w = 3.0 * ramp(3, 8)

  def loss(params):
    z, ms = ref_forward(params, state.model_state, xs, train=True)
    cons = jnp.mean(mask * jnp.mean((softmax(z) - target) ** 2, -1))
    return ce(z[:4], lab["label"]) + w * cons, ms

  total = check_network(new, state, loss)
  np.testing.assert_allclose(float(m["losses/total"]), float(total), rtol=1e-12)
  z, _ = ref_forward(state.params, state.model_state, xs, train=True)
  p = np.asarray(softmax(z))
  z_want, n_want = z0.copy(), n0.copy()
  for row in sorted(set(idx.tolist())):
    p_row = p[idx == row].mean(0)   # rows 1 and 5 are met twice
    z_want[row] = alpha * z0[row] + (1 - alpha) * p_row
    n_want[row] += 1
  assert_close(np.asarray(new.ensemble), z_want)
  np.testing.assert_array_equal(np.asarray(new.visits), n_want)


def test_te_bias_correction_over_visits(x64):
  """After 1, 2, 3 visits the target is Σ α^(k−j)(1−α) p_j / (1 − α^k); unvisited rows add 0."""
  rng = np.random.default_rng(2)
  mesh = sharding.make_mesh(jax.devices()[:1])
  alpha, weight = 0.6, 2.0
  cfg = te_config(weight=weight, ramp_steps=0, decay=alpha)
  ctx = make_ctx(cfg, Net(bn=False), mesh=mesh, lr=0.0, num_train=16)
  z0 = np.zeros((16, C))
  z0[8:] = 1e6        # rows never visited: their (garbage) Z must not matter
  state = te_state(rng, z0, np.zeros(16), mesh, bn=False)
  step = jax.jit(ctx.bind(pi_model.te_train_step))
  params = state.params
  history = {0: [], 3: []}   # row 0 labeled, row 3 unlabeled, every step
  for k in range(4):
    x = jnp.asarray(rng.normal(size=(3, D)))
    lab = {"weak": x[:1], "label": jnp.asarray([2], jnp.int32),
           "index": jnp.asarray([0], jnp.int32)}
    # Row 3, then a row never seen before (8 + k).
    unl = {"weak": x[1:], "label": jnp.zeros(2, jnp.int32),
           "index": jnp.asarray([3, 8 + k], jnp.int32)}
    state, m = step(state, {"labeled": lab, "unlabeled": unl},
                    jax.random.key(k))
    z, _ = ref_forward(params, {}, x, train=True)
    p = np.asarray(softmax(z))
    errs = []
    for row, p_row in ((0, p[0]), (3, p[1])):
      seen = history[row]
      if seen:
        v = len(seen)
        target = sum(alpha ** (v - 1 - j) * (1 - alpha) * q
                     for j, q in enumerate(seen)) / (1 - alpha ** v)
        errs.append(np.mean((p_row - target) ** 2))
      seen.append(p_row)
    want = sum(errs) / 3.0   # the never-seen row counts 0 in the mean of 3
    np.testing.assert_allclose(float(m["losses/xeu"]), want, rtol=1e-10,
                               atol=1e-15)
    np.testing.assert_allclose(float(m["monitors/visited"]),
                               len(errs) / 3.0)
  assert int(state.visits[3]) == int(state.visits[0]) == 4
  assert int(state.visits[8]) == 1 and int(state.visits[12]) == 0
  assert_close(state.params, params)   # lr 0: the network did not move


# ---------------------------------------------------------------------------
# Through the trainer


def _stage(tmp_path, name, cfg, n_dev):
  return train.Stage(cfg, str(tmp_path / name),
                     mesh=sharding.make_mesh(jax.devices()[:n_dev]))


def _steps(stage, n):
  state = stage.init_state()
  batches = stage.pipeline.iterate(0, stage.streams)
  for _ in range(n):
    state, m = stage.train_step(state, next(batches))
  return state, jax.device_get(m)


def _tiny(cfg):
  cfg.data.uratio = 1
  cfg.total_steps, cfg.checkpoint_every_steps = 6, 3
  return cfg


@pytest.mark.parametrize("config", [pi_config, te_config])
def test_four_devices_equal_one_without_recompiling(tmp_path, config):
  cfg = _tiny(config(ramp_steps=2))
  s4, s1 = _stage(tmp_path, "four", cfg, 4), _stage(tmp_path, "one", cfg, 1)
  a, ma = _steps(s4, 3)
  b, mb = _steps(s1, 3)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access
  n = s1.task.num_train
  if isinstance(a, pi_model.TemporalEnsemblingState):
    # The table stays sharded along rows over the 4 devices.
    assert a.ensemble.sharding.spec == P("data", None)
    assert a.visits.sharding.spec == P("data")
    assert len(a.ensemble.sharding.device_set) == 4
    assert a.ensemble.shape[0] % 4 == 0
    chex.assert_trees_all_close(np.asarray(a.ensemble)[:n],
                                np.asarray(b.ensemble)[:n], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(a.visits)[:n],
                                  np.asarray(b.visits)[:n])
    assert 0 < int(np.sum(a.visits)) <= 3 * 32
  chex.assert_trees_all_close(jax.device_get(a.params),
                              jax.device_get(b.params), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(ma, mb, rtol=1e-5, atol=1e-6)


def test_te_resume_is_bitwise(tmp_path):
  train.train_and_evaluate(_tiny(te_config(ramp_steps=2)),
                           str(tmp_path / "straight"))
  stage = train.Stage(_tiny(te_config(ramp_steps=2)), str(tmp_path / "resumed"))
  stage.total_steps = 3   # as if killed after the step-3 save
  stage.run()
  train.train_and_evaluate(_tiny(te_config(ramp_steps=2)),
                           str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 6
  assert int(np.sum(a["visits"])) > 0
  chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------------------------
# Bad input and configs


@pytest.mark.parametrize("method,key,value,message", [
    ("pi_model", "weight", -1.0, r"weight=-1.0 is outside \[0.0, inf\]"),
    ("pi_model", "ramp_steps", 2.5, r"ramp_steps=2.5 must be an integer"),
    ("pi_model", "ramp_steps", -1, r"ramp_steps=-1 is outside \[0, inf\]"),
    ("pi_model", "decay", 0.5, r"unknown key\(s\) decay"),
    ("temporal_ensembling", "decay", 1.0, r"decay=1.0 is outside \[0.0, 1.0\)"),
    ("temporal_ensembling", "decay", -0.1, r"decay=-0.1 is outside"),
    ("temporal_ensembling", "weight", "big", r"weight='big' must be a number"),
])
def test_bad_hyperparameters_name_the_field(method, key, value, message):
  cfg = (pi_config if method == "pi_model" else te_config)()
  cfg[method] = ml_collections.ConfigDict({**cfg[method].to_dict(),
                                           key: value})
  with pytest.raises(R2D2Error, match=rf"config\.{method}: .*{message}"):
    pi_model.PI_MODEL.hparams(cfg) if method == "pi_model" else (
        pi_model.TEMPORAL_ENSEMBLING.hparams(cfg))


def test_missing_block_is_an_error():
  for method in (pi_model.PI_MODEL, pi_model.TEMPORAL_ENSEMBLING):
    with pytest.raises(R2D2Error, match=rf"config.{method.name} is missing"):
      method.hparams(helpers.tiny_config(method.name))


@pytest.mark.parametrize("name", ["pi_model_digits", "pi_model_mnist",
                                  "temporal_ensembling_digits",
                                  "temporal_ensembling_mnist"])
def test_configs_parse_and_follow_the_reference(name):
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(f"configs.{name}")
  for arg in (None, "runlocal"):
    c = mod.get_config(arg)
    method = pi_model.PI_MODEL if c.method == "pi_model" else (
        pi_model.TEMPORAL_ENSEMBLING)
    hp = method.hparams(c)
    assert c.data.uratio >= 1 and c.data.num_val > 0
  if c.method == "temporal_ensembling":
    assert hp.decay == 0.6    # tempens config.py `prediction_decay`
  assert mod.get_config().total_steps >= 2000
