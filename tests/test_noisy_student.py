"""Noisy Student ('noisy_student'): the step by hand, the teacher's table, filter and balancing counts, rounds as stages, devices, resume, errors.

The update-rule tests run the real, jitted `train_step` (bound as the trainer
binds it) on the float64 one-layer models of tests/test_update_rules.py; the
reference computes the student's logits by hand (train mode over [labeled
strong; unlabeled strong]) and the loss from the formula of docs/algorithms.md
("Noisy Student"): CE(y, z_l) + λ_u Σ_i n_i CE(t_i, z_u,i) / (B_u n̄).

Break checks (each line was broken in r2d2_jax/methods/noisy_student.py, the
tests named failed, the line was restored):
  the copies n_i dropped from the unlabeled term (weights = 1 / B_u)
                                    test_noisy_student_step[*]
  n̄ dropped from the normalisation test_noisy_student_step[*]
  λ_u = 1 where None asks for μ     test_noisy_student_step[soft-default-weight]
  soft targets without the temperature
                                    test_noisy_student_step[soft-temperature]
  hard targets without label smoothing
                                    test_noisy_student_step[hard-smoothed]
  the student on the weak view / the teacher's rows of the labeled batch
                                    test_noisy_student_step[*] (KeyError /
                                    mismatch)
  the teacher in train mode when labelling (teacher.logits)
                                    test_label_pool_fills_exactly_the_pool_rows
  pool rows not masked when writing the table (every row written)
                                    test_label_pool_fills_exactly_the_pool_rows,
                                    test_rounds_as_stages_end_to_end
  most confident kept → least confident (argsort(conf))
                                    test_copies_known_counts[*balance*]
  the remainder copies to the least confident rows
                                    test_copies_known_counts[balance]
  per_class = kept / C floored instead of rounded
                                    test_copies_known_counts[balance]
  `>=` threshold → `>`              test_copies_known_counts[no-balance]
  the labelling hook re-run on a resumed round (labelled ignored)
                                    test_label_pool_fills_exactly_the_pool_rows
                                    (the second call), test_resume_mid_round_*
  student_init='teacher' ignored    test_student_starts_from_scratch_or_teacher
"""

import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import noisy_student_digits
from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import views
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import noisy_student as ns
from r2d2_jax.methods import teacher as teacher_lib
from r2d2_jax.methods.base import HookContext
from tests import helpers
from tests import test_update_rules as ur

C = ur.C
N_L, N_U = 4, 8
ROWS = 24          # 20 train rows + 4 of padding (8 devices)
N_TRAIN = 20


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def ns_config(uratio=2, **block):
  cfg = helpers.tiny_config("noisy_student", ema_decay=ur.EMA)
  cfg.data.uratio = uratio
  cfg.label_smoothing = 0.1
  cfg.noisy_student = ml_collections.ConfigDict(block)
  return cfg


def make_ctx(cfg, student=None, teacher_model=None, **task):
  ctx = ur.make_ctx(cfg, student or ur.Net(bn=True), mesh=ur.mesh8(),
                    num_train=N_TRAIN, **task)
  ctx.hp = ctx.hp._replace(teacher=teacher_lib.Teacher(
      teacher_model or ur.Net(bn=True), ctx.hp.block.teacher_weights,
      "ur.Net"))
  return ctx


def teacher_variables(rng):
  params, model_state = ur.random_network(rng, bn=True, scale=2.0)
  return {"params": params, **model_state}


def ns_state(rng, ctx, teacher, copies, table=None, pool=None, labelled=1):
  if table is None:
    table = jnp.asarray(rng.normal(size=(ROWS, C)) * 2.0)
  if pool is None:
    pool = np.zeros(ROWS)
    pool[N_L:N_TRAIN] = 1.0
  copies = jnp.asarray(copies, jnp.float64)
  mean = float(np.sum(np.asarray(copies) * pool) / pool.sum())
  return ur.random_train_state(
      rng, ctx.tx, bn=True, scale=2.0, cls=ns.NoisyStudentState,
      teacher=teacher, teacher_loaded=jnp.ones((), jnp.int32),
      table=table, copies=copies, pool=jnp.asarray(pool),
      mean_copies=jnp.asarray(mean), labelled=jnp.asarray(labelled,
                                                          jnp.int32))


