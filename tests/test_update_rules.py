"""Each method's real `train_step` against the update rule written out here.

Every test runs one (or many) real, jitted `train_step` on a tiny float64 model
and compares every leaf of the new state (parameters, optimizer momentum, EMA
weights, BatchNorm statistics, R2-D2's table, MPL's teacher, student and
baseline) with a reference computed in this file from the formulas of
docs/algorithms.md: logits by hand (x @ W + b, BatchNorm by hand), losses
written out, gradients by `jax.grad` of those hand-written losses, the optimizer
(coupled weight decay, Nesterov momentum) and the EMA by hand. Library helpers
(`losses`, `d2_loss`, `label_grad_*`, `uda_loss`, `update_labels`, ...) are
deliberately not used by the references.

Break checks (each line below was temporarily broken in the method file, the
tests named ran and failed, then the line was restored):

  state.py     EMA `e*d + (1 − d)*p` with d and 1 − d swapped
                 -> test_supervised_step, test_uda_step[tie]
  supervised   label smoothing not passed to the CE
                 -> test_supervised_step
  optim        β1 switched one step late (`step > boundary`)
                 -> test_supervised_steps_adam_with_a_beta1_schedule
  optim        scheduled β1 ignored (plain Adam, β1 = 0.9 throughout)
                 -> test_supervised_steps_adam_with_a_beta1_schedule
  r2d2         label step sign (`delta = +label_lr·n·g`)
                 -> test_r2d2_d2_step, test_r2d2_table_fixed_point_...
  r2d2         label step's factor n dropped
                 -> test_r2d2_d2_step
  r2d2         learnable mask dropped from the label step
                 -> test_r2d2_d2_step
  r2d2         β term's sign in d2_loss
                 -> test_r2d2_d2_step, test_r2d2_theorem1_through_the_network_step
  r2d2         reprediction with the EMA weights / in train mode
                 -> test_r2d2_reprediction_hook (each)
  r2d2         finetune target argmin instead of argmax
                 -> test_r2d2_finetune_step
  uda          mask `>=` -> `>`   -> test_uda_step[tie] (threshold passes)
  uda          mask `>=` -> `<`   -> test_uda_step[threshold], [threshold-sharpened]
  uda          targets not sharpened (τ dropped)
                 -> test_uda_step[threshold]
  uda          mask_on test inverted (`!= "sharpened"`)
                 -> test_uda_step[threshold], [threshold-sharpened]
  mpl          first_order `h = -h_diff`
                 -> test_mpl_step[first_order-difference], [..-previous_baseline]
                    (on the teacher's parameters)
  mpl          exact: `-s_lr * g` -> `g` in the inner vjp
                 -> test_mpl_step[exact]
  mpl          dot_product h without its factor ηS
                 -> test_mpl_step[first_order-dot_product]
  mpl          official_compat `h = +h_diff`
                 -> test_mpl_step[official_compat] (on the baseline: that
                    mode's MPL term has zero gradient by design)
  mpl          baseline subtracted before/after its update swapped
                 -> test_mpl_step[first_order-difference], [..-previous_baseline]
  mpl          baseline update sign (`b + d(b − h)`)
                 -> test_mpl_step[official_compat]
  mpl          student's label smoothing dropped
                 -> test_mpl_step[exact], [official_compat]
  semimeta     label step sign (`relu(ỹ + step·g_y)`)
                 -> test_semimeta_step[exact-0.0], [first_order-1.0]
  semimeta     label step's factor n dropped
                 -> test_semimeta_step[exact-0.0]
  semimeta     relu dropped from the label step
                 -> test_semimeta_step[first_order-1.0]
  semimeta     first-order g_y's 2α/n -> α/n
                 -> test_semimeta_step[first_order-1.0]

Theorem 1 (docs/algorithms.md, R2-D2) through `train_step`: see
`test_r2d2_table_fixed_point_with_the_network_fixed` and
`test_r2d2_theorem1_through_the_network_step` for the two fixed points and why
only the network step reaches q ∝ p^(1 − β/α).
"""

import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn

from configs import common
from r2d2_jax import optim
from r2d2_jax import sharding
from r2d2_jax.data import views
from r2d2_jax.methods import mpl
from r2d2_jax.methods import r2d2
from r2d2_jax.methods import semimeta
from r2d2_jax.methods import supervised
from r2d2_jax.methods import uda
from r2d2_jax.methods.base import HookContext
from r2d2_jax.state import TrainState
from tests import helpers

C = 4             # classes
D = 3             # input features
LR = 0.125        # student / single-network learning rate
WD = 0.0625       # coupled weight decay
MOMENTUM = 0.5
EMA = 0.75        # decay: swapping decay and 1 − decay changes every EMA leaf
BN_MOMENTUM = 0.75
BN_EPS = 1e-5
TOL = 1e-10


# ---------------------------------------------------------------------------
# Shared pieces: the model, its hand-written forward, the optimizer by hand


@pytest.fixture(autouse=True)
def _x64():
  """Every test in float64; restored afterwards (tests share a process)."""
  with jax.enable_x64(True):
    yield


class Net(nn.Module):
  """Optional BatchNorm on the inputs, then one Dense layer; float64."""
  bn: bool = False
  bias: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(jnp.float64)
    if self.bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                       epsilon=BN_EPS, dtype=jnp.float64,
                       param_dtype=jnp.float64)(x)
    return nn.Dense(C, use_bias=self.bias, dtype=jnp.float64,
                    param_dtype=jnp.float64)(x)


