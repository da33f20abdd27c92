"""Meta Pseudo Labels and UDA: meta-gradients, h, signs, and the jitted step.

The maths tests run in float64 on a tiny MLP; the trainer tests run the real
step on digits with a small CNN on fake CPU devices.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from r2d2_jax import losses
from r2d2_jax import methods
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import mpl
from r2d2_jax.methods import uda
from tests import helpers


class TinyMLP(nn.Module):
  """Two dense layers, float64: enough curvature for second-order tests."""
  num_classes: int = 3
  hidden: int = 6

  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(self.hidden, param_dtype=jnp.float64,
                          dtype=jnp.float64)(x))
    return nn.Dense(self.num_classes, param_dtype=jnp.float64,
                    dtype=jnp.float64)(x)


def _problem(seed=0, n_u=5, n_l=4, dim=4, classes=3):
  """Teacher and student parameters, data and the CE closures (float64)."""
  rng = np.random.default_rng(seed)
  model = TinyMLP(classes)
  x_u = jnp.asarray(rng.normal(size=(n_u, dim)))
  x_l = jnp.asarray(rng.normal(size=(n_l, dim)))
  y_l = jnp.asarray(rng.integers(0, classes, n_l))
  t_params = model.init(jax.random.key(seed), x_u)["params"]
  s_params = model.init(jax.random.key(seed + 100), x_u)["params"]
  apply = lambda p, x: model.apply({"params": p}, x)
  ce_u = lambda p, t: losses.soft_cross_entropy(apply(p, x_u), t)
  ce_l = lambda p: losses.cross_entropy(apply(p, x_l), y_l)
  return dict(model=model, apply=apply, x_u=x_u, x_l=x_l, y_l=y_l,
              t_params=t_params, s_params=s_params, ce_u=ce_u, ce_l=ce_l)


# ---------------------------------------------------------------------------
# The pure pieces, float64


@pytest.mark.parametrize("lr", [0.5, 2.0])
def test_exact_teacher_grad_matches_finite_differences(lr):
  with jax.enable_x64(True):
    p = _problem()
    tau = 0.7
    t_logits = lambda tp: p["apply"](tp, p["x_u"])
    grad = mpl.exact_teacher_grad(p["t_params"], t_logits, p["s_params"],
                                  p["ce_u"], p["ce_l"], lr, tau)

    flat_t, unravel = ravel_pytree(p["t_params"])
    flat_g, _ = ravel_pytree(grad)
    assert flat_g.dtype == jnp.float64

    def objective(flat):
      targets = mpl.pseudo_labels(t_logits(unravel(flat)), "exact",
                                  temperature=tau)
      return mpl.labeled_loss_after_step(targets, p["s_params"], p["ce_u"],
                                         p["ce_l"], lr)

    assert float(jnp.linalg.norm(flat_g)) > 1e-4  # a real signal to compare
    rng = np.random.default_rng(1)
    eps = 1e-5
    for _ in range(4):
      v = jnp.asarray(rng.normal(size=flat_t.shape))
      fd = (objective(flat_t + eps * v) -
            objective(flat_t - eps * v)) / (2 * eps)
      np.testing.assert_allclose(float(jnp.dot(flat_g, v)), float(fd),
                                 rtol=1e-6, atol=1e-9)


def test_dot_product_h_and_difference_limit():
  with jax.enable_x64(True):
    p = _problem(seed=3)
    targets = mpl.pseudo_labels(p["apply"](p["t_params"], p["x_u"]),
                                "first_order")
    g_u = jax.grad(p["ce_u"])(p["s_params"], targets)
    flat_s, unravel = ravel_pytree(p["s_params"])
    flat_gu, _ = ravel_pytree(g_u)
    ce_l_flat = lambda f: p["ce_l"](unravel(f))

    errors = []
    for lr in (1e-1, 1e-2, 1e-3):
      h = mpl.h_dot_product(p["ce_l"], p["s_params"], g_u, lr)
      # Independently: ηS times the directional derivative of L_l at θS' along
      # ∇CE_u, by forward mode on the flat vector.
      stepped = flat_s - lr * flat_gu
      _, directional = jax.jvp(ce_l_flat, (stepped,), (flat_gu,))
      np.testing.assert_allclose(float(h), float(lr * directional), rtol=1e-10)

      new = jax.tree.map(lambda a, g: a - lr * g, p["s_params"], g_u)
      h_diff, old_ce, new_ce = mpl.h_difference(p["ce_l"], p["s_params"], new)
      np.testing.assert_allclose(float(h_diff), float(old_ce - new_ce))
      errors.append(abs(float(h_diff) - float(h)) / abs(float(h)))
    # CE_old − CE_new = h + O(ηS²): the relative error shrinks about 10x per
    # 10x smaller step.
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2 and errors[2] < errors[0] / 30


def _toy_sign_problem():
  """Two well-separated classes; the student is a linear softmax classifier."""
  x_l = jnp.asarray([[2.0, 0.1], [1.8, -0.2], [-2.0, 0.0], [-1.7, 0.3]])
  y_l = jnp.asarray([0, 0, 1, 1])
  x_u = jnp.asarray([[1.9, 0.05]])  # its true class is 0
  s_model = nn.Dense(2, param_dtype=jnp.float64, dtype=jnp.float64)
  s_params = s_model.init(jax.random.key(0), x_u)["params"]
  s_params = jax.tree.map(lambda a: 0.01 * a, s_params)  # near-uniform start
  s_apply = lambda p, x: s_model.apply({"params": p}, x)
  teacher = TinyMLP(2)
  t_params = teacher.init(jax.random.key(1), x_u)["params"]
  t_apply = lambda p: teacher.apply({"params": p}, x_u)
  ce_u = lambda p, t: losses.soft_cross_entropy(s_apply(p, x_u), t)
  ce_l = lambda p: losses.cross_entropy(s_apply(p, x_l), y_l)
  return s_params, t_params, t_apply, ce_u, ce_l


@pytest.mark.parametrize("h_kind", ["difference", "dot_product"])
def test_first_order_teacher_step_has_the_right_sign(h_kind):
  with jax.enable_x64(True):
    s_params, t_params, t_apply, ce_u, ce_l = _toy_sign_problem()
    lr_s, lr_t = 0.5, 0.1
    for label, expect_h_positive in ((0, True), (1, False)):
      targets = jax.nn.one_hot(jnp.asarray([label]), 2, dtype=jnp.float64)
      g_u = jax.grad(ce_u)(s_params, targets)
      if h_kind == "dot_product":
        h = mpl.h_dot_product(ce_l, s_params, g_u, lr_s)
      else:
        new = jax.tree.map(lambda a, g: a - lr_s * g, s_params, g_u)
        h, _, _ = mpl.h_difference(ce_l, s_params, new)
      assert (float(h) > 0) == expect_h_positive, (label, float(h))
      baseline = 0.0
      g_t = jax.grad(lambda tp: mpl.first_order_term(
          t_apply(tp), targets, h - baseline))(t_params)
      t_new = jax.tree.map(lambda a, g: a - lr_t * g, t_params, g_t)
      before = jax.nn.softmax(t_apply(t_params))[0, label]
      after = jax.nn.softmax(t_apply(t_new))[0, label]
      if expect_h_positive:
        assert after > before  # the helpful (correct) label became likelier
      else:
        assert after < before  # the harmful label became less likely


def test_official_compat_term_has_zero_teacher_gradient():
  with jax.enable_x64(True):
    p = _problem(seed=5)
    t_logits = lambda tp: p["apply"](tp, p["x_u"])
    value = mpl.official_compat_term(t_logits(p["t_params"]), 3.7)
    assert float(value) > 0  # the term is not zero, its gradient is
    grads = jax.grad(lambda tp: mpl.official_compat_term(
        t_logits(tp), 3.7))(p["t_params"])
    flat, _ = ravel_pytree(grads)
    np.testing.assert_allclose(flat, 0.0, atol=1e-14)
    # Whereas the first-order term with the same coefficient moves the teacher.
    targets = mpl.pseudo_labels(t_logits(p["t_params"]), "first_order")
    g_fo = jax.grad(lambda tp: mpl.first_order_term(
        t_logits(tp), targets, 3.7))(p["t_params"])
    assert float(jnp.max(jnp.abs(ravel_pytree(g_fo)[0]))) > 1e-3


def test_baseline_and_pseudo_label_kinds():
  b = mpl.update_baseline(jnp.float32(1.0), jnp.float32(3.0))
  np.testing.assert_allclose(float(b), 1.02, rtol=1e-6)
  t = jnp.asarray([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
  hard = mpl.pseudo_labels(t, "first_order")
  np.testing.assert_array_equal(hard, jax.nn.one_hot(jnp.asarray([0, 1]), 3))
  sampled = mpl.pseudo_labels(t, "first_order", sample=True,
                              rng=jax.random.key(0))
  np.testing.assert_array_equal(sampled.sum(-1), 1.0)
  assert set(np.unique(np.asarray(sampled))) <= {0.0, 1.0}
  np.testing.assert_allclose(mpl.pseudo_labels(t, "exact", temperature=2.0),
                             jax.nn.softmax(t / 2.0), rtol=1e-6)
  np.testing.assert_allclose(mpl.pseudo_labels(t, "official_compat"),
                             jax.nn.softmax(t), rtol=1e-6)


def test_uda_loss_mask_and_stop_gradient():
  logits_l = jnp.zeros((2, 3))
  weak = jnp.asarray([[5.0, 0.0, 0.0], [0.1, 0.0, 0.0]])  # confident, not
  strong = jnp.asarray([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
  kw = dict(temperature=0.5, threshold=0.6, label_smoothing=0.0)
  loss, aux = uda.uda_loss(logits_l, jnp.asarray([0, 1]), weak, strong,
                           weight=2.0, **kw)
  np.testing.assert_array_equal(aux["mask"], [1.0, 0.0])
  target = jax.nn.softmax(weak[0] / 0.5)
  row0 = -jnp.sum(target * jax.nn.log_softmax(strong[0]))
  np.testing.assert_allclose(float(aux["losses/xeu"]), float(row0) / 2,
                             rtol=1e-6)
  np.testing.assert_allclose(float(loss), np.log(3) + 2 * float(row0) / 2,
                             rtol=1e-6)
  g_weak = jax.grad(lambda w: uda.uda_loss(logits_l, jnp.asarray([0, 1]), w,
                                           strong, weight=2.0, **kw)[0])(weak)
  np.testing.assert_array_equal(g_weak, 0.0)


# ---------------------------------------------------------------------------
# The jitted step through the trainer


mpl_config = helpers.tiny_mpl_config


def _run(stage, n):
  state = stage.init_state()
  batches = stage.pipeline.iterate(0, stage.streams)
  out = []
  for _ in range(n):
    state, m = stage.train_step(state, next(batches))
    out.append(m)
  return state, out


def _four_vs_one(tmp_path, config, n=3):
  s4 = train.Stage(config, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(config, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  st4, m4 = _run(s4, n)
  st1, m1 = _run(s1, n)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(m4, m1, rtol=1e-4, atol=1e-5)
  return s4, st4, m4


@pytest.mark.parametrize("mode,h", [("first_order", "difference"),
                                    ("exact", "difference")])
def test_mpl_step_four_devices_equal_one(tmp_path, mode, h):
  stage, state, metrics = _four_vs_one(tmp_path, mpl_config(mode, h))
  assert int(state.step) == 3 and int(state.student.step) == 3
  # The student's lr waits one step; the teacher's warms up over one.
  assert float(metrics[0]["lr/student"]) == 0.0
  assert float(metrics[1]["lr/student"]) > 0.0
  assert float(metrics[0]["lr/teacher"]) > 0.0
  for m in metrics:
    for k in ("mpl/dot_product", "mpl/moving_dot_product", "monitors/mask",
              "monitors/pseudo_label_accuracy", "losses/total",
              "losses/xe", "losses/xeu", "l2_updates", "l2_updates/teacher",
              "cross_entropy/teacher_on_l", "cross_entropy/student_on_u"):
      assert np.isfinite(float(m[k])), k
  # With lr 0 the student does not move, so h is exactly zero on step 1.
  assert float(metrics[0]["mpl/dot_product"]) == 0.0
  evals = stage.evaluate(state)
  assert {"accuracy/test/raw", "accuracy/test/ema",
          "accuracy/test/teacher"} <= set(evals)


def test_mpl_dot_product_and_official_compat_steps_run(tmp_path):
  for mode, h in (("first_order", "dot_product"), ("official_compat",
                                                   "difference")):
    stage = train.Stage(mpl_config(mode, h), str(tmp_path / mode),
                        mesh=sharding.make_mesh(jax.devices()[:2]))
    _, metrics = _run(stage, 2)
    assert stage.train_step._cache_size() == 1  # pylint: disable=protected-access
    last = jax.device_get(metrics[-1])
    assert all(np.isfinite(float(v)) for v in last.values())


def test_uda_step_four_devices_equal_one(tmp_path):
  c = mpl_config()
  c.method = "uda"
  _, state, metrics = _four_vs_one(tmp_path, c)
  assert int(state.step) == 3
  assert {"losses/xe", "losses/xeu", "monitors/mask", "losses/total",
          "l2_grads"} <= set(metrics[-1])


def test_mpl_then_finetune_stages(tmp_path):
  c = mpl_config()
  c.stage_order = ("mpl", "finetune")
  c.run_stages = ""
  c.stages = ml_collections.ConfigDict({
      "mpl": dict(method="mpl", total_steps=2),
      "finetune": dict(method="mpl_finetune", total_steps=2,
                       data=dict(uratio=0)),
  })
  results = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert set(results) == {"mpl", "finetune"}
  assert "accuracy/test/teacher" in results["mpl"]
  assert "accuracy/test/ema" in results["finetune"]


def test_mpl_configs_match_the_paper():
  from configs import mpl_cifar10_4k, mpl_imagenet10, uda_cifar10_4k
  c = mpl_cifar10_4k.get_config()
  s = {n: train.stage_config(c, n) for n in c.stage_order}
  m, ft = s["mpl"], s["finetune"]
  assert (m.method, ft.method) == ("mpl", "mpl_finetune")
  assert m.model.name == "wrn28_2" and m.model.kwargs.dropout_rate == 0.2
  assert (m.total_steps, m.data.batch_size, m.data.uratio) == (300_000, 128, 7)
  assert (m.data.augment.strong.num_ops, m.data.augment.strong.magnitude,
          m.data.augment.strong.cutout) == (2, 16, 16)
  assert m.label_smoothing == 0.15 and m.uda.label_smoothing == 0.15
  o, t = m.optimizer, m.mpl.teacher_optimizer
  assert (o.lr, o.schedule.wait_steps, o.schedule.warmup_steps,
          o.schedule.name) == (0.05, 3000, 5000, "cosine")
  assert (t.lr, t.schedule.wait_steps, t.schedule.warmup_steps,
          t.schedule.name) == (0.05, 0, 5000, "cosine")
  for opt in (o, t):
    assert opt.nesterov and opt.momentum == 0.9 and opt.weight_decay == 5e-4
  assert m.ema_decay == 0.995
  assert (m.uda.weight, m.uda.ramp_steps, m.uda.temperature,
          m.uda.threshold) == (8.0, 5000, 0.7, 0.6)
  assert m.mpl.mode == "first_order"
  assert (ft.data.batch_size, ft.data.uratio, ft.optimizer.lr,
          ft.optimizer.weight_decay) == (512, 0, 3e-5, 0.0)
  assert ft.optimizer.nesterov

  u = uda_cifar10_4k.get_config()
  assert u.method == "uda" and dict(u.uda) == dict(m.uda)

  i = train.stage_config(mpl_imagenet10.get_config(), "mpl")
  assert i.model.name == "resnet50" and i.data.labeled_fraction == 0.1
  assert (i.data.batch_size, i.data.uratio, i.total_steps) == (1024, 15,
                                                               700_000)
  assert (i.optimizer.lr, i.optimizer.schedule.wait_steps,
          i.optimizer.schedule.warmup_steps) == (0.4, 20_000, 5000)
  assert (i.mpl.teacher_optimizer.lr,
          i.mpl.teacher_optimizer.schedule.warmup_steps) == (0.6, 5000)
  assert (i.uda.weight, i.uda.ramp_steps, i.uda.temperature,
          i.uda.threshold) == (20.0, 50_000, 0.5, 0.6)
  assert i.label_smoothing == 0.1 and i.ema_decay == 0.999
  assert i.optimizer.grad_clip_norm == 5.0
  assert i.mpl.teacher_optimizer.grad_clip_norm == 5.0
  assert i.optimizer.weight_decay == 1e-4
  assert i.data.augment.strong.magnitude == 17


class TinyBNNet(nn.Module):
  """Dense → BatchNorm → tanh → Dense in float64, with the trainer's interface."""
  num_classes: int = 3
  rng_names = ()

  @nn.compact
  def __call__(self, x, *, train: bool):
    f64 = dict(param_dtype=jnp.float64, dtype=jnp.float64)
    x = nn.Dense(5, **f64)(x.astype(jnp.float64))
    x = nn.BatchNorm(use_running_average=not train, **f64)(x)
    return nn.Dense(self.num_classes, **f64)(jnp.tanh(x))


