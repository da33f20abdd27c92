"""DeiT-style distillation ('distill'): the losses by hand through the real step, τ², hard labels, the frozen teacher, errors, the trainer.

The update-rule tests run the real, jitted `train_step` (bound as the trainer
binds it) on float64 one-layer models (tests/test_update_rules.py): the student
`ur.Net` (BatchNorm + Dense), or `TwoHeadNet` (BatchNorm + a class and a
distillation head) for kind 'token'; the teacher another `ur.Net` with its own
parameters and running statistics. The reference here computes the logits by
hand (the student in train mode over [labeled weak; unlabeled strong], the
teacher in eval mode over [labeled weak; unlabeled weak]), the loss from the
formulas of docs/algorithms.md ("DeiT-style distillation"), its gradient by
`jax.grad`, SGD-Nesterov with coupled weight decay and the EMA by hand.

Break checks (each line was broken in r2d2_jax/methods/distill.py or
teacher.py, the tests named failed, the line was restored):
  τ² dropped from the soft term     test_distill_step[soft], [token-soft],
                                    [soft-batchmean],
                                    test_tau_squared_scaling[3.0-*]
  KL per row where 'numel' is asked (`n = rows`)
                                    test_distill_step[soft], [token-soft],
                                    test_tau_squared_scaling[*-numel]
  KL(p_s ‖ q_t) (arguments swapped) test_distill_step[soft], [token-soft],
                                    [soft-batchmean], test_tau_squared_scaling[*]
  hard targets from the student's argmax
                                    test_distill_step[hard], [token-hard],
                                    [hard-labeled-only],
                                    test_hard_labels_are_the_teachers_argmax
  α and 1 − α swapped               test_distill_step[*] but [hard-labeled-only]
                                    (α = ½ there), test_tau_squared_scaling[*]
  teacher in train mode (batch statistics; teacher.py)
                                    test_distill_step[*], test_tau_squared_*,
                                    test_hard_labels_are_the_teachers_argmax
  teacher sees the strong view      test_distill_step[*] but [hard-labeled-only]
                                    (no unlabeled batch), test_tau_squared_*,
                                    test_hard_labels_are_the_teachers_argmax
  token: the distillation term on the class head
                                    test_distill_step[token-hard], [token-soft]
  the teacher's variables replaced by the student's after the step
                                    test_distill_step[*],
                                    test_teacher_is_frozen_over_steps
  a checkpoint's raw weights where 'ema' is asked and vice versa (teacher.py)
                                    test_teacher_checkpoints_are_checked,
                                    test_teacher_from_a_folder_is_loaded_...,
                                    test_two_stage_config_end_to_end
"""

import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import linen as nn

from configs import distill_digits
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import distill
from r2d2_jax.methods import teacher as teacher_lib
from r2d2_jax.models import vit
from tests import helpers
from tests import test_update_rules as ur

C = ur.C
N_L, N_U = 4, 8


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


class TwoHeadNet(nn.Module):
  """BatchNorm on the inputs, then a class head and a distillation head (float64)."""
  distilled: bool = True

  @nn.compact
  def __call__(self, x, train: bool = False, heads: bool = False):
    x = x.reshape((x.shape[0], -1)).astype(jnp.float64)
    x = nn.BatchNorm(use_running_average=not train, momentum=ur.BN_MOMENTUM,
                     epsilon=ur.BN_EPS, dtype=jnp.float64,
                     param_dtype=jnp.float64)(x)
    dense = lambda name: nn.Dense(C, dtype=jnp.float64,
                                  param_dtype=jnp.float64, name=name)
    z_cls, z_dist = dense("head")(x), dense("head_dist")(x)
    if heads:
      return z_cls, z_dist
    return vit.average_heads(z_cls, z_dist)


def distill_config(unlabeled=True, **block):
  cfg = helpers.tiny_config("distill", ema_decay=ur.EMA)
  cfg.data.uratio = 2 if unlabeled else 0
  cfg.label_smoothing = 0.1
  cfg.distill = ml_collections.ConfigDict(block)
  return cfg