# ---------------------------------------------------------------------------
# The update rule


STEP_CASES = {
    # id: (block, uratio, expected λ_u)
    "soft-default-weight": (dict(targets="soft"), 2, 2.0),
    "soft-temperature": (dict(targets="soft", temperature=0.5,
                              unlabeled_weight=0.7), 2, 0.7),
    "hard-smoothed": (dict(targets="hard", unlabeled_weight=1.5), 2, 1.5),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_noisy_student_step(x64, case):
  """One noised student step against the formula; teacher, table and copies untouched."""
  block, uratio, lam = STEP_CASES[case]
  rng = np.random.default_rng(5)
  cfg = ns_config(uratio, **block)
  ctx = make_ctx(cfg)
  teacher = teacher_variables(rng)
  copies = np.zeros(ROWS)
  copies[N_L:N_TRAIN] = rng.integers(0, 4, N_TRAIN - N_L)
  copies[[5, 9]] = (0, 3)
  state = ns_state(rng, ctx, teacher, copies)
  idx_u = np.array([5, 9, 6, 13, 7, 19, 11, 16])
  batch = {"labeled": {"strong": ur.x_of(rng, N_L), "label": ur.y_of(rng, N_L),
                       "index": jnp.arange(N_L, dtype=jnp.int32)},
           "unlabeled": {"strong": ur.x_of(rng, N_U),
                         "label": ur.y_of(rng, N_U),
                         "index": jnp.asarray(idx_u, jnp.int32)}}
  new, metrics = ur.run_step(ns.train_step, state, batch, ctx)

  table = np.asarray(state.table)[idx_u]
  n = copies[idx_u]
  n_bar = copies[N_L:N_TRAIN].mean()
  t_soft = block.get("temperature", 1.0)
  if block["targets"] == "soft":
    targets = ur.softmax(jnp.asarray(table) / t_soft)
  else:
    targets = ur.smooth(ur.onehot(np.argmax(table, -1)), 0.1)

  def loss(params):
    x = jnp.concatenate([batch["labeled"]["strong"],
                         batch["unlabeled"]["strong"]])
    z, ms = ur.ref_forward(params, state.model_state, x, train=True)
    xe = ur.ce(ur.smooth(ur.onehot(batch["labeled"]["label"]), 0.1), z[:N_L])
    per_row = -jnp.sum(targets * ur.log_softmax(z[N_L:]), -1)
    unl = jnp.sum(jnp.asarray(n) * per_row) / (N_U * n_bar)
    return xe + lam * unl, (ms, xe, unl)

  (total, (ms, xe, unl)), grads = jax.value_and_grad(loss, has_aux=True)(
      state.params)
  ur.assert_network_update(new, ur._Old(state), grads, ms)
  ur.assert_close(metrics["losses/total"], total)
  ur.assert_close(metrics["losses/xe"], xe)
  ur.assert_close(metrics["losses/unlabeled"], unl)
  assert float(unl) > 0.1 and float(xe) > 0.1
  np.testing.assert_allclose(float(metrics["monitors/mask"]),
                             np.mean(n > 0), rtol=1e-12)
  for field in ("table", "copies", "pool", "mean_copies", "teacher"):
    chex.assert_trees_all_equal(getattr(new, field), getattr(state, field))


# ---------------------------------------------------------------------------
# Filter and balancing


def _block(**kw):
  return ns.NoisyStudentBlock(**kw)


PRED = np.array([0, 0, 0, 0, 0, 1, 1, 2, 2, 0, 1])
CONF = np.array([.9, .8, .7, .2, .6, .95, .5, .4, .35, .99, .5])
POOL = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0], bool)
# Through the filter (≥ 0.3, in the pool): class 0 rows 0, 1, 2, 4;
# class 1 rows 5, 6; class 2 rows 7, 8: 8 rows, K = round(8 / 3) = 3.
COUNT_CASES = {
    "no-balance": (dict(threshold=0.3), [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0]),
    "threshold-equal-kept": (dict(threshold=0.35),
                             [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 0]),
    "no-filter": (dict(), [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]),
    # class 0: its 3 most confident; classes 1, 2: one copy each and one more
    # for the most confident (K mod 2 = 1).
    "balance": (dict(threshold=0.3, balance=True),
                [1, 1, 1, 0, 0, 2, 1, 2, 1, 0, 0]),
    "balance-no-upsample": (dict(threshold=0.3, balance=True, upsample=False),
                            [1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 0]),
    "balance-per-class-5": (dict(threshold=0.3, balance=True, per_class=5),
                            [2, 1, 1, 0, 1, 3, 2, 3, 2, 0, 0]),
    "balance-per-class-1": (dict(threshold=0.3, balance=True, per_class=1),
                            [1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0]),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_copies_known_counts(case):
  kw, expected = COUNT_CASES[case]
  got = ns.copies_of(PRED, CONF, POOL, 3, _block(**kw))
  np.testing.assert_array_equal(got, expected)


def test_balancing_ties_go_to_the_lower_row():
  pred = np.zeros(4, np.int64)
  conf = np.array([.5, .7, .5, .5])
  pool = np.ones(4, bool)
  got = ns.copies_of(pred, conf, pool, 1, _block(balance=True, per_class=2))
  np.testing.assert_array_equal(got, [1, 1, 0, 0])
  got = ns.copies_of(pred, conf, pool, 1, _block(balance=True, per_class=6))
  np.testing.assert_array_equal(got, [2, 2, 1, 1])


def test_diagnostics_on_a_constructed_example():
  copies = np.array([1, 1, 1, 0, 0, 2, 1, 2, 1, 0, 0])
  labels = np.array([0, 1, 0, 0, 0, 1, 2, 2, 2, 0, 1])
  m = ns.diagnostics(PRED, CONF, POOL, copies, labels, 0.3, 3)
  # Pool rows 0..8; correct: 0, 2, 3, 4, 5, 7, 8 (7 of 9).
  assert m["noisy_student/pseudo_label_accuracy"] == pytest.approx(7 / 9)
  assert m["noisy_student/kept_fraction"] == pytest.approx(8 / 9)
  # Copies of correct rows: 1 + 1 + 2 + 2 + 1 = 7 of 9.
  assert m["noisy_student/kept_accuracy"] == pytest.approx(7 / 9)
  assert m["noisy_student/set_size"] == 9
  assert [m[f"noisy_student/class_count/{c}"] for c in range(3)] == [3, 3, 3]
  assert m["noisy_student/mean_confidence"] == pytest.approx(
      CONF[:9].mean())
  # Unknown hidden labels (-1: a folder's unlabeled images) do not count.
  labels[[1, 5]] = -1
  m = ns.diagnostics(PRED, CONF, POOL, copies, labels, 0.3, 3)
  assert m["noisy_student/pseudo_label_accuracy"] == pytest.approx(6 / 7)
  assert m["noisy_student/kept_accuracy"] == pytest.approx(5 / 6)


# ---------------------------------------------------------------------------
# The labelling hook


def _hook_context(ctx, state, images, labels, eval_batch_size=8):
  def eval_batches(split):
    assert split == "train"
    for start in range(0, N_TRAIN, eval_batch_size):
      idx = np.arange(start, start + eval_batch_size)
      mask = idx < N_TRAIN
      idx = np.where(mask, idx, 0)
      yield {"image": images[idx], "label": labels[idx],
             "index": idx.astype(np.int32), "mask": mask}

  info = types.SimpleNamespace(mean=(0.5,), std=(2.0,))
  return HookContext(
      net=ctx.net, task=ctx.task, hp=ctx.hp, mesh=ctx.mesh,
      state_shardings=ns.state_sharding(state, ctx.mesh), total_steps=100,
      log_every=100, eval_batches=eval_batches,
      normalize=lambda im: views.normalize(im, info))


def test_label_pool_fills_exactly_the_pool_rows(x64):
  """table[pool] ← T(x) in eval mode on normalised, unaugmented images; other
  rows 0; copies by the filter; diagnostics; a labelled state is kept."""
  rng = np.random.default_rng(7)
  labels = rng.integers(0, C, N_TRAIN)
  pool = np.zeros(ROWS)
  pool[[1, 4, 5, 6, 8, 9, 12, 13, 15, 17, 18, 19]] = 1.0
  in_pool = pool[:N_TRAIN] > 0
  teacher = teacher_variables(rng)
  images = rng.integers(0, 256, (N_TRAIN, ur.D)).astype(np.uint8)
  # The teacher by hand: eval mode (running statistics) on normalised images.
  x = (images.astype(np.float32) - np.float32(0.5)) / np.float32(2.0)
  ms = {k: v for k, v in teacher.items() if k != "params"}
  with jax.enable_x64(True):
    z, _ = ur.ref_forward(teacher["params"], ms, jnp.asarray(x), train=False)
  z = np.asarray(z)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  conf = p.max(-1)
  threshold = float(np.median(conf[in_pool]))
  keep = in_pool & (conf >= threshold)

  cfg = ns_config(threshold=threshold)
  ctx = make_ctx(cfg, train_labels=labels)
  state = ns_state(rng, ctx, teacher, np.zeros(ROWS),
                   table=jnp.zeros((ROWS, C)), pool=pool, labelled=0)
  hooks = _hook_context(ctx, state, images, labels)
  # A copy placed as the trainer places it (the hook donates its input).
  placed = jax.device_put(jax.tree.map(jnp.array, state),
                          hooks.state_shardings)
  new, metrics = ns.label_pool(hooks, placed, 0)

  expected = np.zeros((ROWS, C))
  expected[:N_TRAIN][in_pool] = z[in_pool]
  ur.assert_close(new.table, jnp.asarray(expected))
  assert 0 < keep.sum() < in_pool.sum()        # the filter bites
  np.testing.assert_array_equal(np.asarray(new.copies)[:N_TRAIN], keep)
  assert float(new.mean_copies) == pytest.approx(keep.sum() / in_pool.sum())
  assert int(new.labelled) == 1
  correct = (z.argmax(-1) == labels) & in_pool
  assert metrics["noisy_student/pseudo_label_accuracy"] == pytest.approx(
      correct.sum() / in_pool.sum())
  assert metrics["noisy_student/kept_fraction"] == pytest.approx(
      keep.sum() / in_pool.sum())
  for field in ("params", "ema_params", "opt_state", "teacher"):
    chex.assert_trees_all_equal(getattr(new, field), getattr(state, field))

  # A resumed round (labelled = 1): a fresh hook context leaves it as it is.
  edited = new.replace(table=new.table + 1.0)
  again, m2 = ns.label_pool(_hook_context(ctx, state, images, labels),
                            edited, 0)
  assert m2 is None
  np.testing.assert_array_equal(again.table, edited.table)


def test_label_pool_errors(x64):
  rng = np.random.default_rng(8)
  labels = rng.integers(0, C, N_TRAIN)
  images = rng.integers(0, 256, (N_TRAIN, ur.D)).astype(np.uint8)
  ctx = make_ctx(ns_config(threshold=1.0), train_labels=labels)
  teacher = teacher_variables(rng)
  # A teacher with a zero head: every confidence is 1 / C (< the threshold).
  teacher["params"]["Dense_0"]["kernel"] = jnp.zeros((ur.D, C))
  teacher["params"]["Dense_0"]["bias"] = jnp.zeros(C)
  state = ns_state(rng, ctx, teacher, np.zeros(ROWS), labelled=0)
  hooks = _hook_context(ctx, state, images, labels)
  state = jax.device_put(jax.tree.map(jnp.array, state), hooks.state_shardings)
  with pytest.raises(R2D2Error, match=r"confidence filter kept no unlabeled "
                     r"row \(threshold 1\.0; the teacher's largest confidence is 0\.250\)"):
    ns.label_pool(hooks, state, 0)
  no_teacher = state.replace(teacher_loaded=jnp.zeros((), jnp.int32))
  with pytest.raises(R2D2Error, match="has no teacher"):
    ns.label_pool(_hook_context(ctx, state, images, labels), no_teacher, 0)


# ---------------------------------------------------------------------------
# Starting a round


def _previous(rng, num_classes=C):
  params, model_state = ur.random_network(rng, bn=True, scale=2.0)
  ema_params, ema_state = ur.random_network(rng, bn=True, scale=2.0)
  if num_classes != C:
    params["Dense_0"] = {"kernel": jnp.zeros((ur.D, num_classes)),
                         "bias": jnp.zeros(num_classes)}
    ema_params["Dense_0"] = dict(params["Dense_0"])
  return jax.device_get({"params": params, "model_state": model_state,
                         "ema_params": ema_params,
                         "ema_model_state": ema_state, "step": 7})


@pytest.mark.parametrize("init", ["scratch", "teacher"])
def test_student_starts_from_scratch_or_teacher(x64, init):
  rng = np.random.default_rng(9)
  ctx = make_ctx(ns_config(student_init=init))
  state = ns_state(rng, ctx, teacher_variables(rng), np.zeros(ROWS))
  state = state.replace(teacher_loaded=jnp.zeros((), jnp.int32))
  previous = _previous(rng)
  new = ctx.bind(ns.init_from)(state, previous)
  assert int(new.teacher_loaded) == 1
  # The teacher: the previous stage's EMA network (teacher_weights='ema').
  chex.assert_trees_all_close(new.teacher["params"], previous["ema_params"])
  chex.assert_trees_all_close(new.teacher["batch_stats"],
                              previous["ema_model_state"]["batch_stats"])
  if init == "teacher":
    chex.assert_trees_all_close(new.params, previous["params"])
    chex.assert_trees_all_close(new.ema_params, previous["ema_params"])
  else:
    chex.assert_trees_all_equal(new.params, state.params)
    chex.assert_trees_all_equal(new.ema_params, state.ema_params)


def test_a_teacher_of_another_number_of_classes_is_refused(x64):
  rng = np.random.default_rng(10)
  ctx = make_ctx(ns_config())
  state = ns_state(rng, ctx, teacher_variables(rng), np.zeros(ROWS))
  with pytest.raises(R2D2Error, match=r"was trained on 5 classes; this "
                     r"stage's data has 4"):
    ctx.bind(ns.init_from)(state, _previous(rng, num_classes=5))


def test_a_smaller_student_is_refused_unless_allowed(x64):
  ctx = make_ctx(ns_config(), student=ur.Net(bn=False))
  with pytest.raises(R2D2Error, match=r"student has 16 parameters, fewer "
                     r"than its teacher ur\.Net \(22\).*student_at_least_"
                     r"teacher=False"):
    jax.eval_shape(ctx.bind(ns.init_state), jax.random.key(0))
  ctx = make_ctx(ns_config(student_at_least_teacher=False),
                 student=ur.Net(bn=False), labeled_index=np.arange(4),
                 unlabeled_index=np.arange(4, N_TRAIN))
  jax.eval_shape(ctx.bind(ns.init_state), jax.random.key(0))


@pytest.mark.parametrize("edit, match", [
    (lambda c: delattr(c, "noisy_student"),
     r"config\.noisy_student is missing"),
    (lambda c: c.noisy_student.update(dict(targets="argmax")),
     r"config\.noisy_student: targets='argmax'; choose one of 'soft', "
     r"'hard'"),
    (lambda c: c.noisy_student.update(dict(threshold=1.5)),
     r"config\.noisy_student: threshold=1\.5 is outside \[0\.0, 1\.0\]"),
    (lambda c: c.noisy_student.update(dict(per_class=2.5)),
     r"config\.noisy_student: per_class=2\.5 must be an integer"),
    (lambda c: c.noisy_student.update(dict(tau=2.0)),
     r"config\.noisy_student: unknown key\(s\) tau"),
    (lambda c: setattr(c.data, "uratio", 0),
     r"config\.data\.uratio=0: noisy_student trains on an unlabeled batch"),
    (lambda c: c.noisy_student.update(dict(teacher_kwargs=dict(widths=(8,)))),
     r"config\.noisy_student\.teacher_kwargs is set but teacher_model is "
     r"''"),
])
def test_bad_blocks_name_the_field(x64, edit, match):
  cfg = ns_config()
  edit(cfg)
  with pytest.raises(R2D2Error, match=match):
    ur.make_ctx(cfg, ur.Net(bn=True))


# ---------------------------------------------------------------------------
# The trainer: rounds as stages


def tiny_rounds(**round_overrides):
  """teacher (3 steps) -> round1 (4 steps) -> round2 (4 steps, a wider CNN)."""
  c = noisy_student_digits.get_config("runlocal")
  c.data.batch_size = 8
  c.data.uratio = 2
  c.data.num_val = 0
  c.data.eval_batch_size = 240
  c.checkpoint_async = False
  c.checkpoint_every_steps = 2
  small = dict(widths=(8, 8, 8))
  c.stages.teacher.total_steps = 3
  c.stages.teacher.model = ml_collections.ConfigDict(
      dict(name="cnn_small", kwargs=small))
  for name, widths in (("round1", (8, 8, 8)), ("round2", (8, 16, 16))):
    s = c.stages[name]
    s.total_steps = 4
    s.model = ml_collections.ConfigDict(
        dict(name="cnn_small", kwargs=dict(widths=widths, dropout_rate=0.5)))
    s.noisy_student.teacher_kwargs = dict(small if name == "round1" else
                                          dict(widths=(8, 8, 8)))
    s.noisy_student.update(round_overrides)
  return c


def _teacher_logits_on_train(workdir, stage, widths, c):
  """The teacher stage's EMA network applied by hand to every train image."""
  from r2d2_jax import models  # pylint: disable=g-import-not-at-top
  prev, _ = ckpt_lib.restore_raw(str(workdir / stage / "checkpoints"))
  prev = prev.get("student", prev)
  variables = {"params": prev["ema_params"], **prev["ema_model_state"]}
  module = models.get_model("cnn_small", 10, widths=widths)
  s = train.Stage(train.stage_config(c, "round1"), str(workdir / "probe"))
  out = np.zeros((s.task.num_train, 10), np.float32)
  for batch in s.pipeline.eval_batches("train", 240):
    x = views.normalize(jnp.asarray(batch["image"]), s.info)
    z = np.asarray(module.apply(variables, x, train=False))
    m = np.asarray(batch["mask"])
    out[np.asarray(batch["index"])[m]] = z[m]
  return out, s.task


def test_rounds_as_stages_end_to_end(tmp_path):
  """Each round's table is its teacher's prediction on exactly the pool;
  round2's teacher is round1's student."""
  c = tiny_rounds(threshold=0.0, balance=False)
  out = train.train_and_evaluate(c, str(tmp_path / "run"))
  assert set(out) == {"teacher", "round1", "round2"}
  r1, _ = ckpt_lib.restore_raw(str(tmp_path / "run" / "round1"))
  r2, _ = ckpt_lib.restore_raw(str(tmp_path / "run" / "round2"))
  z, task = _teacher_logits_on_train(tmp_path / "run", "teacher", (8, 8, 8),
                                     c)
  pool = np.zeros(len(r1["table"]), bool)
  pool[np.asarray(task.unlabeled_index)] = True
  assert pool.sum() > 0
  table = np.asarray(r1["table"])
  np.testing.assert_allclose(table[:task.num_train][pool[:task.num_train]],
                             z[pool[:task.num_train]], rtol=1e-5, atol=1e-5)
  assert not table[~pool].any()
  np.testing.assert_array_equal(np.asarray(r1["copies"]), pool)
  # The round's logged diagnostics, as benchmarks/noisy_student_rounds.py
  # reads them: no filter and no balancing keep every pool row once.
  from benchmarks import noisy_student_rounds  # pylint: disable=g-import-not-at-top
  d = noisy_student_rounds.round_diagnostics(str(tmp_path / "run" / "round1"))
  assert d["kept_fraction"] == 1.0 and d["set_size"] == pool.sum()
  labels = np.asarray(task.train_labels)
  in_pool = pool[:task.num_train]
  assert d["pseudo_label_accuracy"] == pytest.approx(
      np.mean(z[in_pool].argmax(-1) == labels[in_pool]), abs=1e-6)
  # Round 2's frozen teacher is round 1's EMA student, bit for bit.
  for a, b in zip(jax.tree.leaves(r2["teacher"]["params"]),
                  jax.tree.leaves(r1["ema_params"])):
    np.testing.assert_array_equal(a, b)
  z2, _ = _teacher_logits_on_train(tmp_path / "run", "round1", (8, 8, 8), c)
  np.testing.assert_allclose(np.asarray(r2["table"])[:task.num_train][
      pool[:task.num_train]], z2[pool[:task.num_train]], rtol=1e-5,
                             atol=1e-5)


def _round_config(teacher_dir):
  c = train.stage_config(tiny_rounds(threshold=0.3, balance=True), "round1")
  c.init_from = teacher_dir
  c.total_steps = 6
  c.checkpoint_every_steps = 3
  c.noisy_student.threshold = 0.0   # a 3-step teacher is barely confident
  return c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  c = tiny_rounds()
  c.stage_order = ("teacher",)
  root = tmp_path_factory.mktemp("ns_teacher")
  train.train_and_evaluate(c, str(root))
  return str(root / "teacher" / "checkpoints")


def test_four_devices_equal_one_and_no_recompilation(tmp_path, teacher_dir):
  c = _round_config(teacher_dir)
  s4 = train.Stage(c, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(c, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  s4.run(init_from=teacher_dir)
  s1.run(init_from=teacher_dir)
  a, _ = ckpt_lib.restore_raw(str(tmp_path / "four"))
  b, _ = ckpt_lib.restore_raw(str(tmp_path / "one"))
  assert int(a["labelled"]) == int(b["labelled"]) == 1
  n = s1.task.num_train
  # Padded to 4 devices: 1440 rows; on one: 1437. The rows beyond are empty.
  for field in ("table", "copies", "pool"):
    x, y = np.asarray(a.pop(field)), np.asarray(b.pop(field))
    assert not x[n:].any() and not y[n:].any()
    np.testing.assert_allclose(x[:n], y[:n], rtol=1e-5, atol=1e-5)
    if field == "copies":
      np.testing.assert_array_equal(x[:n], y[:n])
      assert x.sum() > 0
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_resume_mid_round_continues_bitwise(tmp_path, teacher_dir):
  """Straight to 6 == to 3, stop, rerun the same round to 6 (table, copies too)."""
  c = _round_config(teacher_dir)
  train.Stage(c, str(tmp_path / "straight")).run(init_from=teacher_dir)
  stage = train.Stage(c, str(tmp_path / "resumed"))
  stage.total_steps = 3
  stage.run(init_from=teacher_dir)
  train.Stage(c, str(tmp_path / "resumed")).run(init_from=teacher_dir)
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 6
  chex.assert_trees_all_equal(a, b)
