"""VAT (r2d2_jax/methods/vat.py): the power iteration, the step by hand, the trainer, configs.

The step test runs the real, jitted `train_step` on a float64 network (input
noise, BatchNorm, one dense layer) and compares every leaf of the new state
with a reference written here from docs/algorithms.md, "VAT": the forward and
BatchNorm by hand, the normalisation, the power iteration, the KL, the entropy
and plain SGD, with gradients by `jax.grad` of those hand-written functions.
Only the step's key names (`vat.step_keys`) and the direction's draw from its
key (a normal of x's shape) are shared with the method.

Break checks (each line below was temporarily broken in vat.py, the tests
named ran and failed, then the line was restored):

  `normalize` without the max-abs division's 1e-12
                 -> test_vat_loss_is_zero_for_a_constant_classifier (NaN)
  `normalize` over the batch axis too (axes from 0)
                 -> test_direction_is_the_top_eigenvector_of_the_kl_hessian,
                    test_vat_step[*]
  the power iteration's step `xi * normalize(d)` -> `normalize(d)` (ξ dropped)
                 -> test_vat_step[two_iterations]
  the target p(x_u) not stopped in the VAT KL (gradient through it)
                 -> test_vat_step[*]
  the entropy read from stop_gradient(logits_u)
                 -> test_vat_step[entmin], [two_iterations]
  the forward at x_u + r_adv with another key (another noise draw)
                 -> test_vat_step[*]
  unlabeled batch also in `one_network_step`'s forward (BN statistics from
  labeled + unlabeled)
                 -> test_vat_step[*] (model_state)
  `weight_at` ramp ignored (weight used as is)
                 -> test_vat_step[ramp]
  `num_iters` check `check_range(..., 0, ...)`
                 -> test_bad_hyperparameters_are_clear_errors[num_iters]
  the power iteration's loop `range(1)` (num_iters ignored)
                 -> test_direction_is_the_top_eigenvector_of_the_kl_hessian,
                    test_vat_step[two_iterations]
  the power iteration's gradient not stopped (a gradient through r_adv)
                 -> test_vat_step[*]
  mlp.py: the noise added after the ReLU instead of before it; the noise
  without its std factor; the top BatchNorm skipped; the classifier bias kept
  with top_bn   -> test_mlp_noise_and_top_bn_by_hand[*]
  vat_mnist: :pseudo_label's ramp_end_steps at 50 % of the steps
                 -> test_mnist_baseline_variants_share_the_setting
"""

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import common
from configs import vat_cifar10
from configs import vat_digits
from configs import vat_mnist
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import methods
from r2d2_jax import optim
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import interface as data_interface
from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import vat
from r2d2_jax.state import TrainState
from tests import helpers

C, D = 4, 3                # classes, input features
LR = 0.125
EMA = 0.75
BN_MOMENTUM = 0.75
BN_EPS = 1e-5
NOISE = 0.1                # the test network's input noise (train mode)
TOL = 1e-10


# ---------------------------------------------------------------------------
# The power iteration on a linear softmax model


def _kl(p_logits, q_logits):
  """mean_i Σ_c p (log p − log q)."""
  log_p = jax.nn.log_softmax(p_logits)
  return jnp.mean(jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(q_logits)), -1))


def _entropy(logits):
  log_p = jax.nn.log_softmax(logits)
  return jnp.mean(-jnp.sum(jnp.exp(log_p) * log_p, -1))


def _normalize(d):
  """Per row: d / (1e-12 + max|d|), then / sqrt(1e-6 + Σ d²) (vat_tf)."""
  flat = d.reshape(d.shape[0], -1)
  flat = flat / (1e-12 + jnp.max(jnp.abs(flat), -1, keepdims=True))
  flat = flat / jnp.sqrt(1e-6 + jnp.sum(flat ** 2, -1, keepdims=True))
  return flat.reshape(d.shape)