def ref_forward(params, model_state, x, train):
  """Net by hand: returns (logits, new model_state)."""
  x = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float64)
  new_state = model_state
  if "BatchNorm_0" in params:
    old = model_state["batch_stats"]["BatchNorm_0"]
    if train:
      mean = jnp.mean(x, 0)
      var = jnp.mean((x - mean) ** 2, 0)            # biased, as BatchNorm
      new_state = {"batch_stats": {"BatchNorm_0": {
          "mean": BN_MOMENTUM * old["mean"] + (1 - BN_MOMENTUM) * mean,
          "var": BN_MOMENTUM * old["var"] + (1 - BN_MOMENTUM) * var}}}
    else:
      mean, var = old["mean"], old["var"]
    bn = params["BatchNorm_0"]
    x = (x - mean) / jnp.sqrt(var + BN_EPS) * bn["scale"] + bn["bias"]
  dense = params["Dense_0"]
  return x @ dense["kernel"] + dense.get("bias", 0.0), new_state


def log_softmax(z):
  z = z - jnp.max(z, -1, keepdims=True)
  return z - jnp.log(jnp.sum(jnp.exp(z), -1, keepdims=True))


def softmax(z):
  return jnp.exp(log_softmax(z))


def ce(targets, logits):
  """mean_i −Σ_c t_ic log softmax(z_i)_c."""
  return jnp.mean(-jnp.sum(targets * log_softmax(logits), -1))


def onehot(y):
  return jnp.eye(C, dtype=jnp.float64)[y]


def smooth(t, eps):
  return (1 - eps) * t + eps / C


def ref_sgd(params, grads, trace, lr, wd, momentum=MOMENTUM):
  """Coupled weight decay, then Nesterov momentum: (params', trace')."""
  g = jax.tree.map(lambda g, p: g + wd * p, grads, params)
  m = jax.tree.map(lambda g, t: g + momentum * t, g, trace)
  u = jax.tree.map(lambda g, m: g + momentum * m, g, m)
  return jax.tree.map(lambda p, u: p - lr * u, params, u), m


def ref_ema(ema, new):
  return jax.tree.map(lambda e, p: EMA * e + (1 - EMA) * p, ema, new)


def student_tx():
  return optax.chain(optax.add_decayed_weights(WD),
                     optax.sgd(LR, momentum=MOMENTUM, nesterov=True))


def trace_of(opt_state):
  """The momentum leaves of an optax state (its only float leaves here)."""
  return [x for x in jax.tree.leaves(opt_state)
          if jnp.issubdtype(x.dtype, jnp.floating)]


def random_network(rng, bn=False, din=D, scale=1.0, bias=True):
  """(params, model_state) of `Net` with random float64 values everywhere."""
  n = lambda *s: jnp.asarray(rng.normal(size=s))
  params = {"Dense_0": {"kernel": scale * n(din, C)}}
  if bias:
    params["Dense_0"]["bias"] = 0.3 * n(C)
  model_state = {}
  if bn:
    params["BatchNorm_0"] = {"scale": 1 + 0.3 * n(din), "bias": 0.3 * n(din)}
    model_state = {"batch_stats": {"BatchNorm_0": {
        "mean": 0.3 * n(din),
        "var": jnp.asarray(rng.uniform(0.5, 2.0, din))}}}
  return params, model_state


def random_train_state(rng, tx, bn=False, din=D, scale=1.0, step=1,
                       cls=TrainState, bias=True, **extra):
  """A state mid-training: nonzero momentum, EMA ≠ params."""
  params, model_state = random_network(rng, bn, din, scale, bias)
  perturb = lambda t: jax.tree.map(
      lambda x: x + 0.1 * jnp.asarray(rng.normal(size=x.shape)), t)
  opt_state = jax.tree.map(
      lambda x: (jnp.asarray(rng.normal(size=x.shape))
                 if jnp.issubdtype(x.dtype, jnp.floating) else x),
      tx.init(params))
  ema_model_state = jax.tree.map(jnp.abs, perturb(model_state))
  return cls(step=jnp.asarray(step, jnp.int32), params=params,
             model_state=model_state, opt_state=opt_state,
             ema_params=perturb(params), ema_model_state=ema_model_state,
             **extra)


def make_ctx(config, model, tx=None, mesh=None, **kwargs):
  kwargs.setdefault("num_train", 0)
  return helpers.StepContext(
      config, model, tx or student_tx(),
      lambda step: jnp.asarray(LR, jnp.float64), image_shape=(1, D, 1),
      num_classes=C, total_steps=100, steps_per_epoch=4, mesh=mesh, **kwargs)


def run_step(train_step, state, batch, ctx, key=1):
  """`train_step` bound as the trainer binds it, jitted, on one batch."""
  step = jax.jit(ctx.bind(train_step))
  return step(state, batch, jax.random.key(key))


def assert_close(actual, expected, tol=TOL):
  for leaf in jax.tree.leaves(actual):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float64, leaf.dtype
  chex.assert_trees_all_close(actual, expected, rtol=tol, atol=tol)


def assert_network_update(new, old, grads, model_state, lr=LR, wd=WD):
  """params, momentum, EMA of both, model_state and step of `new`."""
  params, trace = ref_sgd(old.params, grads, old.opt_state_trace, lr, wd)
  assert_close(new.params, params)
  assert_close(trace_of(new.opt_state), jax.tree.leaves(trace))
  assert_close(new.model_state, model_state)
  assert_close(new.ema_params, ref_ema(old.ema_params, params))
  assert_close(new.ema_model_state, ref_ema(old.ema_model_state, model_state))
  assert int(new.step) == int(old.step) + 1
  # The step moved the parameters more than the tolerance: not vacuous.
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in
              zip(jax.tree.leaves(params), jax.tree.leaves(old.params)))
  assert moved > 1e-3


class _Old:
  """The old state's leaves as the references need them (momentum as a tree)."""

  def __init__(self, state):
    self.params, self.model_state = state.params, state.model_state
    self.ema_params, self.ema_model_state = (state.ema_params,
                                             state.ema_model_state)
    self.step = state.step
    self.opt_state_trace = jax.tree.unflatten(
        jax.tree.structure(state.params), trace_of(state.opt_state))


def x_of(rng, n, din=D, scale=1.0):
  return jnp.asarray(rng.normal(size=(n, din)) * scale)


