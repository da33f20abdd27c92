"""CTAugment: ops vs PIL, weights -> draws, the sequential update, learning through the step, the trainer.

Reference: google-research/fixmatch libml/ctaugment.py (transcribed in this
file: `_pil_op`, `_reference_update_rates`, the cutout loop), fixmatch.py
(AugmentPoolCTACutOut), cta/lib/train.py (proximity).

* every op against PIL on random images, with the level -> argument formulas
  written here (exact, but rotate / shear whose resampling grid is
  image_ops.affine_nearest's: a few pixels at the edges of the source grid);
* rate_to_p; the training draw never draws a bin below the threshold and
  draws the others in proportion to p; the probe draw is uniform;
* the update equals the reference's Python loop (several updates of the
  same bin in one batch, in order);
* a template classifier (right only for an unchanged image): through the
  real fixmatch train_step, the bins of an op that destroys the image
  (invert at high level) fall, the no-op ops' stay at 1;
* the trainer: 4 devices == 1 and one compilation; resume bitwise with the
  bin weights in the checkpoint; bad settings name their field.

Break checks (each line broken in r2d2_jax/data/ctaugment.py, the tests
named failed, the line restored):
  update: the batch's (image, layer) pairs in reverse order (`scan(...,
    reverse=True)`)              test_update_is_the_reference_loop
  update: bin `int(v * n)` without the 0.999
                                 test_update_is_the_reference_loop
  rate_to_p: `p < th` -> `p <= th`
                                 test_rate_to_p
  draw: bins from the unthresholded weights (rate_to_p skipped)
                                 test_training_draw_follows_the_weights
  blend rounding instead of truncating (`+ scale // 2`)
                                 test_ops_match_pil[invert], [blur], [color]
  proximity `1 - sum |p - y|` (no 0.5)
                                 test_proximity
"""

import zlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import linen as nn
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from r2d2_jax import checkpoint as ckpt_lib
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.data import augment as aug
from r2d2_jax.data import ctaugment as cta
from r2d2_jax.data import sources
from r2d2_jax.data import views as views_lib
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import fixmatch
from tests import helpers

# ---------------------------------------------------------------------------
# Ops against PIL (the reference's op bodies, levels -> arguments as there)