def test_direction_is_the_top_eigenvector_of_the_kl_hessian():
  """z = xK + b: ∇²_r KL(p(x) ‖ p(x + r)) at 0 is K (diag p − ppᵀ) Kᵀ per row."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    n, din, classes = 6, 5, 4
    kernel = jnp.asarray(rng.normal(size=(din, classes)) * 2.0)
    bias = jnp.asarray(rng.normal(size=classes))
    x = jnp.asarray(rng.normal(size=(n, din)))
    logits_fn = lambda z: z @ kernel + bias
    top = []
    for i in range(n):
      p = np.asarray(jax.nn.softmax(logits_fn(x[i:i + 1]))[0])
      hess = np.asarray(kernel) @ (np.diag(p) - np.outer(p, p)) @ np.asarray(kernel).T
      _, vecs = np.linalg.eigh(hess)
      top.append(vecs[:, -1])
    top = np.stack(top)

    def cosines(num_iters):
      r = vat.adversarial_perturbation(logits_fn, x, logits_fn(x),
                                       jax.random.key(3), epsilon=2.5,
                                       xi=1e-6, num_iters=num_iters)
      np.testing.assert_allclose(np.linalg.norm(np.asarray(r), axis=1), 2.5,
                                 rtol=1e-6)
      return np.abs(np.sum(np.asarray(r) / 2.5 * top, -1))

    assert cosines(60).min() > 0.99
    # Not vacuous: one iteration is not yet there for every row.
    assert cosines(1).min() < 0.99


def test_vat_loss_is_zero_for_a_constant_classifier():
  """Kernel 0: the logits ignore x, the KL is 0 at every r and r_adv is 0 (no NaN)."""
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, D)))
    logits_fn = lambda z: z @ jnp.zeros((D, C)) + jnp.arange(C, dtype=z.dtype)
    r = vat.adversarial_perturbation(logits_fn, x, logits_fn(x),
                                     jax.random.key(0), epsilon=2.0, xi=1e-6,
                                     num_iters=1)
    assert np.all(np.asarray(r) == 0.0)
    cfg = _config()
    ctx = _ctx(cfg, Net(bn=False, noise=False))
    state = _state(np.random.default_rng(2), ctx.tx, bn=False)
    state = state.replace(params={"Dense_0": {
        "kernel": jnp.zeros((D, C)), "bias": jnp.arange(C, dtype=jnp.float64)}})
    _, m = jax.jit(ctx.bind(vat.train_step))(state, _batch(np.random.default_rng(3)),
                                             jax.random.key(1))
    assert float(m["losses/xeu"]) == 0.0 and float(m["monitors/r_adv_norm"]) == 0.0
    assert all(np.isfinite(float(v)) for v in m.values())


# ---------------------------------------------------------------------------
# The step through the real train_step, float64


class Net(nn.Module):
  """Input noise (train mode), optional BatchNorm, one dense layer; float64."""
  bn: bool = True
  noise: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(jnp.float64)
    if train and self.noise:
      x = x + NOISE * jax.random.normal(self.make_rng("dropout"), x.shape,
                                        jnp.float64)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPS, dtype=jnp.float64,
                       param_dtype=jnp.float64)(x)
    return nn.Dense(C, dtype=jnp.float64, param_dtype=jnp.float64)(x)


class _Noise(nn.Module):
  """The noise Net draws (a root module's first `make_rng`, like Net's)."""

  @nn.compact
  def __call__(self, x):
    return NOISE * jax.random.normal(self.make_rng("dropout"), x.shape,
                                     jnp.float64)


def noise_of(key, x):
  """Net's train-mode noise for the forward given `key` (Network.rngs: fold_in 0)."""
  return _Noise().apply({}, x, rngs={"dropout": jax.random.fold_in(key, 0)})


def ref_forward(params, model_state, x, noise):
  """Net in train mode by hand: (logits, new model_state)."""
  x = x.reshape((x.shape[0], -1)) + noise
  mean = jnp.mean(x, 0)
  var = jnp.mean((x - mean) ** 2, 0)
  old = model_state["batch_stats"]["BatchNorm_0"]
  new_state = {"batch_stats": {"BatchNorm_0": {
      "mean": BN_MOMENTUM * old["mean"] + (1 - BN_MOMENTUM) * mean,
      "var": BN_MOMENTUM * old["var"] + (1 - BN_MOMENTUM) * var}}}
  bn = params["BatchNorm_0"]
  x = (x - mean) / jnp.sqrt(var + BN_EPS) * bn["scale"] + bn["bias"]
  return x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"], new_state