@pytest.mark.parametrize("mode,baseline", [("exact", "updated"),
                                           ("first_order", "updated"),
                                           ("first_order", "previous")])
def test_train_step_teacher_gradient_is_the_documented_one(mode, baseline):
  """The real step's teacher update, unpicked, equals the formula rebuilt here.

  Both networks use plain SGD at a constant lr, so the teacher's gradient is
  (θT − θT_new) / ηT; it must equal ∇θT [UDA + L_l(θS'(θT))] ('exact') or
  ∇θT [UDA + (h − b)·CE(ŷ, T(x_u))] with h = CE_old − CE_new ('first_order'),
  b the baseline after this step's update b0 − 0.01 (b0 − h) ('updated', the
  official order) or before it, b0 ('previous'). b0 ≠ 0 so the two differ.
  """
  with jax.enable_x64(True):
    lr_s, lr_t = 0.25, 0.5
    cfg = mpl_config(mode)
    cfg.mpl.baseline = baseline
    cfg.mpl.teacher_optimizer = dict(name="sgd", lr=lr_t, momentum=0.0,
                                     weight_decay=0.0,
                                     schedule=dict(name="constant"))
    cfg.uda.ramp_steps = 0
    cfg.uda.threshold = 0.3
    model = TinyBNNet()
    ctx = helpers.StepContext(
        cfg, model, optax.sgd(lr_s), lambda step: jnp.float64(lr_s),
        image_shape=(4,), num_classes=3, total_steps=10, steps_per_epoch=1)
    b0 = 0.3
    state = ctx.bind(mpl.init_state)(jax.random.key(0)).replace(
        baseline=jnp.asarray(b0, jnp.float64))
    rng = np.random.default_rng(0)
    x = lambda n: jnp.asarray(rng.normal(size=(n, 4)))
    y = lambda n: jnp.asarray(rng.integers(0, 3, n), jnp.int32)
    batch = {"labeled": {"weak": x(6), "label": y(6)},
             "unlabeled": {"weak": x(8), "strong": x(8), "label": y(8)}}
    step = ctx.bind(mpl.train_step)
    new, metrics = jax.jit(lambda s, b: step(s, b, jax.random.key(1)))(
        state, batch)
    g_step = jax.tree.map(lambda a, b: (a - b) / lr_t, state.teacher.params,
                          new.teacher.params)

    lab, unl = batch["labeled"], batch["unlabeled"]
    t_ms, s_ms = state.teacher.model_state, state.student.model_state
    apply = lambda p, ms, x: model.apply({"params": p, **ms}, x, train=True,
                                         mutable=["batch_stats"])[0]
    smooth = cfg.label_smoothing
    ce_u = lambda p, t: losses.soft_cross_entropy(
        apply(p, s_ms, unl["strong"]), t, label_smoothing=smooth)
    ce_l = lambda p: losses.cross_entropy(apply(p, s_ms, lab["weak"]),
                                          lab["label"])
    x_t = jnp.concatenate([lab["weak"], unl["weak"], unl["strong"]])
    sp = state.student.params

    def uda_part(tp):
      tl, tw, ts = jnp.split(apply(tp, t_ms, x_t), [6, 14])
      total, _ = uda.uda_loss(
          tl, lab["label"], tw, ts, weight=cfg.uda.weight,
          temperature=cfg.uda.temperature, threshold=cfg.uda.threshold,
          label_smoothing=cfg.uda.label_smoothing, mask_on=cfg.uda.mask_on)
      return total, ts

    if mode == "exact":
      def objective(tp):
        total, ts = uda_part(tp)
        soft = jax.nn.softmax(ts / cfg.mpl.temperature)
        return total + mpl.labeled_loss_after_step(soft, sp, ce_u, ce_l, lr_s)
    else:
      _, ts0 = uda_part(state.teacher.params)
      targets = jax.nn.one_hot(jnp.argmax(ts0, -1), 3, dtype=jnp.float64)
      sp_new = jax.tree.map(lambda p, g: p - lr_s * g, sp,
                            jax.grad(ce_u)(sp, targets))
      h = ce_l(sp) - ce_l(sp_new)
      np.testing.assert_allclose(float(metrics["mpl/dot_product"]), float(h),
                                 rtol=1e-8)
      chex.assert_trees_all_close(new.student.params, sp_new, rtol=1e-10,
                                  atol=1e-14)
      b_new = b0 - 0.01 * (b0 - float(h))
      np.testing.assert_allclose(float(new.baseline), b_new, rtol=1e-10)
      coef = h - (b_new if baseline == "updated" else b0)

      def objective(tp):
        total, ts = uda_part(tp)
        return total + coef * losses.soft_cross_entropy(ts, targets)
    expected = jax.grad(objective)(state.teacher.params)
    chex.assert_trees_all_close(g_step, expected, rtol=1e-6, atol=1e-9)

    # BatchNorm: the student keeps the statistics of its real step (strong
    # x_u) alone, the teacher those of its one forward pass; the auxiliary
    # passes' statistics are discarded.
    stats = lambda p, ms, x: model.apply({"params": p, **ms}, x, train=True,
                                         mutable=["batch_stats"])[1]
    chex.assert_trees_all_close(new.student.model_state,
                                stats(sp, s_ms, unl["strong"]), rtol=1e-12)
    chex.assert_trees_all_close(
        new.teacher.model_state,
        stats(state.teacher.params, t_ms, x_t), rtol=1e-12)