def y_of(rng, n):
  return jnp.asarray(rng.integers(0, C, n), jnp.int32)


# ---------------------------------------------------------------------------
# Supervised


def test_supervised_step():
  """θ' = SGD-Nesterov(θ, ∇θ CE(smooth(onehot y), f(x))), BN batch stats, EMA."""
  rng = np.random.default_rng(0)
  cfg = helpers.tiny_config("supervised", label_smoothing=0.2, ema_decay=EMA)
  ctx = make_ctx(cfg, Net(bn=True))
  state = random_train_state(rng, ctx.tx, bn=True)
  batch = {"labeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                       "index": jnp.arange(8, dtype=jnp.int32)}}
  new, metrics = run_step(supervised.train_step, state, batch, ctx)

  lab = batch["labeled"]

  def loss(params):
    z, ms = ref_forward(params, state.model_state, lab["weak"], train=True)
    return ce(smooth(onehot(lab["label"]), 0.2), z), ms

  (value, ms), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  assert_network_update(new, _Old(state), grads, ms)
  np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                             rtol=1e-12)


def test_supervised_steps_adam_with_a_beta1_schedule():
  """Adam with β1 switched at a boundary (vat_tf's mom1 → mom2), step by step.

  The trainer's optimizer (`optim.make_optimizer`: coupled L2 on the kernels,
  a warm-up schedule, β1 = 0.9 before step 3 and 0.5 from it) inside the real
  `train_step`, against Adam written out: m ← β1(t)·m + (1 − β1(t))·g,
  v ← β2·v + (1 − β2)·g², θ ← θ − lr_t·m̂/(√v̂ + ε), m̂ = m/(1 − β1(t)^(t+1)).
  """
  rng = np.random.default_rng(3)
  block = ml_collections.ConfigDict(dict(
      name="adam", lr=0.0625, b1=0.9, b2=0.99, weight_decay=WD,
      decay_mask="kernels", schedule=dict(name="constant", warmup_steps=2),
      b1_schedule=dict(boundaries=(3,), values=(0.5,))))
  tx, schedule = optim.make_optimizer(block, 10)
  cfg = helpers.tiny_config("supervised", ema_decay=EMA)
  ctx = helpers.StepContext(cfg, Net(), tx, schedule, image_shape=(1, D, 1),
                            num_classes=C, total_steps=10)
  params, model_state = random_network(rng)
  state = TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                     model_state=model_state, opt_state=tx.init(params),
                     ema_params=params, ema_model_state=model_state)
  step = jax.jit(ctx.bind(supervised.train_step))
  zeros = jax.tree.map(jnp.zeros_like, params)
  # Adam by hand, keyed by β1 from step 3 on: 0.5 (scheduled), 0.9 (constant).
  adam = {late_b1: (params, zeros, zeros) for late_b1 in (0.5, 0.9)}
  for t in range(6):
    x, y = x_of(rng, 8), y_of(rng, 8)
    batch = {"labeled": {"weak": x, "label": y,
                         "index": jnp.arange(8, dtype=jnp.int32)}}
    state, _ = step(state, batch, jax.random.key(t))
    lr = 0.0625 * min(t + 1, 2) / 2   # warm-up over 2 steps (exact in float32)
    for late_b1, (p, m, v) in adam.items():
      g = jax.grad(lambda q, x=x, y=y: ce(
          onehot(y), ref_forward(q, {}, x, train=True)[0]))(p)
      g["Dense_0"]["kernel"] = (g["Dense_0"]["kernel"]
                                + WD * p["Dense_0"]["kernel"])  # kernels only
      b1 = 0.9 if t < 3 else late_b1
      m = jax.tree.map(lambda m, g, b1=b1: b1 * m + (1 - b1) * g, m, g)
      v = jax.tree.map(lambda v, g: 0.99 * v + 0.01 * g * g, v, g)
      p = jax.tree.map(
          lambda p, m, v, b1=b1, t=t, lr=lr: p - lr * (m / (1 - b1 ** (t + 1)))
          / (jnp.sqrt(v / (1 - 0.99 ** (t + 1))) + 1e-8), p, m, v)
      adam[late_b1] = (p, m, v)
    assert_close(state.params, adam[0.5][0])
    gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree.leaves(adam[0.5][0]), jax.tree.leaves(adam[0.9][0])))
    assert (gap == 0.0) if t < 3 else (gap > 1e-3), (t, gap)
  assert int(state.step) == 6


# ---------------------------------------------------------------------------
# R2-D2: the D2 step (network and table), reprediction, Theorem 1


N_LAB_ROWS = 8    # table rows 0..7 are the labeled examples
N_TRAIN = 20      # table rows 20..23 are padding (8 devices)


def r2d2_config(**overrides):
  cfg = helpers.tiny_config("r2d2", ema_decay=EMA, **overrides)
  common.r2d2_block(cfg)   # α = 0.1, β = 0.03, label_lr = 4000/512
  cfg.data.uratio = 1
  return cfg


def r2d2_state(rng, ctx, bn, learnable=None, table_scale=2.0, **kwargs):
  rows = 24
  table = jnp.asarray(rng.normal(size=(rows, C)) * table_scale)
  if learnable is None:
    learnable = np.zeros(rows)
    learnable[N_LAB_ROWS:N_TRAIN] = 1.0
  return random_train_state(rng, ctx.tx, bn=bn, cls=r2d2.R2D2State,
                            table=table, learnable=jnp.asarray(learnable),
                            **kwargs)


def mesh8():
  return sharding.make_mesh(jax.devices())


def mesh1():
  """One device: the iterated tests run thousands of steps, no collectives."""
  return sharding.make_mesh(jax.devices()[:1])


def d2_loss_by_hand(z, rows, alpha, beta):
  """α · mean_i Σ_c p (log p − log q) + β · mean_i H(p)."""
  log_p, log_q = log_softmax(z), log_softmax(rows)
  p = jnp.exp(log_p)
  kl = jnp.mean(jnp.sum(p * (log_p - log_q), -1))
  ent = jnp.mean(-jnp.sum(p * log_p, -1))
  return alpha * kl + beta * ent