def _config(**vat_kwargs):
  cfg = helpers.tiny_config("vat", ema_decay=EMA)
  cfg.data.uratio = 2
  cfg.vat = vat_cifar10.vat_block(**{"epsilon": 1.5, **vat_kwargs})
  return cfg


def _ctx(cfg, model):
  return helpers.StepContext(
      cfg, model, optax.sgd(LR), lambda step: jnp.asarray(LR, jnp.float64),
      image_shape=(1, D, 1), num_classes=C)


def _state(rng, tx, bn=True, step=1):
  n = lambda *s: jnp.asarray(rng.normal(size=s))
  params = {"Dense_0": {"kernel": 1.5 * n(D, C), "bias": 0.3 * n(C)}}
  model_state = {}
  if bn:
    params["BatchNorm_0"] = {"scale": 1 + 0.3 * n(D), "bias": 0.3 * n(D)}
    model_state = {"batch_stats": {"BatchNorm_0": {
        "mean": 0.3 * n(D), "var": jnp.asarray(rng.uniform(0.5, 2.0, D))}}}
  perturb = lambda t: jax.tree.map(lambda a: a + 0.1 * n(*a.shape), t)
  return TrainState(step=jnp.asarray(step, jnp.int32), params=params,
                    model_state=model_state, opt_state=tx.init(params),
                    ema_params=perturb(params),
                    ema_model_state=jax.tree.map(jnp.abs, perturb(model_state)))


def _batch(rng, n_l=4, n_u=8):
  x = lambda n: jnp.asarray(rng.normal(size=(n, D)))
  y = lambda n: jnp.asarray(rng.integers(0, C, n), jnp.int32)
  return {"labeled": {"weak": x(n_l), "label": y(n_l),
                      "index": jnp.arange(n_l, dtype=jnp.int32)},
          "unlabeled": {"weak": x(n_u), "label": y(n_u),
                        "index": jnp.arange(n_u, dtype=jnp.int32)}}


STEP_CASES = {
    "vat": dict(),
    "entmin": dict(entmin_weight=0.5),
    "two_iterations": dict(num_iters=2, xi=0.25, entmin_weight=1.0),
    "ramp": dict(ramp_steps=4, weight=2.0),
}


@pytest.mark.parametrize("case", list(STEP_CASES), ids=list(STEP_CASES))
def test_vat_step(case):
  """θ' = θ − lr ∇θ [CE + w·KL(p̂(x_u) ‖ p(x_u + r_adv)) + β·H(p(x_u))], r_adv fixed.

  BatchNorm's running statistics move with the labeled batch only; the three
  unlabeled forwards share one noise draw; the EMA follows.
  """
  with jax.enable_x64(True):
    rng = np.random.default_rng(7)
    cfg = _config(**STEP_CASES[case])
    ctx = _ctx(cfg, Net())
    state = _state(rng, ctx.tx)
    batch = _batch(rng)
    key = jax.random.key(11)
    new, m = jax.jit(ctx.bind(vat.train_step))(state, batch, key)

    h = cfg.vat
    lab, unl = batch["labeled"], batch["unlabeled"]
    keys = vat.step_keys(key)
    noise_l = noise_of(keys["labeled"], lab["weak"])
    noise_u = noise_of(keys["unlabeled"], unl["weak"])
    ms = state.model_state
    fwd_u = lambda p, x: ref_forward(p, ms, x, noise_u)[0]
    x_u = unl["weak"]

    # r_adv from the step's parameters, then held fixed.
    z_u = fwd_u(state.params, x_u)
    d = jax.random.normal(keys["direction"], x_u.shape, jnp.float64)
    for _ in range(h.num_iters):
      d = jax.grad(lambda r: _kl(z_u, fwd_u(state.params, x_u + r)))(
          h.xi * _normalize(d))
    r_adv = h.epsilon * _normalize(d)
    w = h.weight * (min(1.0, int(state.step) / h.ramp_steps)
                    if h.ramp_steps else 1.0)

    def loss(params):
      z_l, new_ms = ref_forward(params, ms, lab["weak"], noise_l)
      z_u = fwd_u(params, x_u)
      xe = jnp.mean(-jnp.sum(jax.nn.one_hot(lab["label"], C) *
                             jax.nn.log_softmax(z_l), -1))
      kl = _kl(jax.lax.stop_gradient(z_u), fwd_u(params, x_u + r_adv))
      ent = _entropy(z_u)
      return xe + w * kl + h.entmin_weight * ent, (new_ms, xe, kl, ent)

    (total, (new_ms, xe, kl, ent)), grads = jax.value_and_grad(
        loss, has_aux=True)(state.params)
    params = jax.tree.map(lambda p, g: p - LR * g, state.params, grads)
    ema = lambda e, p: EMA * e + (1 - EMA) * p
    close = lambda a, b: chex.assert_trees_all_close(a, b, rtol=TOL, atol=TOL)
    close(new.params, params)
    close(new.model_state, new_ms)
    close(new.ema_params, jax.tree.map(ema, state.ema_params, params))
    close(new.ema_model_state, jax.tree.map(ema, state.ema_model_state, new_ms))
    for name, value in (("losses/total", total), ("losses/xe", xe),
                        ("losses/xeu", kl), ("losses/entmin", ent),
                        ("monitors/weight", w)):
      np.testing.assert_allclose(float(m[name]), float(value), rtol=1e-9,
                                 err_msg=name)
    np.testing.assert_allclose(float(m["monitors/r_adv_norm"]), h.epsilon,
                               rtol=1e-6)
    # Not vacuous: the VAT term is on and moves the parameters.
    assert float(kl) > 1e-4
    g_vat = jax.grad(lambda p: _kl(jax.lax.stop_gradient(z_u),
                                   fwd_u(p, x_u + r_adv)))(state.params)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g_vat)) > 1e-3