# ---------------------------------------------------------------------------
# Hyperparameters: parsed, validated and built once


def _hp(cfg, method="mpl"):
  """`method`'s hyperparameters of `cfg`, as the trainer parses them."""
  task = methods.Task(num_classes=3, num_train=0, total_steps=10,
                      steps_per_epoch=1)
  return methods.base.bind(methods.get_method(method).hparams, task=task)(cfg)


def test_mpl_hparams_are_parsed_from_the_blocks():
  cfg = mpl_config("first_order", "dot_product")
  cfg.mpl.baseline = "previous"
  hp = _hp(cfg)
  assert (hp.mpl.mode, hp.mpl.h, hp.mpl.baseline, hp.mpl.baseline_decay,
          hp.mpl.temperature, hp.mpl.sample_labels) == (
              "first_order", "dot_product", "previous", 0.01, 1.0, False)
  assert hp.label_smoothing == 0.1
  assert (hp.uda.weight, hp.uda.ramp_steps, hp.uda.temperature,
          hp.uda.threshold) == (2.0, 2, 0.7, 0.6)
  # The teacher's schedule: warm-up over 1 step, cosine over total_steps=10.
  np.testing.assert_allclose(float(hp.teacher_schedule(0)), 0.05)
  np.testing.assert_allclose(float(hp.teacher_schedule(5)),
                             0.05 * 0.5 * (1 + np.cos(np.pi * 4 / 9)),
                             rtol=1e-6)
  ft = _hp(cfg, "mpl_finetune")
  assert (ft.finetune_from, ft.label_smoothing) == ("ema", 0.1)