_ENH = {"brightness": ImageEnhance.Brightness, "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast, "sharpness": ImageEnhance.Sharpness}
_RESAMPLE = (Image.Resampling.LANCZOS, Image.Resampling.BICUBIC,
             Image.Resampling.BILINEAR, Image.Resampling.BOX,
             Image.Resampling.HAMMING, Image.Resampling.NEAREST)


def _pil_op(y, name, v, m):
  """libml/ctaugment.py's op `name` at levels (v, m), on a PIL image."""
  if name == "autocontrast":
    return Image.blend(y, ImageOps.autocontrast(y), v)
  if name == "equalize":
    return Image.blend(y, ImageOps.equalize(y), v)
  if name == "invert":
    return Image.blend(y, ImageOps.invert(y), v)
  if name == "blur":
    return Image.blend(y, y.filter(ImageFilter.BLUR), v)
  if name == "smooth":
    return Image.blend(y, y.filter(ImageFilter.SMOOTH), v)
  if name in _ENH:
    return _ENH[name](y).enhance(0.1 + 1.9 * v)
  if name == "posterize":
    return ImageOps.posterize(y, 1 + int(v * 7.999))
  if name == "solarize":
    return ImageOps.solarize(y, int(v * 255.999))
  if name == "rescale":
    s = y.size
    scale = v * 0.25
    crop = (scale * s[0], scale * s[1], s[0] * (1 - scale), s[1] * (1 - scale))
    return y.crop(crop).resize(y.size, _RESAMPLE[int(m * 5.99)])
  if name == "rotate":
    return y.rotate(int(np.round((2 * v - 1) * 45)))
  if name in ("shear_x", "shear_y", "translate_x", "translate_y"):
    d = (2 * v - 1) * 0.3
    coeffs = {"shear_x": (1, d, 0, 0, 1, 0), "shear_y": (1, 0, 0, d, 1, 0),
              "translate_x": (1, 0, d, 0, 1, 0),
              "translate_y": (1, 0, 0, 0, 1, d)}[name]
    return y.transform(y.size, Image.Transform.AFFINE, coeffs)
  assert name == "identity"
  return y


def _compare(name, shape, n, seed):
  rng = np.random.default_rng(seed)
  mismatched, total = 0, 0
  for _ in range(n):
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    v, m = rng.uniform(0, 1, 2)
    pil = Image.fromarray(x[..., 0] if shape[-1] == 1 else x)
    ref = np.asarray(_pil_op(pil, name, v, m)).astype(np.int64)
    ref = ref.reshape(shape)
    got = np.asarray(cta.apply_op(jnp.asarray(x, jnp.float32), name,
                                  jnp.asarray([v, m], jnp.float32)))
    assert np.all(got == np.round(got)), name
    mismatched += int(np.sum(got.astype(np.int64) != ref))
    total += ref.size
  return mismatched / total


@pytest.mark.parametrize("name", [o for o in cta.OPS if o != "cutout"])
def test_ops_match_pil(name):
  """Exact, but the geometric ops' 1/1024 matrix grid (image_ops) and
  autocontrast's exact division."""
  for shape in ((16, 16, 3), (12, 10, 1)):
    frac = _compare(name, shape, 6, seed=zlib.crc32(name.encode()))
    if name in ("rotate", "shear_x", "shear_y"):
      assert frac < 0.03, (name, shape, frac)
    elif name == "autocontrast":
      # image_ops.auto_contrast's exact (i - lo) 255 / (hi - lo); PIL's
      # double `i * scale + offset` falls below an exact integer now and then.
      assert frac < 0.002, (name, shape, frac)
    else:
      assert frac == 0.0, (name, shape, frac)


def test_translate_is_the_identity_and_cutout_is_the_reference_loop():
  """translate_x/y shift by at most 0.3 PIXELS: with nearest, no change."""
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (12, 12, 3)).astype(np.float32)
  for v in (0.0, 0.3, 0.999):
    for name in ("translate_x", "translate_y"):
      np.testing.assert_array_equal(
          cta.apply_op(x, name, jnp.asarray([v, 0.0])), x)
  h = w = 12
  for v, py, px in ((1.0, 0.5, 0.5), (0.4, 0.05, 0.9), (0.0, 0.3, 0.3),
                    (0.99, 0.99, 0.0)):
    got = np.asarray(cta.apply_op(x, "cutout", jnp.asarray([v, 0.0]),
                                  jnp.asarray([py, px])))
    # The reference's loop, (height_loc, width_loc) = our (row, column).
    size = 1 + int(v * min(h, w) * 0.499)
    hl, wl = int(py * h), int(px * w)
    ref = x.copy()
    for i in range(max(0, hl - size // 2), min(h, hl + size // 2)):
      for j in range(max(0, wl - size // 2), min(w, wl + size // 2)):
        ref[i, j] = 127
    np.testing.assert_array_equal(got, ref)


# ---------------------------------------------------------------------------
# Weights -> draws


def test_rate_to_p():
  rates = jnp.zeros((cta.MAX_BINS,)).at[:5].set(
      jnp.asarray([1.0, 0.79, 0.5, 0.0, 0.9]))
  p = np.asarray(cta.rate_to_p(rates, 5, threshold=0.8, decay=0.99))
  raw = np.asarray([1.0, 0.79, 0.5, 0.0, 0.9]) + 0.01
  ref = raw / raw.max()
  ref[ref < 0.8] = 0
  np.testing.assert_allclose(p[:5], ref, rtol=1e-6)
  assert p[1] == 0 and p[4] == pytest.approx(0.91 / 1.01, rel=1e-6)
  assert np.all(p[5:] == 0)                             # beyond the op's bins
  # At the threshold exactly (binary-exact numbers): kept (`p < th` is cut).
  p = np.asarray(cta.rate_to_p(jnp.asarray([0.5, 0.0, 0.25] + [9.0] * 14),
                               3, threshold=0.5, decay=0.5))
  np.testing.assert_array_equal(p[:3], [1.0, 0.5, 0.75])


def _draw_many(n, rates, ops, probe=False):
  keys = jax.random.split(jax.random.key(3), n)
  fn = lambda k: cta.draw(k, 2, None if probe else rates, threshold=0.8,
                          decay=0.99, ops=ops)[0]
  d = jax.jit(jax.vmap(fn))(keys)
  return np.asarray(d.op).reshape(-1), np.asarray(d.values).reshape(-1, 2)


def test_training_draw_follows_the_weights():
  rng = np.random.default_rng(0)
  rates = np.ones((len(cta.OPS), 2, cta.MAX_BINS), np.float32)
  solar, post, resc = (cta.OPS.index(o) for o in
                       ("solarize", "posterize", "rescale"))
  rates[solar, 0] = rng.uniform(0.5, 1.0, cta.MAX_BINS)
  rates[post, 0, :8] = rng.uniform(0.5, 1.0, 8)
  rates[resc, 1, :6] = [1.0, 0.2, 0.9, 0.85, 0.1, 0.95]
  op, values = _draw_many(30000, jnp.asarray(rates),
                          ("solarize", "posterize", "rescale"))
  for o, j, nb in ((solar, 0, 17), (post, 0, 8), (resc, 1, 6)):
    v = values[op == o, j]
    bins = np.floor(v.astype(np.float64) * nb).astype(int)
    p = rates[o, j, :nb] + 0.01
    p = p / p.max()
    p[p < 0.8] = 0
    expected = p / p.sum()
    freq = np.bincount(bins, minlength=nb) / len(bins)
    assert np.all(freq[expected == 0] == 0), (o, freq, expected)
    sigma = np.sqrt(expected * (1 - expected) / len(bins))
    assert np.all(np.abs(freq - expected) <= 5 * sigma + 1e-12), (o, freq)
  # The ops are uniform; an op's absent parameter is 0.
  np.testing.assert_allclose(np.bincount(op)[[solar, post, resc]] / len(op),
                             1 / 3, atol=0.015)
  assert np.all(values[op != resc, 1] == 0)


def test_probe_draw_is_uniform():
  op, values = _draw_many(20000, None, None, probe=True)
  np.testing.assert_allclose(np.bincount(op, minlength=19) / len(op),
                             1 / 19, atol=0.006)
  v = values[op == cta.OPS.index("rescale")]
  np.testing.assert_allclose(v.mean(0), 0.5, atol=0.03)
  assert np.all(values[op == cta.OPS.index("identity")] == 0)


# ---------------------------------------------------------------------------
# The update


def _reference_update_rates(rates, policy, proximity, decay):
  """libml/ctaugment.py CTAugment.update_rates, rates {op: [arrays]}."""
  for k, bins in policy:
    for p, rate in zip(bins, rates[k]):
      p = int(p * len(rate) * 0.999)
      rate[p] = rate[p] * decay + proximity * (1 - decay)


def test_update_is_the_reference_loop():
  rng = np.random.default_rng(1)
  b, n, decay = 6, 2, 0.9
  rates = rng.uniform(0.2, 1.0, (len(cta.OPS), 2, cta.MAX_BINS)).astype(
      np.float32)
  # Few ops and values on few bins: many updates of the same bin per batch.
  op = rng.choice([cta.OPS.index(o) for o in ("solarize", "rescale",
                                              "identity")], (b, n))
  values = rng.choice([0.05, 0.5, 0.98], (b, n, 2)).astype(np.float32)
  # 0.5 of rescale's 6 methods: bin 2 (int(3 * 0.999)), not 3.
  op[0, 0], values[0, 0] = cta.OPS.index("rescale"), 0.5
  values[op != cta.OPS.index("rescale"), 1] = 0
  values[op == cta.OPS.index("identity")] = 0
  prox = rng.uniform(0, 1, b).astype(np.float32)
  got = cta.update(jnp.asarray(rates), jnp.asarray(op), jnp.asarray(values),
                   jnp.asarray(prox), decay)
  ref = {name: [rates[o, j, :cta.BINS[name][j]].copy()
                for j in range(len(cta.BINS[name]))]
         for o, name in enumerate(cta.OPS)}
  for i in range(b):
    policy = [(cta.OPS[op[i, d]],
               values[i, d, :len(cta.BINS[cta.OPS[op[i, d]]])].tolist())
              for d in range(n)]
    _reference_update_rates(ref, policy, prox[i], decay)
  expected = rates.copy()
  for o, name in enumerate(cta.OPS):
    for j, r in enumerate(ref[name]):
      expected[o, j, :len(r)] = r
  assert not np.allclose(expected, rates)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7)


def test_proximity():
  probs = jnp.asarray([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
  np.testing.assert_allclose(
      cta.proximity(probs, jnp.asarray([0, 0])),
      [1 - 0.5 * (0.3 + 0.2 + 0.1), 1 - 0.5 * (0.9 + 0.1 + 0.8)], rtol=1e-6)


# ---------------------------------------------------------------------------
# Learning through the real fixmatch train_step

_NC, _HW = 4, 8
_TEMPLATES = np.random.default_rng(5).integers(0, 256, (_NC, _HW, _HW, 1))


class _TemplateNet(nn.Module):
  """logits_c = -||x - T_c||^2 / D: right only if x is (nearly) T_y."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    bias = self.param("bias", nn.initializers.zeros, (_NC,))
    x = x.reshape(x.shape[0], -1)
    t = jnp.asarray(_TEMPLATES.reshape(_NC, -1) / 255.0, x.dtype)
    d = jnp.mean((x[:, None, :] - t[None]) ** 2, -1)
    return -60.0 * d + bias


def test_a_destroying_op_loses_its_weight():
  """Invert at a high level destroys the image; translate is a no-op."""
  c = helpers.tiny_config("fixmatch", ema_decay=0.5)
  c.data.uratio = 1
  ops = ("translate_x", "translate_y", "invert")
  c.data.augment.strong.update(policy="ctaugment", num_ops=1, decay=0.8,
                               ops=ops)
  c.fixmatch = fixmatch.default_block()
  ctx = helpers.StepContext(c, _TemplateNet(), optax.sgd(0.1),
                            lambda s: 0.1, image_shape=(_HW, _HW, 1),
                            num_classes=_NC)
  assert fixmatch.views(ctx.hp)["labeled"] == ("weak", "probe")
  state = ctx.bind(fixmatch.init_state)(jax.random.key(0))
  np.testing.assert_array_equal(state.augment["ctaugment"]["rates"], 1.0)
  step = jax.jit(ctx.bind(fixmatch.train_step))
  labels = np.tile(np.arange(_NC), 4)
  images = jnp.asarray(_TEMPLATES[labels], jnp.float32)
  probe = jax.jit(jax.vmap(lambda k, x: cta.probe(k, x, num_ops=1, ops=ops)))
  for i in range(30):
    p_img, draws = probe(jax.random.split(jax.random.key(i), len(labels)),
                         images)
    x = images / 255.0
    batch = {"labeled": {"weak": x, "probe": p_img / 255.0,
                         "probe_aux": draws, "label": jnp.asarray(labels),
                         "index": jnp.arange(len(labels))},
             "unlabeled": {"weak": x, "strong": x, "label": jnp.asarray(labels),
                           "index": jnp.arange(len(labels))}}
    state, metrics = step(state, batch, jax.random.key(i))
  rates = np.asarray(state.augment["ctaugment"]["rates"])
  inv = rates[cta.OPS.index("invert"), 0]
  assert inv[9:].mean() < 0.3, inv           # level >= 0.53: destroyed
  assert inv[12:].max() < 0.35, inv          # level >= 0.7
  assert inv[:2].min() > 0.95, inv           # level < 0.12: still right
  for name in ("translate_x", "translate_y"):
    assert rates[cta.OPS.index(name), 0].min() > 0.95, rates[
        cta.OPS.index(name), 0]
  # The untouched ops (not drawn from) keep 1.
  np.testing.assert_array_equal(rates[cta.OPS.index("blur")], 1.0)
  assert 0.0 < float(metrics["monitors/ctaugment_proximity"]) < 1.0


# ---------------------------------------------------------------------------
# Through the trainer


def stage_config(**overrides):
  c = helpers.tiny_config("fixmatch", **overrides)
  c.data.uratio = 2
  # A few of the ops: the same machinery, a fraction of the compile time.
  c.data.augment.strong.update(policy="ctaugment", num_ops=2, threshold=0.8,
                               decay=0.9, cutout=4,
                               ops=("invert", "solarize", "translate_x"))
  c.fixmatch = fixmatch.default_block()
  c.fixmatch.threshold = 0.3
  return c


def test_trainer_four_devices_equal_one_and_no_recompilation(tmp_path):
  c = stage_config()
  s4 = train.Stage(c, str(tmp_path / "four"),
                   mesh=sharding.make_mesh(jax.devices()[:4]))
  s1 = train.Stage(c, str(tmp_path / "one"),
                   mesh=sharding.make_mesh(jax.devices()[:1]))
  assert s1.streams == ("labeled", "unlabeled")
  st4, m4 = helpers.run_steps(s4, 3)
  st1, m1 = helpers.run_steps(s1, 3)
  rates = np.asarray(st1.augment["ctaugment"]["rates"])
  assert rates.min() < 0.99          # the probes' bins moved
  chex.assert_trees_all_close(jax.device_get(st4), jax.device_get(st1),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(m4, m1, rtol=1e-5, atol=1e-6)
  assert s4.train_step._cache_size() == 1  # pylint: disable=protected-access


def test_trainer_resume_continues_bitwise(tmp_path):
  """Straight to 4 == to 2, stop, rerun; the bin weights are checkpointed."""
  c = stage_config(total_steps=4, checkpoint_every_steps=2)
  train.train_and_evaluate(c, str(tmp_path / "straight"))
  stage = train.Stage(c, str(tmp_path / "resumed"))
  stage.total_steps = 2
  stage.run()
  half, _ = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  train.train_and_evaluate(c, str(tmp_path / "resumed"))
  a, meta_a = ckpt_lib.restore_raw(str(tmp_path / "straight"))
  b, meta_b = ckpt_lib.restore_raw(str(tmp_path / "resumed"))
  assert meta_a["step"] == meta_b["step"] == 4
  chex.assert_trees_all_equal(a, b)
  ra = np.asarray(a["augment"]["ctaugment"]["rates"])
  rh = np.asarray(half["augment"]["ctaugment"]["rates"])
  assert ra.min() < 1.0 and not np.array_equal(ra, rh)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("edit, match", [
    (dict(threshold=0.0), r"config\.data\.augment\.strong: threshold=0\.0 is "
     r"outside \(0\.0, 1\.0\]"),
    (dict(threshold=1.5), r"config\.data\.augment\.strong: threshold=1\.5"),
    (dict(decay=1.0), r"config\.data\.augment\.strong: decay=1\.0 is outside "
     r"\[0\.0, 1\.0\)"),
    (dict(decay=-0.1), r"config\.data\.augment\.strong: decay=-0\.1"),
    (dict(num_ops=0), r"config\.data\.augment\.strong: num_ops=0 is outside "
     r"\[1, inf\]"),
    (dict(ops=("invert", "Rotate")), r"unknown CTAugment op 'Rotate'"),
    (dict(depth=2), r"policy 'ctaugment' takes no option\(s\) \['depth'\]"),
])
def test_bad_settings_name_the_field(tmp_path, edit, match):
  c = stage_config()
  c.data.augment.strong.update(edit)
  with pytest.raises(R2D2Error, match=match):
    train.Stage(c, str(tmp_path))


def test_a_method_that_does_not_learn_the_state_is_refused(tmp_path):
  info = sources.get_info("digits")
  augment_config = stage_config().data.augment
  with pytest.raises(R2D2Error, match=r"config\.data\.augment\.strong\.policy="
                     r"'ctaugment' learns its state during training, but "
                     r"method 'mpl' does not learn"):
    views_lib.view_specs({"unlabeled": ("weak", "strong")}, augment_config,
                         info, augment_state=None, method="mpl")
  with pytest.raises(R2D2Error, match=r"config\.data\.augment\.strong\.policy="
                     r"'ctaugment', but method 'supervised' has no strong"):
    views_lib.view_specs({"labeled": ("weak",)}, augment_config, info,
                         augment_state=None, method="supervised")
  # Through the trainer: a method without a strong view.
  c = stage_config()
  c.method = "supervised"
  with pytest.raises(R2D2Error, match=r"strong\.policy='ctaugment', but "
                     r"method 'supervised' has no strong view"):
    train.Stage(c, str(tmp_path))
  # A probe of a stateless policy.
  augment_config.strong.policy = "fixmatch"
  with pytest.raises(R2D2Error, match="a probe view needs a stateful policy"):
    views_lib.view_specs({"labeled": ("probe",)}, augment_config, info)
  assert callable(aug.view_fn({"kind": "probe", "policy": "ctaugment"}))