def make_ctx(cfg, student):
  """The step's context with the float64 `ur.Net` teacher (eval mode, BN)."""
  ctx = ur.make_ctx(cfg, student)
  ctx.hp = ctx.hp._replace(teacher=teacher_lib.Teacher(
      ur.Net(bn=True), ctx.hp.distill.teacher_weights, "ur.Net"))
  return ctx


def teacher_variables(rng):
  params, model_state = ur.random_network(rng, bn=True, scale=2.0)
  return {"params": params, **model_state}


def student_state(rng, ctx, two_heads, teacher):
  extra = dict(teacher=teacher, teacher_loaded=jnp.ones((), jnp.int32))
  if not two_heads:
    return ur.random_train_state(rng, ctx.tx, bn=True, scale=2.0,
                                 cls=distill.DistillState, **extra)
  base = ur.random_train_state(rng, ctx.tx, bn=True, scale=2.0)
  n = lambda *s: jnp.asarray(rng.normal(size=s))
  perturb = lambda t: jax.tree.map(
      lambda x: x + 0.1 * jnp.asarray(rng.normal(size=x.shape)), t)
  params = {"BatchNorm_0": base.params["BatchNorm_0"],
            "head": base.params["Dense_0"],
            "head_dist": {"kernel": 2.0 * n(ur.D, C), "bias": 0.3 * n(C)}}
  opt_state = jax.tree.map(
      lambda x: (jnp.asarray(rng.normal(size=x.shape))
                 if jnp.issubdtype(x.dtype, jnp.floating) else x),
      ctx.tx.init(params))
  return distill.DistillState(
      step=base.step, params=params, model_state=base.model_state,
      opt_state=opt_state, ema_params=perturb(params),
      ema_model_state=base.ema_model_state, **extra)


def make_batch(rng, unlabeled=True):
  batch = {"labeled": {"weak": ur.x_of(rng, N_L), "label": ur.y_of(rng, N_L),
                       "index": jnp.arange(N_L, dtype=jnp.int32)}}
  if unlabeled:
    batch["unlabeled"] = {
        "weak": ur.x_of(rng, N_U), "strong": ur.x_of(rng, N_U),
        "label": ur.y_of(rng, N_U),
        "index": jnp.arange(N_L, N_L + N_U, dtype=jnp.int32)}
  return batch


def teacher_logits_by_hand(teacher, batch):
  """The teacher in eval mode (running statistics) on [x_l; weak x_u]."""
  x = batch["labeled"]["weak"]
  if "unlabeled" in batch:
    x = jnp.concatenate([x, batch["unlabeled"]["weak"]])
  ms = {k: v for k, v in teacher.items() if k != "params"}
  z, _ = ur.ref_forward(teacher["params"], ms, x, train=False)
  return z


def by_hand(params, model_state, teacher, batch, *, kind, target, tau, alpha,
            smoothing, reduction):
  """The distillation loss from its formula; returns (loss, (model_state, xe, D))."""
  lab = batch["labeled"]
  x = lab["weak"]
  if "unlabeled" in batch:
    x = jnp.concatenate([x, batch["unlabeled"]["strong"]])
  z_t = teacher_logits_by_hand(teacher, batch)
  if kind == "token":
    bn = {"BatchNorm_0": params["BatchNorm_0"]}
    z_cls, ms = ur.ref_forward({**bn, "Dense_0": params["head"]},
                               model_state, x, train=True)
    z_kd, _ = ur.ref_forward({**bn, "Dense_0": params["head_dist"]},
                             model_state, x, train=True)
  else:
    z_cls, ms = ur.ref_forward(params, model_state, x, train=True)
    z_kd = z_cls
  xe = ur.ce(ur.smooth(ur.onehot(lab["label"]), smoothing), z_cls[:N_L])
  if target == "soft":
    log_q = ur.log_softmax(z_t / tau)
    kl = jnp.sum(jnp.exp(log_q) * (log_q - ur.log_softmax(z_kd / tau)))
    rows = z_kd.shape[0]
    d = tau ** 2 * kl / (rows * C if reduction == "numel" else rows)
  else:
    d = ur.ce(ur.onehot(jnp.argmax(z_t, -1)), z_kd)
  return (1 - alpha) * xe + alpha * d, (ms, xe, d)