# ---------------------------------------------------------------------------
# Bad input


def _bad(field, value):
  cfg = _config()
  if field == "data.uratio":
    cfg.data.uratio = value
  elif field == "missing":
    del cfg["vat"]
  else:  # a new block: ConfigDict keeps a field's type on assignment
    block = cfg.vat.to_dict()
    block[field] = value
    cfg.vat = ml_collections.ConfigDict(block)
  return cfg


@pytest.mark.parametrize("field,value,match", [
    ("epsilon", 0.0, r"config\.vat: epsilon=0\.0 is outside \(0\.0, inf\]"),
    ("xi", -1e-6, r"config\.vat: xi=-1e-06 is outside \(0\.0, inf\]"),
    ("num_iters", 0, r"config\.vat: num_iters=0 is outside \[1, inf\]"),
    ("num_iters", 1.5, r"num_iters=1\.5 must be an integer"),
    ("weight", -1.0, r"weight=-1\.0 is outside \[0\.0, inf\]"),
    ("entmin_weight", -0.5, r"entmin_weight=-0\.5 is outside \[0\.0, inf\]"),
    ("ramp_steps", -1, r"ramp_steps=-1 is outside \[0, inf\]"),
    ("epsillon", 1.0, r"unknown key\(s\) epsillon\. VatHparams has: epsilon"),
    ("data.uratio", 0, r"config\.data\.uratio=0: VAT trains on an unlabeled batch"),
    ("missing", None, r"config\.vat is missing"),
], ids=["epsilon", "xi", "num_iters", "num_iters_int", "weight", "entmin",
        "ramp", "unknown", "uratio", "missing"])
def test_bad_hyperparameters_are_clear_errors(field, value, match):
  with pytest.raises(R2D2Error, match=match):
    vat.hparams(_bad(field, value))


def test_missing_epsilon_is_named():
  cfg = _config()
  del cfg.vat["epsilon"]
  with pytest.raises(R2D2Error, match=r"config\.vat: missing key\(s\) epsilon"):
    vat.hparams(cfg)


# ---------------------------------------------------------------------------
# Through the trainer: devices, compilation, resume


def _tiny(**overrides):
  c = helpers.tiny_config("vat", **overrides)
  c.model.name = "mlp_mnist"
  c.model.kwargs = ml_collections.ConfigDict(dict(widths=(16,)))
  c.data.uratio = 2
  # ξ well above float32 resolution, so 4 and 1 devices' reductions (summed
  # in different orders) give the same direction.
  c.vat = vat_cifar10.vat_block(epsilon=2.0, xi=1e-2, entmin_weight=0.5)
  return c