@pytest.mark.parametrize("method", ["mpl", "mpl_finetune"])
def test_unknown_mpl_key_names_the_key_and_the_fields(method):
  cfg = mpl_config()
  cfg.mpl.baseline_momentum = 0.9
  with pytest.raises(R2D2Error) as e:
    _hp(cfg, method)
  msg = str(e.value)
  assert "config.mpl: unknown key(s) baseline_momentum" in msg
  for field in ("mode (required)", "teacher_optimizer (required)",
                "h='difference'", "baseline='updated'", "finetune_from='ema'",
                "baseline_decay=0.01", "temperature=1.0",
                "sample_labels=False"):
    assert field in msg, (field, msg)


@pytest.mark.parametrize("key,value,match", [
    ("mode", "second_order", "config.mpl: mode='second_order'; choose one of "
     "'exact', 'first_order', 'official_compat'"),
    ("h", "ratio", "config.mpl: h='ratio'; choose one of 'difference', "
     "'dot_product'"),
    ("baseline", "before", "config.mpl: baseline='before'; choose one of "
     "'updated', 'previous'"),
    ("temperature", 0.0, r"config.mpl: temperature=0.0 is outside \(0.0, inf"),
    ("baseline_decay", 1.5, r"config.mpl: baseline_decay=1.5 is outside "
     r"\[0.0, 1.0\]"),
    ("sample_labels", 1, "config.mpl: sample_labels=1 must be True or False"),
])
def test_bad_mpl_values_name_the_field_and_the_valid_ones(key, value, match):
  cfg = mpl_config()
  cfg.mpl = ml_collections.ConfigDict({**cfg.mpl.to_dict(), key: value})
  with pytest.raises(R2D2Error, match=match):
    _hp(cfg)


