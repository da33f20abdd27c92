"""Distribution alignment (methods/alignment.py): the formula for each kind and target, the first batch, the ring, and FixMatch's real step with it.

The references are written here from the formula (USB `hooks/dist_align.py`,
`DistAlignEMAHook` / `DistAlignQueueHook`):
  p̃ = Normalize(p_u · (p_target + ε) / (p_model + ε)), ε = 1e-6,
the estimates updated with this batch before it is aligned; EMA: the first
batch sets p_model, p_target 'model' starts at 1/C; ring: zero-initialised
rows, the average over all `queue_length` rows.

Break checks (each line was broken in r2d2_jax/methods/alignment.py, the
tests named failed, the line was restored):
  align with the estimates before this batch's update
                                  test_aligned_rows_match_the_formula[*],
                                  test_first_batch_sets_the_ema,
                                  test_fixmatch_step_with_alignment
  first batch blended into the uniform init (`jnp.where(True, ...)`)
                                  test_aligned_rows_match_the_formula[*-ema],
                                  test_first_batch_sets_the_ema,
                                  test_fixmatch_step_with_alignment
  `m` and `1 − m` swapped in the p_model EMA
                                  test_aligned_rows_match_the_formula[*-ema]
                                  (the step test's m = 0.5 is symmetric)
  ring pointer not advanced       test_queue_ring_order,
                                  test_aligned_rows_match_the_formula[*-queue]
  p_target / p_model swapped in `apply`
                                  test_aligned_rows_match_the_formula[*],
                                  test_first_batch_sets_the_ema,
                                  test_fixmatch_step_with_alignment
That the FixMatch step's loss reads the aligned probabilities is checked by
the reference (written from the aligned ones) together with the assertion
that the aligned mask differs from the unaligned one in the first step.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from r2d2_jax import methods
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import alignment as alignment_lib
from r2d2_jax.methods import fixmatch
from tests import helpers
from tests import test_softmatch as tsm
from tests import test_update_rules as ur

C = ur.C
EPS = 1e-6
LABELS = np.array([0, 0, 0, 1, 2, 0, 1, 3, 3, 2, 0, 1])   # train split labels
LABELED = np.array([0, 1, 2, 3, 4, 5])                    # 4 × 0, 1 × 1, 1 × 2


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def task(**kw):
  kw.setdefault("labeled_index", LABELED)
  kw.setdefault("train_labels", LABELS)
  return methods.Task(num_classes=C, num_train=len(LABELS), total_steps=10,
                      steps_per_epoch=1, **kw)


def probs_of(rng, n):
  z = rng.normal(size=(n, C)) * 2.0
  p = np.exp(z - z.max(-1, keepdims=True))
  return p / p.sum(-1, keepdims=True)


def normalize(x):
  return x / x.sum(-1, keepdims=True)


def splitting_threshold(aligned, unaligned, gap=1e-3):
  """A threshold that keeps some aligned rows, drops others, and masks the
  aligned confidences differently from the unaligned ones (no value within
  `gap` of it)."""
  a, b = np.asarray(aligned), np.asarray(unaligned)
  values = np.sort(np.concatenate([a, b]))
  for lo, hi in zip(values[:-1], values[1:]):
    thr = (lo + hi) / 2
    if (hi - lo > 2 * gap and 0 < np.mean(a >= thr) < 1 and
        np.any((a >= thr) != (b >= thr))):
      return float(thr)
  raise AssertionError("no threshold splits these rows")


@pytest.mark.parametrize("kind", ["ema", "queue"])
@pytest.mark.parametrize("target", ["uniform", "labeled", "model"])
def test_aligned_rows_match_the_formula(x64, kind, target):
  """Two batches through `align`; rows sum to 1 and equal the formula."""
  rng = np.random.default_rng(0)
  m, length = 0.7, 3
  hp = alignment_lib.AlignmentHparams(kind=kind, target=target, momentum=m,
                                      queue_length=length)
  stats = alignment_lib.init_stats(task(), hp)
  us = [probs_of(rng, 6), probs_of(rng, 6)]
  ls = [probs_of(rng, 3), probs_of(rng, 3)]
  out = []
  for u, l in zip(us, ls):
    aligned, stats = alignment_lib.align(jnp.asarray(u), jnp.asarray(l),
                                         stats, hp)
    out.append(np.asarray(aligned))
  # By hand, after the second batch.
  mu = [u.mean(0) for u in us]
  ml = [l.mean(0) for l in ls]
  if kind == "ema":
    p_model = m * mu[0] + (1 - m) * mu[1]
    t1 = m * np.full(C, 1 / C) + (1 - m) * ml[0]
    p_model_t = m * t1 + (1 - m) * ml[1]
  else:
    p_model = (mu[0] + mu[1] + 0) / length
    p_model_t = (ml[0] + ml[1] + 0) / length
  p_target = {"uniform": np.full(C, 1 / C),
              "labeled": np.array([4, 1, 1, 0]) / 6,
              "model": p_model_t}[target]
  want = normalize(us[1] * (p_target + EPS) / (p_model + EPS))
  np.testing.assert_allclose(out[1].sum(-1), 1.0, rtol=1e-12)
  np.testing.assert_allclose(out[1], want, rtol=1e-6)
  # Not vacuous: alignment moved the rows.
  assert np.max(np.abs(out[1] - us[1])) > 1e-2
  p_t, p_m = alignment_lib.estimates(stats, hp)
  np.testing.assert_allclose(np.asarray(p_m), p_model, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(p_t), p_target, rtol=1e-6)


def test_first_batch_sets_the_ema(x64):
  """USB starts p_model from None: the first batch's mean, whatever m; the
  'model' target starts at 1/C and blends the first labeled mean in."""
  rng = np.random.default_rng(1)
  hp = alignment_lib.AlignmentHparams(kind="ema", target="model",
                                      momentum=0.9)
  stats = alignment_lib.init_stats(task(), hp)
  np.testing.assert_array_equal(np.asarray(stats["p_model"]), np.full(C, 0.25))
  assert not bool(stats["seen"])
  u, l = probs_of(rng, 5), probs_of(rng, 2)
  aligned, stats = alignment_lib.align(jnp.asarray(u), jnp.asarray(l), stats,
                                       hp)
  # Exactly the batch mean (not blended with the initial 1/C).
  np.testing.assert_allclose(np.asarray(stats["p_model"]), u.mean(0),
                             rtol=1e-12)
  # The estimates start as float32 (the state's dtype): 1e-6.
  np.testing.assert_allclose(np.asarray(stats["p_target"]),
                             0.9 * 0.25 + 0.1 * l.mean(0), rtol=1e-6)
  assert bool(stats["seen"])
  np.testing.assert_allclose(
      np.asarray(aligned),
      normalize(u * (0.9 * 0.25 + 0.1 * l.mean(0) + EPS) / (u.mean(0) + EPS)),
      rtol=1e-6)


def test_queue_ring_order(x64):
  """Row `ptr` is overwritten, then ptr advances mod the length."""
  rng = np.random.default_rng(2)
  hp = alignment_lib.AlignmentHparams(kind="queue", target="model",
                                      queue_length=2)
  stats = alignment_lib.init_stats(task(), hp)
  assert stats["p_model"].shape == (2, C) and int(stats["ptr"]) == 0
  np.testing.assert_array_equal(np.asarray(stats["p_model"]), 0.0)
  means_u, means_l = [], []
  for i in range(3):
    u, l = probs_of(rng, 4), probs_of(rng, 2)
    means_u.append(u.mean(0))
    means_l.append(l.mean(0))
    _, stats = alignment_lib.align(jnp.asarray(u), jnp.asarray(l), stats, hp)
    assert int(stats["ptr"]) == (i + 1) % 2
  # After 3 batches: row 0 holds batch 3, row 1 batch 2 (float32 rows).
  np.testing.assert_allclose(np.asarray(stats["p_model"]),
                             np.stack([means_u[2], means_u[1]]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(stats["p_target"]),
                             np.stack([means_l[2], means_l[1]]), rtol=1e-6)


def test_off_is_the_identity():
  hp = alignment_lib.AlignmentHparams()
  assert not hp.enabled and alignment_lib.init_stats(task(), hp) == {}
  p = jnp.asarray(probs_of(np.random.default_rng(3), 3))
  out, stats = alignment_lib.align(p, None, {}, hp)
  assert out is p and stats == {}


def test_labeled_target_needs_a_labeled_split():
  hp = alignment_lib.AlignmentHparams(kind="ema", target="labeled")
  for t in (task(labeled_index=None), task(labeled_index=np.array([], int)),
            task(train_labels=None)):
    with pytest.raises(R2D2Error, match=r"config\.x\.alignment\.target="
                       r"'labeled' needs the labeled split"):
      alignment_lib.init_stats(t, hp, "config.x.alignment")
  # The other targets do not need it.
  for target in ("uniform", "model"):
    alignment_lib.init_stats(
        task(labeled_index=None),
        alignment_lib.AlignmentHparams(kind="ema", target=target))


# ---------------------------------------------------------------------------
# Through FixMatch's real step


def test_fixmatch_step_with_alignment(x64):
  """config.fixmatch.alignment = ema/labeled: state.alignment after two batches
  by hand, and both steps' losses and updates from the ALIGNED probabilities."""
  rng = np.random.default_rng(7)
  m = 0.5
  cfg = tsm.method_config("fixmatch", fixmatch.default_block(), weight=2.0)
  cfg.fixmatch.alignment = ml_collections.ConfigDict(
      dict(kind="ema", target="labeled", momentum=m))
  ctx = ur.make_ctx(cfg, ur.Net(bn=True), labeled_index=LABELED,
                    train_labels=LABELS)
  marginal = jnp.asarray([4, 1, 1, 0]) / 6
  init = ctx.bind(fixmatch.init_state)(jax.random.key(0))
  np.testing.assert_allclose(np.asarray(init.alignment["p_target"]),
                             marginal, rtol=1e-6)
  state = ur.random_train_state(
      rng, ctx.tx, bn=True, scale=2.0, cls=fixmatch.FixMatchState, stats={},
      alignment={"p_model": jnp.full((C,), 1 / C), "seen": jnp.asarray(False),
                 "p_target": marginal})
  batches = [tsm.make_batch(rng), tsm.make_batch(rng)]
  # τ between the first batch's aligned confidences, masking them unlike the
  # unaligned ones.
  _, z_w, _, _ = tsm.forward(state.params, state.model_state, batches[0])
  p = ur.softmax(z_w)
  q = normalize(p * (marginal + EPS) / (jnp.mean(p, 0) + EPS))
  tau = splitting_threshold(jnp.max(q, -1), jnp.max(p, -1))
  cfg.fixmatch.threshold = tau
  ctx = ur.make_ctx(cfg, ur.Net(bn=True), labeled_index=LABELED,
                    train_labels=LABELS)
  def by_hand(params, model_state, batch, stats, da, step):
    del step
    z_l, z_w, z_s, ms = tsm.forward(params, model_state, batch)
    p = ur.softmax(jax.lax.stop_gradient(z_w))
    p_model = (m * da["p_model"] + (1 - m) * jnp.mean(p, 0) if da["seen"]
               else jnp.mean(p, 0))
    q = normalize(p * (marginal + EPS) / (p_model + EPS))
    w = (jnp.max(q, -1) >= tau).astype(q.dtype)
    t = ur.onehot(jnp.argmax(q, -1))
    xe = ur.ce(ur.onehot(batch["labeled"]["label"]), z_l)
    per_row = -jnp.sum(t * ur.log_softmax(z_s), -1)
    loss = xe + 2.0 * jnp.sum(w * per_row) / q.shape[0]
    return loss, (w, stats, {"p_model": p_model, "seen": True,
                             "p_target": marginal}, ms)

  out = tsm.two_steps(fixmatch.train_step, by_hand, state, batches, ctx)
  # Not vacuous: in the first step the aligned mask differs from the
  # unaligned one, so a loss of the unaligned probabilities would not match;
  # in the second, the estimates have moved on.
  w = out[0][0]
  assert 0 < float(jnp.mean(w)) < 1
  assert bool(jnp.any(w != (jnp.max(p, -1) >= tau)))
  assert float(jnp.max(jnp.abs(out[1][2]["p_model"] -
                               out[0][2]["p_model"]))) > 1e-3


@pytest.mark.parametrize("edit, match", [
    (dict(momentum=1.0),
     r"config\.fixmatch\.alignment: momentum=1\.0 is outside \[0\.0, 1\.0\)"),
    (dict(momentum=-0.5),
     r"config\.fixmatch\.alignment: momentum=-0\.5 is outside"),
    (dict(kind="ema", target="prior"),
     r"config\.fixmatch\.alignment: target='prior'; choose one of"),
    (dict(queue_length=0),
     r"config\.fixmatch\.alignment: queue_length=0 is outside \[1, inf\]"),
    (dict(eps=0.0), r"config\.fixmatch\.alignment: eps=0\.0 is outside"),
    (dict(mom=0.9), r"config\.fixmatch\.alignment: unknown key\(s\) mom\."),
])
def test_bad_input_errors(edit, match):
  c = helpers.tiny_config("fixmatch")
  c.data.uratio = 2
  c.fixmatch = fixmatch.default_block()
  c.fixmatch.alignment = ml_collections.ConfigDict(edit)
  with pytest.raises(R2D2Error, match=match):
    fixmatch.hparams(c)