def _run(stage, n):
  state = stage.init_state()
  batches = stage.pipeline.iterate(0, stage.streams)
  out = []
  for _ in range(n):
    state, m = stage.train_step(state, next(batches))
    out.append(m)
  return state, out


def test_four_devices_equal_one_without_recompiling(tmp_path, monkeypatch):
  monkeypatch.setitem(methods.METHODS, "vat", vat.METHOD)
  results = []
  for name, n_dev in (("four", 4), ("one", 1)):
    stage = train.Stage(_tiny(), str(tmp_path / name),
                        mesh=sharding.make_mesh(jax.devices()[:n_dev]))
    state, ms = _run(stage, 3)
    assert stage.train_step._cache_size() == 1  # pylint: disable=protected-access
    results.append((jax.device_get(state), jax.device_get(ms)))
  (s4, m4), (s1, m1) = results
  # Float32 sums in another order. The power iteration's gradient at
  # r = ξd with ξ = 1e-6 amplifies that round-off in the adversarial direction
  # (seen: 5e-4 relative on a momentum leaf, depending on the CPU's vector
  # units), so the tolerance is wider than the MPL / UDA tests' 1e-4.
  chex.assert_trees_all_close(s4, s1, rtol=2e-3, atol=5e-5)
  for a, b in zip(m4, m1):
    chex.assert_trees_all_close(a, b, rtol=2e-3, atol=5e-5)
  assert {"losses/xe", "losses/xeu", "losses/entmin", "losses/total",
          "monitors/pseudo_label_accuracy", "monitors/r_adv_norm",
          "accuracy/train", "l2_updates"} <= set(m4[-1])
  assert float(m4[-1]["losses/xeu"]) > 0.0


@pytest.mark.parametrize("b1_switch", [False, True])
def test_resume_continues_bitwise(tmp_path, monkeypatch, b1_switch):
  monkeypatch.setitem(methods.METHODS, "vat", vat.METHOD)
  c = _tiny(total_steps=6, checkpoint_every_steps=3)
  if b1_switch:   # vat_tf's Adam with β1 scheduled (optax hyperparams state)
    vat_cifar10.adam(c, lr=0.01)
    vat_cifar10.decay_b1(c, decay_start_epoch=2, steps_per_epoch=2)
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  stage = train.Stage(c, str(tmp_path / "resumed"))
  stage.total_steps = 3  # stop early, as if killed after the step-3 save
  stage.run()
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 6
  chex.assert_trees_all_equal(a, b)


# ---------------------------------------------------------------------------
# Configs against the references, value by value


def _check_vat_tf_schedule(c, lr, epochs, decay_start, per_epoch):
  """vat_tf `train_semisup.py`: lr per epoch ep ≥ E0 is lr · (E − ep) / (E − E0)."""
  assert c.total_steps == epochs * per_epoch
  schedule = optim.make_schedule(c.optimizer.lr, c.optimizer.schedule,
                                 c.total_steps)
  ep = np.arange(epochs)
  want = np.where(ep < decay_start, lr,
                  lr * (epochs - ep) / (epochs - decay_start))
  for first_or_last in (0, per_epoch - 1):   # every step of an epoch
    got = np.asarray(schedule(ep * per_epoch + first_or_last))
    np.testing.assert_allclose(got, want, rtol=1e-5)


def _check_b1_switch(c, at):
  """vat_tf feeds β1 = mom1 = 0.9 before the first decay epoch, mom2 = 0.5 from it."""
  b1 = optim.b1_schedule(c.optimizer.b1, c.optimizer.b1_schedule)
  np.testing.assert_allclose([b1(0), b1(at - 1), b1(at), b1(c.total_steps)],
                             [0.9, 0.9, 0.5, 0.5])


def _check_adam(c, lr):
  o = c.optimizer
  assert (o.name, o.lr, o.b1, o.b2, o.weight_decay, o.grad_clip_norm) == (
      "adam", lr, 0.9, 0.999, 0.0, 0.0)