@pytest.mark.parametrize("label_grad", ["closed_form", "autodiff"])
def test_r2d2_d2_step(label_grad):
  """Network: SGD on ∇θ L; table: Y_i ← Y_i − label_lr·α·(q_i − p_i).

  The label step per visit is label_lr·n·∂L/∂Y_i = label_lr·α·(q_i − p_i),
  written here directly (no n, no helper), on learnable rows only; a row that
  appears twice in the batch takes both steps; labeled rows (learnable 0),
  including one that appears in the unlabeled batch, and padding rows stay.
  The table is sharded over 8 devices.
  """
  rng = np.random.default_rng(1)
  cfg = r2d2_config()
  cfg.r2d2.label_grad = label_grad
  alpha, beta, label_lr = cfg.r2d2.alpha, cfg.r2d2.beta, cfg.r2d2.label_lr
  ctx = make_ctx(cfg, Net(bn=True), mesh=mesh8(), num_train=N_TRAIN)
  state = r2d2_state(rng, ctx, bn=True)
  lab_idx = np.array([0, 1, 2, 3, 4, 5, 6, 7])
  unl_idx = np.array([8, 9, 10, 11, 12, 13, 9, 3])   # 9 twice; 3 is labeled
  batch = {"labeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                       "index": jnp.asarray(lab_idx, jnp.int32)},
           "unlabeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                         "index": jnp.asarray(unl_idx, jnp.int32)}}
  new, metrics = run_step(r2d2.train_step, state, batch, ctx)

  idx = np.concatenate([lab_idx, unl_idx])
  x = jnp.concatenate([batch["labeled"]["weak"], batch["unlabeled"]["weak"]])
  table = np.asarray(state.table)
  rows = jnp.asarray(table[idx])

  def loss(params):
    z, ms = ref_forward(params, state.model_state, x, train=True)
    return d2_loss_by_hand(z, rows, alpha, beta), (z, ms)

  (value, (z, ms)), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params)
  assert_network_update(new, _Old(state), grads, ms)

  learn = np.asarray(state.learnable)[idx][:, None]
  step = -label_lr * alpha * (softmax(rows) - softmax(z)) * learn
  expected = table.copy()
  np.add.at(expected, idx, np.asarray(step))
  assert_close(new.table, jnp.asarray(expected))
  np.testing.assert_array_equal(new.learnable, state.learnable)
  # Not vacuous: learnable rows moved by O(0.1), fixed rows did not move.
  moved = np.abs(np.asarray(new.table) - table).max(-1)
  assert (moved[[8, 9, 10, 11, 12, 13]] > 1e-2).all()
  assert (moved[:8] == 0).all() and (moved[14:] == 0).all()
  np.testing.assert_allclose(float(metrics["losses/total"]), float(value),
                             rtol=1e-12)
  # The batch's pseudo-labels argmax Y[i] (before the step) against the
  # hidden true labels; every row counts (the table's rows are soft).
  acc = np.mean(table[unl_idx].argmax(-1) ==
                np.asarray(batch["unlabeled"]["label"]))
  assert 0 < acc < 1
  for name in ("monitors/pseudo_label_accuracy",
               "monitors/pseudo_label_accuracy_masked",
               "pseudo_labels/batch_accuracy"):
    np.testing.assert_allclose(float(metrics[name]), acc, rtol=1e-6)
  assert float(metrics["monitors/mask"]) == 1.0