# ---------------------------------------------------------------------------
# The update rule


STEP_CASES = {
    # id: (kind, token_target, tau, alpha, reduction, unlabeled)
    "soft": ("soft", "hard", 3.0, 0.3, "numel", True),
    "hard": ("hard", "hard", 3.0, 0.6, "numel", True),
    "token-hard": ("token", "hard", 3.0, 0.4, "numel", True),
    "token-soft": ("token", "soft", 2.0, 0.4, "numel", True),
    "soft-batchmean": ("soft", "hard", 2.0, 0.3, "batchmean", True),
    "hard-labeled-only": ("hard", "hard", 3.0, 0.5, "numel", False),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_distill_step(x64, case):
  """One student step on (1 − α) CE + α D against the formula; the teacher untouched."""
  kind, token_target, tau, alpha, reduction, unlabeled = STEP_CASES[case]
  rng = np.random.default_rng(3)
  cfg = distill_config(unlabeled, kind=kind, token_target=token_target,
                       tau=tau, alpha=alpha, kl_reduction=reduction)
  two_heads = kind == "token"
  ctx = make_ctx(cfg, TwoHeadNet() if two_heads else ur.Net(bn=True))
  teacher = teacher_variables(rng)
  state = student_state(rng, ctx, two_heads, teacher)
  batch = make_batch(rng, unlabeled)
  new, metrics = ur.run_step(distill.train_step, state, batch, ctx)

  target = token_target if two_heads else kind
  loss = lambda p: by_hand(p, state.model_state, teacher, batch, kind=kind,
                           target=target, tau=tau, alpha=alpha,
                           smoothing=0.1, reduction=reduction)
  (total, (ms, xe, d)), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)
  ur.assert_close(metrics["losses/total"], total)
  ur.assert_close(metrics["losses/xe"], xe)
  ur.assert_close(metrics["losses/distill"], d)
  # Not vacuous: both terms count.
  assert float(xe) > 0.1 and float(d) > 1e-3
  for a, b in zip(jax.tree.leaves(new.teacher), jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("reduction", ["numel", "batchmean"])
@pytest.mark.parametrize("tau", [1.0, 3.0])
def test_tau_squared_scaling(x64, tau, reduction):
  """D_soft(τ) = τ² · Σ KL(softmax(Z_t/τ) ‖ softmax(Z_s/τ)) / N, N = rows·C or rows."""
  rng = np.random.default_rng(4)
  cfg = distill_config(kind="soft", tau=tau, alpha=1.0,
                       kl_reduction=reduction)
  ctx = make_ctx(cfg, ur.Net(bn=True))
  teacher = teacher_variables(rng)
  state = student_state(rng, ctx, False, teacher)
  batch = make_batch(rng)
  _, metrics = ur.run_step(distill.train_step, state, batch, ctx)
  x = jnp.concatenate([batch["labeled"]["weak"], batch["unlabeled"]["strong"]])
  z_s, _ = ur.ref_forward(state.params, state.model_state, x, train=True)
  z_t = teacher_logits_by_hand(teacher, batch)
  q, p = ur.softmax(z_t / tau), ur.softmax(z_s / tau)
  kl = float(jnp.sum(q * (jnp.log(q) - jnp.log(p))))
  n = (N_L + N_U) * (C if reduction == "numel" else 1)
  np.testing.assert_allclose(float(metrics["losses/distill"]) / (kl / n),
                             tau ** 2, rtol=1e-9)
  # alpha = 1: the labels do not count.
  ur.assert_close(metrics["losses/total"], metrics["losses/distill"])


def test_hard_labels_are_the_teachers_argmax(x64):
  """α = 1, kind 'hard': D = CE(argmax Z_t, Z_s), not the labels', not the student's."""
  rng = np.random.default_rng(5)
  cfg = distill_config(kind="hard", alpha=1.0)
  ctx = make_ctx(cfg, ur.Net(bn=True))
  teacher = teacher_variables(rng)
  state = student_state(rng, ctx, False, teacher)
  batch = make_batch(rng)
  _, metrics = ur.run_step(distill.train_step, state, batch, ctx)
  x = jnp.concatenate([batch["labeled"]["weak"], batch["unlabeled"]["strong"]])
  z_s, _ = ur.ref_forward(state.params, state.model_state, x, train=True)
  t = jnp.argmax(teacher_logits_by_hand(teacher, batch), -1)
  labels = jnp.concatenate([batch["labeled"]["label"],
                            batch["unlabeled"]["label"]])
  # The three candidate targets differ on this batch.
  assert bool(jnp.any(t != labels)) and bool(jnp.any(t != jnp.argmax(z_s, -1)))
  ur.assert_close(metrics["losses/distill"], ur.ce(ur.onehot(t), z_s))
  for other in (labels, jnp.argmax(z_s, -1)):
    assert abs(float(metrics["losses/distill"]) -
               float(ur.ce(ur.onehot(other), z_s))) > 1e-3
  np.testing.assert_allclose(
      metrics["monitors/pseudo_label_accuracy"],
      np.mean(np.asarray(t[N_L:]) == np.asarray(batch["unlabeled"]["label"])))
  np.testing.assert_allclose(
      metrics["monitors/teacher_accuracy"],
      np.mean(np.asarray(t[:N_L]) == np.asarray(batch["labeled"]["label"])))


def test_teacher_is_frozen_over_steps(x64):
  """Three steps: the teacher's parameters and running statistics bitwise unchanged."""
  rng = np.random.default_rng(6)
  cfg = distill_config(kind="soft")
  ctx = make_ctx(cfg, ur.Net(bn=True))
  teacher = teacher_variables(rng)
  state = student_state(rng, ctx, False, teacher)
  step = jax.jit(ctx.bind(distill.train_step))
  new = state
  for i in range(3):
    new, _ = step(new, make_batch(rng), jax.random.key(i))
  for a, b in zip(jax.tree.leaves(new.teacher), jax.tree.leaves(teacher)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(new.teacher_loaded) == 1 and int(new.step) == int(state.step) + 3
  assert not np.allclose(new.params["Dense_0"]["kernel"],
                         state.params["Dense_0"]["kernel"])


# ---------------------------------------------------------------------------
# Hyperparameters and errors


def _hp(cfg, num_classes=10):
  task = types.SimpleNamespace(num_classes=num_classes)
  return distill.hparams(cfg, task)


@pytest.mark.parametrize("kind,alpha", [("soft", 0.1), ("hard", 0.5),
                                        ("token", 0.5)])
def test_default_alpha_and_tau(kind, alpha):
  hp = _hp(distill_config(kind=kind))
  assert hp.distill.alpha == alpha and hp.distill.tau == 3.0
  assert hp.distill.target == ("hard" if kind != "soft" else "soft")
  assert hp.teacher.model.num_classes == 10
  assert distill.views(hp) == {"labeled": ("weak",),
                               "unlabeled": ("weak", "strong")}
  assert distill.views(_hp(distill_config(False, kind=kind))) == {
      "labeled": ("weak",)}


@pytest.mark.parametrize("block,match", [
    (None, "config.distill is missing"),
    (dict(kind="kd"), "config.distill: kind='kd'"),
    (dict(tau=0.0), "config.distill: tau=0.0"),
    (dict(alpha=1.5), "config.distill: alpha=1.5"),
    (dict(kl_reduction="mean"), "kl_reduction"),
    (dict(temperature=2.0), "unknown key.*temperature"),
    (dict(teacher_model="nope"), "teacher_model='nope'.*Unknown model"),
    (dict(teacher_kwargs=dict(widths=(8,))),
     "set config.distill.teacher_model"),
])
def test_bad_blocks_name_the_field(block, match):
  cfg = distill_config()
  if block is None:
    del cfg["distill"]
  else:
    cfg.distill = ml_collections.ConfigDict(block)
  with pytest.raises(R2D2Error, match=match):
    _hp(cfg)


def test_token_kind_needs_a_distillation_token(x64):
  cfg = distill_config(kind="token")
  ctx = make_ctx(cfg, ur.Net(bn=True))
  with pytest.raises(R2D2Error, match="needs a student with a distillation "
                     "token.*vit_digits_distilled"):
    jax.eval_shape(ctx.bind(distill.init_state), jax.random.key(0))
  rng = np.random.default_rng(0)
  state = student_state(rng, ctx, False, teacher_variables(rng))
  with pytest.raises(R2D2Error, match="distillation token"):
    ur.run_step(distill.train_step, state, make_batch(rng), ctx)


def test_teacher_checkpoints_are_checked(x64):
  """Another number of classes, another architecture, a non-checkpoint."""
  rng = np.random.default_rng(1)
  t = teacher_lib.Teacher(ur.Net(bn=True), "ema", "ur.Net")
  like = teacher_variables(rng)
  state = ur.random_train_state(rng, ur.student_tx(), bn=True)
  previous = {f: getattr(state, f) for f in
              ("params", "model_state", "ema_params", "ema_model_state")}
  # The EMA weights of the checkpoint, by default.
  got = teacher_lib.from_checkpoint(t, previous, like, C)
  ur.assert_close(got["params"], state.ema_params)
  got = teacher_lib.from_checkpoint(
      teacher_lib.Teacher(ur.Net(bn=True), "raw"), {"student": previous},
      like, C)
  ur.assert_close(got["batch_stats"], state.model_state["batch_stats"])
  five = dict(previous)
  five["ema_params"] = {**previous["ema_params"], "Dense_0": {
      "kernel": np.zeros((ur.D, C + 1)), "bias": np.zeros(C + 1)}}
  with pytest.raises(R2D2Error, match=f"trained on {C + 1} classes; this "
                     f"stage's data has {C}"):
    teacher_lib.from_checkpoint(t, five, like, C)
  no_bn = ur.random_train_state(rng, ur.student_tx(), bn=False)
  other = {f: getattr(no_bn, f) for f in previous}
  with pytest.raises(R2D2Error, match="set config.distill.teacher_model"):
    teacher_lib.from_checkpoint(t, other, like, C)
  with pytest.raises(R2D2Error, match="Is it a checkpoint of this library"):
    teacher_lib.from_checkpoint(t, {"weights": 1}, like, C)


def test_no_teacher_is_an_error_before_the_first_step(tmp_path):
  hp = _hp(distill_config(kind="hard"))
  state = types.SimpleNamespace(teacher_loaded=jnp.zeros((), jnp.int32))
  hooks = types.SimpleNamespace(cache={}, hp=hp, task=None,
                                state_shardings=None)
  with pytest.raises(R2D2Error, match="has no teacher: set config.distill."
                     "teacher_from"):
    distill.load_teacher(hooks, state, 0)
  hp = _hp(distill_config(kind="hard", teacher_from=str(tmp_path / "no")))
  hooks.hp = hp
  with pytest.raises(R2D2Error, match="teacher_from=.*no such folder"):
    distill.load_teacher(hooks, state, 0)
  # A teacher already in (init_from, a resumed checkpoint): nothing to do.
  loaded = types.SimpleNamespace(teacher_loaded=jnp.ones((), jnp.int32))
  assert distill.load_teacher(hooks, loaded, 0) == (loaded, None)


def test_teacher_from_a_folder_is_loaded_before_the_first_step(x64, tmp_path):
  """The hook restores `teacher_from` (raw weights here) into the state, once."""
  rng = np.random.default_rng(2)
  saved = ur.random_train_state(rng, ur.student_tx(), bn=True)
  ck = ckpt_lib.Checkpointer(str(tmp_path / "teacher" / "checkpoints"),
                             async_save=False)
  ck.save(7, saved, {"step": 7})
  ck.close()
  cfg = distill_config(kind="hard", teacher_weights="raw",
                       teacher_from=str(tmp_path / "teacher"))
  ctx = make_ctx(cfg, ur.Net(bn=True))
  placeholder = teacher_variables(rng)
  state = student_state(rng, ctx, False, placeholder).replace(
      teacher_loaded=jnp.zeros((), jnp.int32))
  hooks = types.SimpleNamespace(cache={}, hp=ctx.hp, task=ctx.task,
                                state_shardings=None)
  new, _ = distill.load_teacher(hooks, state, 0)
  assert int(new.teacher_loaded) == 1
  ur.assert_close(new.teacher["params"], saved.params)
  ur.assert_close(new.teacher["batch_stats"],
                  saved.model_state["batch_stats"])
  ur.assert_close(new.params, state.params)   # the student is untouched
  # Checked once per stage: a later call changes nothing.
  assert distill.load_teacher(hooks, state, 1)[0] is state


# ---------------------------------------------------------------------------
# The trainer


def tiny_two_stage(kind="token"):
  c = distill_digits.get_config(f"{kind},runlocal")
  c.data.batch_size = 8
  c.data.uratio = 2
  c.data.num_val = 0
  c.data.eval_batch_size = 120
  c.checkpoint_async = False
  c.stages.teacher.total_steps = 3
  c.stages.teacher.data.batch_size = 16
  c.stages.teacher.model = ml_collections.ConfigDict(dict(
      name="cnn_small", kwargs=dict(widths=(8, 8, 8))))
  c.stages.distill.total_steps = 3
  c.stages.distill.model = ml_collections.ConfigDict(dict(
      name="vit", kwargs=dict(patch_size=4, width=16, depth=1, num_heads=2,
                              distilled=kind == "token")))
  c.stages.distill.distill.teacher_kwargs = dict(widths=(8, 8, 8))
  return c


def test_two_stage_config_end_to_end(tmp_path):
  """Teacher stage (supervised cnn_small) -> distill stage (token, a tiny ViT)."""
  c = tiny_two_stage("token")
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert set(out) == {"teacher", "distill"}
  for name in ("raw", "ema", "raw_cls", "raw_dist", "ema_cls", "ema_dist"):
    assert 0.0 <= out["distill"][f"accuracy/test/{name}"] <= 1.0
  teacher_ckpt = str(tmp_path / "run" / "teacher" / "checkpoints")
  teacher, _ = ckpt_lib.restore_raw(teacher_ckpt)
  student, _ = ckpt_lib.restore_raw(str(tmp_path / "run" / "distill"))
  assert int(student["teacher_loaded"]) == 1
  # The frozen teacher is the teacher stage's EMA network, bit for bit.
  for a, b in zip(jax.tree.leaves(student["teacher"]["params"]),
                  jax.tree.leaves(teacher["ema_params"])):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(student["teacher"]["batch_stats"]),
                  jax.tree.leaves(teacher["ema_model_state"])):
    np.testing.assert_array_equal(a, b)



def test_labeled_view_strong_feeds_both_networks_the_strong_images(x64):
  """labeled_view='strong' (DeiT's RandAugment): teacher and student see
  batch['labeled']['strong']; the weak images are not read."""
  rng = np.random.default_rng(11)
  cfg = distill_config(False, kind="hard", alpha=0.5,
                       labeled_view="strong")
  ctx = make_ctx(cfg, ur.Net(bn=True))
  assert distill.views(ctx.hp) == {"labeled": ("strong",)}
  teacher = teacher_variables(rng)
  state = student_state(rng, ctx, False, teacher)
  batch = make_batch(rng, unlabeled=False)
  batch["labeled"]["strong"] = ur.x_of(rng, N_L, scale=3.0)
  new, metrics = ur.run_step(distill.train_step, state, batch, ctx)
  as_weak = {"labeled": dict(batch["labeled"],
                             weak=batch["labeled"]["strong"])}
  loss = lambda p: by_hand(p, state.model_state, teacher, as_weak,
                           kind="hard", target="hard", tau=3.0, alpha=0.5,
                           smoothing=0.1, reduction="numel")
  (total, (ms, _, _)), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)
  ur.assert_close(metrics["losses/total"], total)