def test_mnist_config_matches_the_reference():
  """The TPAMI PI-MNIST-100 setting as configs/vat_mnist.py documents it."""
  c = vat_mnist.get_config()
  assert c.method == "vat" and c.model.name == "mlp_mnist"
  assert tuple(c.model.kwargs.widths) == (1200, 600, 300, 150)   # 784-…-10
  assert c.model.kwargs.bn_momentum == 0.99                     # layers.py
  assert c.model.kwargs.noise_std == 0.5 and c.model.kwargs.top_bn  # issue #3
  d = c.data
  assert (d.dataset, d.num_labels, d.num_val, d.unlabeled) == (
      "mnist", 100, 1000, "all")
  assert (d.batch_size, d.uratio) == (64, 4)
  assert d.augment.weak.translate == 0 and not d.augment.weak.flip
  scale = 255.0 / sources.DATASETS["mnist"].std[0]              # [0, 1] -> ours
  assert vat_mnist.PIXEL_TO_INPUT == pytest.approx(scale)
  v = c.vat
  assert v.epsilon == pytest.approx(5.0 * scale)                # issue #3
  assert v.xi == pytest.approx(1e-6 * scale)
  assert (v.num_iters, v.weight, v.entmin_weight, v.ramp_steps) == (1, 1.0, 0.0, 0)
  _check_adam(c, 0.002)
  _check_vat_tf_schedule(c, 0.002, epochs=120, decay_start=80, per_epoch=400)
  assert c.ema_decay == 0.0 and c.label_smoothing == 0.0


def test_cifar10_config_matches_vat_tf():
  """vat_tf README (CIFAR-10, aug + entmin) with train_semisup/cnn/layers defaults."""
  c = vat_cifar10.get_config()
  assert c.method == "vat" and c.model.name == "cnn13"
  k = c.model.kwargs
  assert (k.dropout_rate, k.bn_momentum, k.bn_epsilon, k.channel_dropout) == (
      0.5, 0.99, 1e-6, False)
  d = c.data
  assert (d.dataset, d.num_labels, d.unlabeled, d.batch_size, d.uratio) == (
      "cifar10", 4000, "all", 32, 4)
  w = d.augment.weak
  assert (w.translate, w.flip, w.pad_mode) == (2, True, "constant")
  v = c.vat
  assert (v.epsilon, v.xi, v.num_iters, v.weight, v.entmin_weight) == (
      8.0, 1e-6, 1, 1.0, 1.0)
  _check_adam(c, 1e-3)
  _check_vat_tf_schedule(c, 1e-3, epochs=500, decay_start=460, per_epoch=400)
  _check_b1_switch(c, at=460 * 400)                 # mom2 from epoch 460
  assert c.ema_decay == 0.0


def test_digits_config():
  c = vat_digits.get_config()
  ref = common.base_config()
  common.digits_setup(ref)
  for k in ("model.name", "data.dataset", "data.num_labels", "data.num_val",
            "data.batch_size", "data.uratio", "data.augment.weak.translate"):
    node_c, node_r = c, ref
    for part in k.split("."):
      node_c, node_r = node_c[part], node_r[part]
    assert node_c == node_r, k
  assert (c.total_steps, c.eval_every_steps, c.log_every_steps) == (2000, 80, 100)
  assert c.vat.epsilon == vat_digits.EPSILON and c.vat.xi == 1e-6
  _check_vat_tf_schedule(c, 0.002, epochs=20, decay_start=13, per_epoch=100)


@pytest.mark.parametrize("module", [vat_digits, vat_mnist, vat_cifar10])
def test_config_variants(module):
  small = module.get_config("runlocal")
  assert small.total_steps <= 6
  vat.hparams(small)
  with pytest.raises(ValueError, match="Unknown variant"):
    module.get_config("nope")