def test_r2d2_finetune_step():
  """θ' = SGD-Nesterov(θ, ∇θ CE(onehot(argmax_c Y[i]), f(x_i))); Y frozen."""
  rng = np.random.default_rng(8)
  cfg = r2d2_config()
  ctx = make_ctx(cfg, Net(bn=True), mesh=mesh8(), num_train=N_TRAIN)
  state = r2d2_state(rng, ctx, bn=True)
  idx = np.array([2, 9, 17, 5, 11, 19, 8, 14])
  batch = {"unlabeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                         "index": jnp.asarray(idx, jnp.int32)}}
  new, metrics = run_step(r2d2.finetune_step, state, batch, ctx)
  target = onehot(np.argmax(np.asarray(state.table)[idx], -1))
  acc = np.mean(np.argmax(np.asarray(state.table)[idx], -1) ==
                np.asarray(batch["unlabeled"]["label"]))
  assert 0 < acc < 1
  np.testing.assert_allclose(float(metrics["monitors/pseudo_label_accuracy"]),
                             acc, rtol=1e-6)

  def loss(params):
    z, ms = ref_forward(params, state.model_state, batch["unlabeled"]["weak"],
                        train=True)
    return ce(target, z), ms

  (_, ms), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  assert_network_update(new, _Old(state), grads, ms)
  np.testing.assert_array_equal(new.table, state.table)


def _hook_context(ctx, state, images, eval_batch_size=16):
  """The `HookContext` the trainer hands the R2-D2 hook, over `images`."""

  def eval_batches(split):
    assert split == "train"
    n = len(images)
    for start in range(0, n, eval_batch_size):
      idx = np.arange(start, start + eval_batch_size)
      mask = idx < n
      idx = np.where(mask, idx, 0)
      yield {"image": images[idx], "label": np.zeros_like(idx),
             "index": idx.astype(np.int32), "mask": mask}

  info = types.SimpleNamespace(mean=(0.5,), std=(2.0,))
  return HookContext(
      net=ctx.net, task=ctx.task, hp=ctx.hp, mesh=ctx.mesh,
      state_shardings=r2d2.state_sharding(state, ctx.mesh), total_steps=100,
      log_every=100, eval_batches=eval_batches,
      normalize=lambda images: views.normalize(images, info))


def test_r2d2_reprediction_hook():
  """At a scheduled step, learnable rows ← f(x; raw θ) in eval mode (BN
  running statistics, no augmentation, normalised images); other rows stay.
  At an unscheduled step the table is untouched."""
  rng = np.random.default_rng(2)
  cfg = r2d2_config()
  cfg.r2d2.repredict_epochs = (0, 1.5)   # steps 0 and 6 at 4 steps per epoch
  ctx = make_ctx(cfg, Net(bn=True), mesh=mesh8(), num_train=N_TRAIN,
                 train_labels=np.zeros(N_TRAIN, np.int32))
  state = r2d2_state(rng, ctx, bn=True)
  images = rng.integers(0, 256, (N_TRAIN, D)).astype(np.uint8)
  hooks = _hook_context(ctx, state, images)
  table = np.asarray(state.table)
  # Placed as the trainer places it (else each call compiles anew).
  copy = lambda s: jax.device_put(jax.tree.map(jnp.array, s),
                                  hooks.state_shardings)

  same, m5 = r2d2.r2d2_hook(hooks, copy(state), 5)
  np.testing.assert_array_equal(same.table, table)
  assert "r2d2/repredicted" not in m5

  new, m6 = r2d2.r2d2_hook(hooks, copy(state), 6)
  assert m6["r2d2/repredicted"] == 1.0
  x = (images.astype(np.float32) - np.float32(0.5)) / np.float32(2.0)
  z, _ = ref_forward(state.params, state.model_state, jnp.asarray(x),
                     train=False)
  expected = table.copy()
  learn = np.asarray(state.learnable) > 0
  expected[learn] = np.asarray(z)[learn[:N_TRAIN]]
  assert_close(new.table, jnp.asarray(expected))
  assert np.abs(expected - table).max() > 1e-2
  for field in ("params", "model_state", "ema_params", "opt_state"):
    chex.assert_trees_all_equal(getattr(new, field), getattr(state, field))


def _iterate(train_step, state, batch, ctx, steps):
  """`steps` real train steps on the same batch, in one compiled loop."""
  step = ctx.bind(train_step)

  def body(_, s):
    return step(s, batch, jax.random.key(0))[0]
  return jax.jit(lambda s: jax.lax.fori_loop(0, steps, body, s))(state)


def test_r2d2_table_fixed_point_with_the_network_fixed():
  """With p fixed, the table step's fixed point is q = p, not Theorem 1's.

  Derivation. The label step is Y_i ← Y_i − λα(q_i − p_i) with q_i =
  softmax(Y_i). With p_i fixed (here: learning rate 0, so θ and hence the
  network's output never change), q_i − p_i = ∇_Y CE(p_i, softmax(Y)), so the
  step is gradient descent on the convex CE(p_i, softmax(Y_i)); its only fixed
  point is q_i = p_i, i.e. log q_i − log p_i constant over classes (exponent 1,
  not 1 − β/α: β never enters ∂L/∂Y). The relation q ∝ p^(1 − β/α) of
  Theorem 1 is a stationary point of L in the *network output* with Y fixed
  (next test); a point stationary in both would need q = p and
  q ∝ p^(1 − β/α) at once, i.e. p uniform on its support. Also checked:
  Σ_c Y_ic of every row is invariant (Σ_c (q − p)_c = 0, the "equality
  constraint bias"), and the labeled rows never move.
  """
  rng = np.random.default_rng(3)
  cfg = r2d2_config()
  ctx = make_ctx(cfg, Net(), tx=optax.sgd(0.0), mesh=mesh1(),
                 num_train=N_TRAIN)
  state = r2d2_state(rng, ctx, bn=False, table_scale=1.0)
  lab_idx, unl_idx = np.arange(8), np.arange(8, 16)
  batch = {"labeled": {"weak": x_of(rng, 8, scale=0.5), "label": y_of(rng, 8),
                       "index": jnp.asarray(lab_idx, jnp.int32)},
           "unlabeled": {"weak": x_of(rng, 8, scale=0.5),
                         "label": y_of(rng, 8),
                         "index": jnp.asarray(unl_idx, jnp.int32)}}
  new = _iterate(r2d2.train_step, state, batch, ctx, 3000)
  assert_close(new.params, state.params, tol=0)   # the network never moved
  z, _ = ref_forward(state.params, {}, batch["unlabeled"]["weak"], train=False)
  log_p = np.asarray(log_softmax(z))
  log_q = np.asarray(log_softmax(new.table[unl_idx]))
  resid = log_q - log_p
  np.testing.assert_allclose(resid - resid.mean(-1, keepdims=True), 0.0,
                             atol=1e-9)
  # Theorem 1's relation does not hold for the table's fixed point.
  t1 = log_q - (1 - cfg.r2d2.beta / cfg.r2d2.alpha) * log_p
  assert np.abs(t1 - t1.mean(-1, keepdims=True)).max() > 1e-2
  table = np.asarray(state.table)
  np.testing.assert_allclose(np.asarray(new.table).sum(-1), table.sum(-1),
                             atol=1e-12)
  np.testing.assert_array_equal(np.asarray(new.table)[:8], table[:8])


def test_r2d2_theorem1_through_the_network_step():
  """With Y fixed, the network step reaches q ∝ p^(1 − β/α) (Theorem 1).

  Derivation. Per row, L_i(z) = α Σ p log p − α Σ p log q − β Σ p log p
  = (α − β) Σ_c p_c log p_c − α Σ_c p_c log q_c with p = softmax(z). Its
  gradient in z is J_pᵀ [(α − β)(log p + 1) − α log q] with J_p = diag(p) −
  ppᵀ, whose null space is the constant vector, so ∇z L_i = 0 iff
  (α − β) log p − α log q is constant over classes, i.e.
  log q − (1 − β/α) log p = const: q ∝ p^(1 − β/α) (the paper's largest entry
  q_n = exp(−β/α) p_n^(1 − β/α) up to the normaliser). For α > β the loss is
  convex in p on the simplex, so gradient descent reaches that point.

  To let the real `train_step` descend L in the network output, the network's
  logits for each row are free: its inputs are one-hot row ids, so the Dense
  kernel's row i is example i's logits (no bias: a shared bias would couple
  the rows and change the stable step size). Every table row
  has learnable 0 (Y fixed). Plain SGD, many steps: the relation holds to
  1e-8, the table never moves, and Theorem 2 (max q ≤ max p) holds.
  """
  rng = np.random.default_rng(4)
  cfg = r2d2_config()
  alpha, beta = cfg.r2d2.alpha, cfg.r2d2.beta
  n = 16
  lr = n / (alpha - beta)
  ctx = make_ctx(cfg, Net(bias=False), tx=optax.sgd(lr), mesh=mesh1(),
                 num_train=N_TRAIN)
  state = r2d2_state(rng, ctx, bn=False, learnable=np.zeros(24), din=n,
                     scale=0.0, table_scale=1.0, bias=False)
  eye = jnp.eye(n, dtype=jnp.float64)
  idx = jnp.arange(n, dtype=jnp.int32) + 4
  batch = {"labeled": {"weak": eye[:8], "label": y_of(rng, 8),
                       "index": idx[:8]},
           "unlabeled": {"weak": eye[8:], "label": y_of(rng, 8),
                         "index": idx[8:]}}
  new = _iterate(r2d2.train_step, state, batch, ctx, 20000)
  np.testing.assert_array_equal(new.table, state.table)
  z, _ = ref_forward(new.params, {}, eye, train=False)
  log_p = np.asarray(log_softmax(z))
  log_q = np.asarray(log_softmax(state.table[np.asarray(idx)]))
  resid = log_q - (1 - beta / alpha) * log_p
  np.testing.assert_allclose(resid - resid.mean(-1, keepdims=True), 0.0,
                             atol=1e-8)
  assert (np.exp(log_q).max(-1) <= np.exp(log_p).max(-1) + 1e-12).all()
  # Not vacuous: p is not q (the exponent is not 1).
  assert np.abs(log_p - log_q - (log_p - log_q).mean(-1, keepdims=True)
                ).max() > 1e-2


# ---------------------------------------------------------------------------
# UDA


def mask_is_sharpened(cfg):
  return cfg.uda.get("mask_on", "unsharpened") == "sharpened"


def uda_by_hand(cfg, z_l, y_l, z_w, z_s, step):
  """CE(smooth(y_l), z_l) + w(t)·mean_i m_i CE(softmax(z_w/τ), z_s)."""
  u = cfg.uda
  w = u.weight * min(1.0, step / u.ramp_steps)
  z_w = jax.lax.stop_gradient(z_w)
  targets = softmax(z_w / u.temperature)
  conf = softmax(z_w / u.temperature if mask_is_sharpened(cfg) else z_w)
  mask = (jnp.max(conf, -1) >= u.threshold).astype(jnp.float64)
  cons = jnp.mean(mask * -jnp.sum(targets * log_softmax(z_s), -1))
  return ce(smooth(onehot(y_l), u.label_smoothing), z_l) + w * cons, mask


@pytest.mark.parametrize("case,mask_on", [("threshold", None),
                                          ("threshold", "sharpened"),
                                          ("tie", None)],
                         ids=["threshold", "threshold-sharpened", "tie"])
def test_uda_step(case, mask_on):
  """One forward over [x_l, weak, strong]; SGD on the UDA loss; EMA.

  'threshold': a threshold of 0.6 keeps some rows and drops others (mask on
  the method's default softmax, or on the sharpened one). 'tie': one weak row
  has exactly uniform logits (input 0, equal biases), so its max prob is
  exactly 1/C = 0.25 = the threshold: `>=` keeps it, `>` would not.
  """
  rng = np.random.default_rng(5)
  threshold = 0.6 if case == "threshold" else 0.25
  cfg = helpers.tiny_config("uda", ema_decay=EMA)
  cfg.uda = common.uda_block(weight=2.0, ramp_steps=4, temperature=0.5,
                             threshold=threshold, label_smoothing=0.1)
  if mask_on is not None:    # None: the method's default
    cfg.uda.mask_on = mask_on
  ctx = make_ctx(cfg, Net())
  state = random_train_state(rng, ctx.tx, scale=2.0)
  state = state.replace(params={"Dense_0": {
      "kernel": state.params["Dense_0"]["kernel"],
      "bias": jnp.full((C,), 0.3)}})
  x_w = x_of(rng, 8).at[0].set(0.0)
  batch = {"labeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                       "index": jnp.arange(8, dtype=jnp.int32)},
           "unlabeled": {"weak": x_w, "strong": x_of(rng, 8),
                         "label": y_of(rng, 8),
                         "index": jnp.arange(8, 16, dtype=jnp.int32)}}
  new, metrics = run_step(uda.train_step, state, batch, ctx)

  lab, unl = batch["labeled"], batch["unlabeled"]

  def loss(params):
    z_l = ref_forward(params, {}, lab["weak"], True)[0]
    z_w = ref_forward(params, {}, unl["weak"], True)[0]
    z_s = ref_forward(params, {}, unl["strong"], True)[0]
    return uda_by_hand(cfg, z_l, lab["label"], z_w, z_s, int(state.step))

  (_, mask), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  assert_network_update(new, _Old(state), grads, {})
  np.testing.assert_allclose(float(metrics["monitors/mask"]),
                             float(jnp.mean(mask)), rtol=1e-12)
  if case == "threshold":
    assert 0 < float(jnp.mean(mask)) < 1, mask
  else:
    assert float(jnp.mean(mask)) == 1.0


# ---------------------------------------------------------------------------
# Meta Pseudo Labels


LR_T = 0.0625     # teacher lr (exact in float32: the schedule is float32)
MOMENTUM_T = 0.9
B0 = 0.03         # baseline before the step


def baseline_first(cfg) -> bool:
  """Whether the MPL term subtracts the baseline after its update.

  `config.mpl.baseline`: 'updated' (the official order, b ← b − d(b − h)
  first, then h − b; the default when the key is absent) or 'previous' (b
  before this step's update).
  """
  return cfg.mpl.get("baseline", "updated") == "updated"


def mpl_config(mode, h, baseline):
  cfg = helpers.tiny_config("mpl", ema_decay=EMA, label_smoothing=0.1)
  cfg.data.uratio = 1
  cfg.mpl = ml_collections.ConfigDict(dict(
      mode=mode, h=h, sample_labels=False, temperature=0.7,
      baseline_decay=0.125,
      teacher_optimizer=dict(name="sgd", lr=LR_T, momentum=MOMENTUM_T,
                             nesterov=True, weight_decay=0.0,
                             grad_clip_norm=0.0,
                             schedule=dict(name="constant"))))
  if baseline is not None:   # None: the method's default
    cfg.mpl.baseline = baseline
  cfg.uda = common.uda_block(weight=2.0, ramp_steps=4, temperature=0.7,
                             threshold=0.6, label_smoothing=0.15)
  return cfg


MPL_CASES = {
    "exact": ("exact", "difference", None),
    "first_order-difference": ("first_order", "difference", None),
    "first_order-difference-previous_baseline": ("first_order", "difference",
                                                 "previous"),
    "first_order-dot_product": ("first_order", "dot_product", None),
    "official_compat": ("official_compat", "difference", None),
}


@pytest.mark.parametrize("mode,h_kind,baseline", list(MPL_CASES.values()),
                         ids=list(MPL_CASES))
def test_mpl_step(mode, h_kind, baseline):
  """Teacher, student and baseline after one real MPL step, by the formulas.

  Student: θS' = SGD-Nesterov(θS, ∇ CE(smooth(ŷ, 0.1), S(strong x_u))) with
  ŷ = softmax(t_s/τ) (exact), onehot(argmax t_s) (first_order), softmax(t_s)
  (official_compat). h = CE_l(θS) − CE_l(θS') (difference; its negative for
  official_compat), or ηS⟨∇CE_l(θS − ηS g_u), g_u⟩ (dot_product).
  b' = b − d(b − h). Teacher: SGD-Nesterov on ∇θT [UDA(θT) + M(θT)] with
  M = L_l(θS − ηS ∇θS CE_u(θS, softmax(T(x_s; θT)/τ))) (exact, through the
  inner step), (h − b̂)·CE(ŷ, T(x_s)) (first_order; b̂ = b' when
  `config.mpl.baseline` is 'updated', the official order and the default, b
  when 'previous'), 0 (official_compat: its term's gradient is zero).
  """
  rng = np.random.default_rng(6)
  cfg = mpl_config(mode, h_kind, baseline)
  ctx = make_ctx(cfg, Net())
  t_tx = ctx.hp.teacher_tx   # config.mpl.teacher_optimizer, built once
  teacher = random_train_state(rng, t_tx, scale=2.0)
  student = random_train_state(rng, ctx.tx, scale=1.0, step=2)
  state = mpl.MPLState(step=jnp.asarray(1, jnp.int32), teacher=teacher,
                       student=student, baseline=jnp.asarray(B0))
  batch = {"labeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                       "index": jnp.arange(8, dtype=jnp.int32)},
           "unlabeled": {"weak": x_of(rng, 8), "strong": x_of(rng, 8),
                         "label": y_of(rng, 8),
                         "index": jnp.arange(8, 16, dtype=jnp.int32)}}
  new, _ = run_step(mpl.train_step, state, batch, ctx)

  lab, unl = batch["labeled"], batch["unlabeled"]
  f = lambda p, x: ref_forward(p, {}, x, True)[0]
  tau = cfg.mpl.temperature
  tp, sp = teacher.params, student.params
  t_s = f(tp, unl["strong"])
  if mode == "exact":
    y_hat = softmax(t_s / tau)
  elif mode == "first_order":
    y_hat = onehot(jnp.argmax(t_s, -1))
  else:
    y_hat = softmax(t_s)

  ce_u = lambda p, y: ce(smooth(y, cfg.label_smoothing), f(p, unl["strong"]))
  ce_l = lambda p: ce(onehot(lab["label"]), f(p, lab["weak"]))
  g_u = jax.grad(ce_u)(sp, y_hat)
  old_s = _Old(student)
  assert_network_update(new.student, old_s, g_u, {})
  sp_new = ref_sgd(sp, g_u, old_s.opt_state_trace, LR, WD)[0]

  if mode == "first_order" and h_kind == "dot_product":
    sp_tilde = jax.tree.map(lambda p, g: p - LR * g, sp, g_u)
    g_l = jax.grad(ce_l)(sp_tilde)
    h = LR * sum(jnp.sum(a * b) for a, b in
                 zip(jax.tree.leaves(g_l), jax.tree.leaves(g_u)))
  elif mode == "official_compat":
    h = ce_l(sp_new) - ce_l(sp)
  else:
    h = ce_l(sp) - ce_l(sp_new)
  d = cfg.mpl.baseline_decay
  b_new = B0 - d * (B0 - h)
  coef = h - (b_new if baseline_first(cfg) else B0)

  def teacher_loss(p):
    z_l, z_w, z_s = (f(p, lab["weak"]), f(p, unl["weak"]),
                     f(p, unl["strong"]))
    total, _ = uda_by_hand(cfg, z_l, lab["label"], z_w, z_s, int(state.step))
    if mode == "exact":
      soft = softmax(z_s / tau)
      stepped = jax.tree.map(lambda q, g: q - LR * g, sp,
                             jax.grad(ce_u)(sp, soft))
      total = total + ce_l(stepped)
    elif mode == "first_order":
      total = total + coef * ce(y_hat, z_s)
    return total

  g_t = jax.grad(teacher_loss)(tp)
  old_t = _Old(teacher)
  params_t, trace_t = ref_sgd(tp, g_t, old_t.opt_state_trace, LR_T, 0.0,
                              MOMENTUM_T)
  assert_close(new.teacher.params, params_t)
  assert_close(trace_of(new.teacher.opt_state), jax.tree.leaves(trace_t))
  assert_close(new.teacher.ema_params, ref_ema(teacher.ema_params, params_t))
  assert int(new.teacher.step) == 2 and int(new.step) == 2
  assert_close(new.baseline, b_new)
  # Not vacuous: the MPL term moves the teacher beyond the tolerance.
  if mode in ("exact", "first_order"):
    g_uda = jax.grad(lambda p: uda_by_hand(
        cfg, f(p, lab["weak"]), lab["label"], f(p, unl["weak"]),
        f(p, unl["strong"]), int(state.step))[0])(tp)
    diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
               zip(jax.tree.leaves(g_t), jax.tree.leaves(g_uda)))
    assert diff > 1e-4