def test_bad_teacher_optimizer_uda_and_smoothing_are_named():
  cfg = mpl_config()
  cfg.mpl.teacher_optimizer.name = "lion"
  with pytest.raises(R2D2Error,
                     match="config.mpl.teacher_optimizer: .*lion.*sgd"):
    _hp(cfg)
  cfg = mpl_config()
  cfg.uda.weigth = 1.0
  with pytest.raises(R2D2Error,
                     match="config.uda: unknown key.*weigth"):
    _hp(cfg)
  cfg = mpl_config()
  cfg.label_smoothing = 1.0
  with pytest.raises(R2D2Error, match="label_smoothing=1.0"):
    _hp(cfg)
  cfg = mpl_config()
  del cfg["mpl"]
  with pytest.raises(R2D2Error, match="config.mpl is missing"):
    _hp(cfg)


def test_teacher_optimizer_is_built_once_and_the_step_uses_it(monkeypatch):
  """Built when the hyperparameters are parsed; the traced step builds none."""
  with jax.enable_x64(True):
    calls = []
    real = mpl.optim.make_optimizer
    monkeypatch.setattr(mpl.optim, "make_optimizer",
                        lambda *a: calls.append(a) or real(*a))
    cfg = mpl_config()
    ctx = helpers.StepContext(cfg, TinyBNNet(), optax.sgd(0.5),
                              lambda step: jnp.float64(0.5), image_shape=(4,),
                              num_classes=3, total_steps=10)
    assert len(calls) == 1 and calls[0][1] == 10  # the stage's total_steps

    def fail(*a):
      raise AssertionError("make_optimizer called inside the step")
    monkeypatch.setattr(mpl.optim, "make_optimizer", fail)
    rng = np.random.default_rng(0)
    x = lambda n: jnp.asarray(rng.normal(size=(n, 4)))
    y = lambda n: jnp.asarray(rng.integers(0, 3, n), jnp.int32)
    batch = {"labeled": {"weak": x(6), "label": y(6)},
             "unlabeled": {"weak": x(8), "strong": x(8), "label": y(8)}}
    state = ctx.bind(mpl.init_state)(jax.random.key(0))
    key = jax.random.key(1)
    # The teacher's step is hp.teacher_tx's: a zero optimizer freezes it (the
    # teacher's real update is checked in tests/test_update_rules.py).
    frozen = dataclasses.replace(ctx.hp, teacher_tx=optax.set_to_zero())
    step = methods.base.bind(mpl.train_step, net=ctx.net, hp=frozen)
    new, _ = jax.jit(step)(state, batch, key)
    chex.assert_trees_all_equal(new.teacher.params, state.teacher.params)
    assert int(new.teacher.step) == 1
    assert float(jnp.max(jnp.abs(
        new.student.params["Dense_0"]["kernel"] -
        state.student.params["Dense_0"]["kernel"]))) > 1e-6


def test_train_step_dispatches_by_mode():
  assert set(mpl.MODE_STEPS) == set(mpl.MODES)
  assert methods.get_method("mpl") is mpl.METHOD
  assert methods.get_method("mpl_finetune") is mpl.FINETUNE