def test_mnist_baseline_variants_share_the_setting():
  """:supervised and :pseudo_label change the method and nothing else."""
  base = vat_mnist.get_config().to_dict()
  for variant, method in (("supervised", "supervised"),
                          ("pseudo_label", "pseudo_label")):
    c = vat_mnist.get_config(variant)
    assert c.method == method
    other = c.to_dict()
    other.pop("pseudo_label", None)
    assert {k: v for k, v in other.items() if k != "method"} == {
        k: v for k, v in base.items() if k != "method"}
  pl = vat_mnist.get_config("pseudo_label").pseudo_label
  assert (pl.weight, pl.ramp_start_steps, pl.ramp_end_steps, pl.threshold) == (
      3.0, 4800, 19200, 0.0)
  methods.get_method("pseudo_label").hparams(vat_mnist.get_config("pseudo_label"))
  small = vat_mnist.get_config("pseudo_label,runlocal")
  assert small.total_steps <= 6 and small.method == "pseudo_label"


def test_mnist_ablation_variants_change_one_thing():
  """:b1_decay is vat_tf's β1 switch, :batch100 takerum/vat's 100 + 250 batch."""
  base = vat_mnist.get_config()
  assert base.optimizer.get("b1_schedule") is None   # the 3-seed table's setting
  c = vat_mnist.get_config("b1_decay")
  _check_b1_switch(c, at=80 * 400)
  d = c.to_dict()
  del d["optimizer"]["b1_schedule"]
  assert d == base.to_dict()
  c = vat_mnist.get_config("batch100")
  mesh = sharding.make_mesh(jax.devices()[:1])
  assert data_interface.batch_sizes(c.data, mesh) == (100, 250)
  d = c.to_dict()
  d["data"].update(batch_size=64, uratio=4)
  assert d == base.to_dict()
  small = vat_mnist.get_config("b1_decay,batch100,runlocal")
  _check_b1_switch(small, at=3)
  # :bn_unlabeled changes the evaluations only.
  assert base.eval_bn_stats == "trained"
  d = vat_mnist.get_config("bn_unlabeled").to_dict()
  assert d.pop("eval_bn_stats") == "unlabeled"
  base_d = base.to_dict()
  base_d.pop("eval_bn_stats")
  assert d == base_d


@pytest.mark.parametrize("top_bn", [False, True])
def test_mlp_noise_and_top_bn_by_hand(monkeypatch, top_bn):
  """mlp_mnist's noise (after each hidden BatchNorm, before the ReLU, train
  mode only) and its top BatchNorm, against a forward written here."""
  from r2d2_jax.models import mlp   # pylint: disable=g-import-not-at-top
  widths, std, eps = (5, 4), 0.5, 1e-5
  model = mlp.MLP(num_classes=3, widths=widths, noise_std=std, top_bn=top_bn)
  x = jax.random.normal(jax.random.key(0), (6, 2, 2, 1))
  variables = model.init({"params": jax.random.key(1),
                          "dropout": jax.random.key(2)}, x, train=False)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(
      jax.random.key(3), p.shape), variables["params"])
  variables = {**variables, "params": params}
  draws = []

  def fake_normal(key, shape, dtype=jnp.float32):
    del key
    z = np.random.default_rng(len(draws)).normal(size=shape)
    draws.append(z)
    return jnp.asarray(z, dtype)

  monkeypatch.setattr(jax.random, "normal", fake_normal)
  got, _ = model.apply(variables, x, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(4)})

  def bn(h, p):
    m, v = h.mean(0), h.var(0)
    return (h - m) / np.sqrt(v + eps) * np.asarray(p["scale"]) + np.asarray(
        p["bias"])

  h = np.asarray(x).reshape(6, -1)
  for i in range(len(widths)):
    h = h @ np.asarray(params[f"dense{i + 1}"]["kernel"])
    h = np.maximum(bn(h, params[f"bn{i + 1}"]) + std * draws[i], 0.0)
  want = h @ np.asarray(params["classifier"]["kernel"])
  if top_bn:
    assert "bias" not in params["classifier"]
    want = bn(want, params["bn_top"])
  else:
    want = want + np.asarray(params["classifier"]["bias"])
  assert len(draws) == len(widths)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  # Eval mode draws nothing and equals the same network without noise.
  n = len(draws)
  quiet = mlp.MLP(num_classes=3, widths=widths, top_bn=top_bn)
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                quiet.apply(variables, x, train=False))
  assert len(draws) == n
  with pytest.raises(ValueError, match="noise_std"):
    mlp.MLP(num_classes=3, noise_std=-0.1)