# ---------------------------------------------------------------------------
# SemiMeta


@pytest.mark.parametrize("mode,mixup_alpha", [("exact", 0.0),
                                              ("first_order", 1.0)])
def test_semimeta_step(mode, mixup_alpha):
  """ŷ = normalize(relu(ỹ − label_lr·n·g_y)), then SGD on the final loss.

  ỹ = softmax(f(x_u; θ)) (meta forwards in eval mode: BN running statistics);
  g_y = ∇ỹ CE(y_l, f(x_l; θ̃(ỹ))) with θ̃(y) = θ − α∇θ mean_i ‖s_i(θ) − y_i‖²
  (exact), or ∇_y of its first-order expansion −α⟨∇θ CE_l(θ), ∇θ L_u(θ, y)⟩
  (first_order); α = the current lr. Final loss: CE(t_sup, f(x_sup)) +
  w·mean_i ‖softmax(f(x_u)) − ŷ_i‖², two train-mode forwards (mixed batch,
  then x_u) whose BN statistics are kept in that order; mixup per sample with
  λ_i from the step's 'mix' key.
  """
  rng = np.random.default_rng(7)
  cfg = helpers.tiny_config("semimeta", ema_decay=EMA)
  cfg.data.uratio = 1
  cfg.semimeta = semimeta.default_block()
  cfg.semimeta.update(mode=mode, label_lr=4.0, mixup_alpha=mixup_alpha,
                      weight=1.5, ramp_steps=0, meta_bn="eval")
  ctx = make_ctx(cfg, Net(bn=True))
  state = random_train_state(rng, ctx.tx, bn=True, scale=2.0)
  batch = {"labeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                       "index": jnp.arange(8, dtype=jnp.int32)},
           "unlabeled": {"weak": x_of(rng, 8), "label": y_of(rng, 8),
                         "index": jnp.arange(8, 16, dtype=jnp.int32)}}
  key = jax.random.key(3)
  new, metrics = run_step(semimeta.train_step, state, batch, ctx, key=3)

  lab, unl = batch["labeled"], batch["unlabeled"]
  x_l, y_l, x_u = lab["weak"], lab["label"], unl["weak"]
  n, alpha = x_u.shape[0], LR
  ms0 = state.model_state
  f_eval = lambda p, x: ref_forward(p, ms0, x, False)[0]
  ce_l = lambda p: ce(onehot(y_l), f_eval(p, x_l))
  l_u = lambda p, y: jnp.mean(jnp.sum((softmax(f_eval(p, x_u)) - y) ** 2, -1))
  y_tilde = softmax(f_eval(state.params, x_u))
  if mode == "exact":
    def outer(y):
      g = jax.grad(l_u)(state.params, y)
      return ce_l(jax.tree.map(lambda p, g: p - alpha * g, state.params, g))
  else:
    g_l = jax.grad(ce_l)(state.params)

    def outer(y):
      g = jax.grad(l_u)(state.params, y)
      return -alpha * sum(jnp.sum(a * b) for a, b in
                          zip(jax.tree.leaves(g_l), jax.tree.leaves(g)))
  g_y = jax.grad(outer)(y_tilde)
  r = jnp.maximum(y_tilde - cfg.semimeta.label_lr * n * g_y, 0.0)
  assert bool(jnp.all(jnp.sum(r, -1) > 0))
  assert bool(jnp.any(r == 0)), "the relu should clip some entries"
  y_hat = r / jnp.sum(r, -1, keepdims=True)
  assert float(jnp.max(jnp.abs(y_hat - y_tilde))) > 1e-2

  t_l = onehot(y_l)
  if mixup_alpha > 0:
    lam = jax.jit(lambda k: jax.random.beta(k, mixup_alpha, mixup_alpha, (n,),
                                            jnp.float32))(
        semimeta.step_keys(key)["mix"]).astype(jnp.float64)
    x_sup = lam[:, None] * x_l + (1 - lam[:, None]) * x_u
    t_sup = lam[:, None] * t_l + (1 - lam[:, None]) * y_hat
  else:
    x_sup, t_sup = x_l, t_l
  weight = cfg.semimeta.weight

  def loss(params):
    z_sup, ms1 = ref_forward(params, ms0, x_sup, True)
    z_u, ms2 = ref_forward(params, ms1, x_u, True)
    cons = jnp.mean(jnp.sum((softmax(z_u) - y_hat) ** 2, -1))
    return ce(t_sup, z_sup) + weight * cons, ms2

  (_, ms), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
  assert_network_update(new, _Old(state), grads, ms)
  # ŷ's accuracy against the hidden labels (every row: no mask).
  acc = float(jnp.mean(jnp.argmax(y_hat, -1) == unl["label"]))
  assert 0 < acc < 1
  np.testing.assert_allclose(float(metrics["monitors/pseudo_label_accuracy"]),
                             acc, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["pseudo_labels/accuracy"]), acc,
                             rtol=1e-6)
