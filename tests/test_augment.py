"""On-device augmentations: determinism, per-example keys, each op's semantics.

Most checks run their ops inside one `jax.jit` (`_run`): op-by-op dispatch
compiles every primitive for every new shape, which costs more here than one
small program.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r2d2_jax.data import augment as aug

# The default policy ('mpl') at magnitude 20: its level scale extrapolates
# beyond _MAX_LEVEL = 10.
VIEWS = {
    "weak": dict(kind="weak", flip=True, translate=4),
    "strong": dict(kind="strong", flip=True, translate=4, num_ops=2,
                   magnitude=20, cutout=8),
    "weak_1": dict(kind="weak", flip=True, translate=4),
    "plain": dict(kind="none"),
}


def _images(shape, n=8, seed=0, lo=0, hi=256):
  rng = np.random.default_rng(seed)
  return rng.integers(lo, hi, (n, *shape), dtype=np.uint8)


def _image(shape=(10, 12, 3), seed=0, lo=0, hi=256):
  return _images(shape, n=1, seed=seed, lo=lo, hi=hi)[0]


def _run(fn, *args):
  """`fn(*args)` as one compiled program, results as numpy."""
  return jax.tree.map(np.asarray, jax.jit(fn)(*args))


@jax.jit
def _views(key, step, images, indices):
  return aug.make_views(key, step, images, indices, VIEWS)


# ---------------------------------------------------------------------------
# Whole views: shapes, determinism, per-example keys


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_views_shape_dtype_range(shape):
  images = _images(shape)
  out = _views(jax.random.key(0), 3, images, np.arange(8))
  assert set(out) == set(VIEWS)
  for name, v in out.items():
    assert v.shape == images.shape and v.dtype == jnp.float32, name
    v = np.asarray(v)
    assert v.min() >= 0 and v.max() <= 255, name
    np.testing.assert_array_equal(v, np.round(v), err_msg=name)  # integers
  np.testing.assert_array_equal(out["plain"], images.astype(np.float32))
  # Views are independent draws: they differ from each other and the input.
  for a, b in [("weak", "strong"), ("weak", "weak_1"), ("weak", "plain")]:
    assert not np.array_equal(out[a], out[b]), (a, b)


def test_deterministic_and_key_dependent():
  images = _images((32, 32, 3))
  idx = np.arange(8)
  a = _views(jax.random.key(0), 5, images, idx)
  b = _views(jax.random.key(0), 5, images, idx)
  c = _views(jax.random.key(1), 5, images, idx)
  d = _views(jax.random.key(0), 6, images, idx)
  for name in ("weak", "strong"):
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])  # other seed
    assert not np.array_equal(a[name], d[name])  # other step
    for i in range(8):  # per example too
      assert not np.array_equal(a[name][i], c[name][i])


def test_example_independent_of_batch_and_sharding():
  images = _images((32, 32, 3), seed=1)
  idx = np.arange(100, 108)
  key = jax.random.key(7)
  full = _views(key, 11, images, idx)
  # The same examples in another order, among other examples: same pixels.
  # (Same batch size, so that the program is compiled once.)
  other = _images((32, 32, 3), seed=2)
  mixed = _views(key, 11, np.concatenate([images[[5, 2]], other[:6]]),
                 np.concatenate([idx[[5, 2]], np.arange(6)]))
  # The batch sharded over the 8 (fake) devices: same pixels.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("b",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b"))
  sharded = _views(key, 11, jax.device_put(images, shard),
                   jax.device_put(idx, shard))
  for name in VIEWS:
    np.testing.assert_array_equal(mixed[name][0], full[name][5])
    np.testing.assert_array_equal(mixed[name][1], full[name][2])
    np.testing.assert_array_equal(sharded[name], full[name])


def test_example_keys_fold_in_order():
  key = jax.random.key(3)
  keys = aug.example_keys(key, 9, np.array([4, 2]), view="strong")
  expect = jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(key, 9), 2),
      aug.view_id("strong"))
  np.testing.assert_array_equal(jax.random.key_data(keys[1]),
                                jax.random.key_data(expect))
  assert aug.view_id("weak") != aug.view_id("weak_1")
  assert aug.view_id(5) == 5
  raw = aug.example_keys(jax.random.PRNGKey(0), 1, np.arange(3))  # old keys
  assert raw.shape == (3, 2)


def test_view_spec_errors():
  with pytest.raises(ValueError, match="unknown view kind"):
    aug.view_fn({"kind": "medium"})
  with pytest.raises(TypeError):
    aug.view_fn({"kind": "none", "flip": True})
  with pytest.raises(ValueError, match="unknown RandAugment op"):
    aug.rand_augment(jax.random.key(0), np.zeros((8, 8, 3)), num_ops=1,
                     magnitude=5, ops=("Rotate", "Blur"))


# ---------------------------------------------------------------------------
# Flip, translate, cutout


def test_flip():
  img = _image()
  key = jax.random.key(0)
  out = _run(lambda x: (aug.flip_lr(key, x, p=1.0), aug.flip_lr(key, x, p=0.0)),
             img)
  np.testing.assert_array_equal(out[0], img[:, ::-1])
  np.testing.assert_array_equal(out[1], img)


def test_translate_by_is_a_shift():
  img = _image()  # 10 x 12
  shifts = [(0, 0), (2, -1), (-3, 3)]
  out = _run(lambda x: [aug.translate_by(x, dy, dx, pad=3) for dy, dx in shifts]
             + [aug.translate_by(x, 2, 0, 3, mode="constant", fill=128)], img)
  padded = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="reflect")
  for (dy, dx), o in zip(shifts, out):
    # The border comes from the reflect padding, the rest is the shifted image.
    np.testing.assert_array_equal(o, padded[3 - dy:13 - dy, 3 - dx:15 - dx])
    np.testing.assert_array_equal(
        o[max(0, dy):10 + min(0, dy), max(0, dx):12 + min(0, dx)],
        img[max(0, -dy):10 - max(0, dy), max(0, -dx):12 - max(0, dx)])
  assert np.all(out[-1][:2] == 128)
  np.testing.assert_array_equal(out[-1][2:], img[:8])


def test_translate_random_offsets_in_range():
  img = _image((8, 8, 1), seed=3)
  padded = np.pad(img, ((2, 2), (2, 2), (0, 0)), mode="reflect")
  allowed = [padded[y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
  outs = _run(jax.vmap(lambda k: aug.translate(k, img, 2)),
              jax.random.split(jax.random.key(0), 64))
  hits = [next(j for j, a in enumerate(allowed) if np.array_equal(o, a))
          for o in outs]  # StopIteration if an output is not an allowed shift
  assert len(set(hits)) > 10  # many distinct offsets are drawn


def test_cutout_at_exact_and_clipped():
  img = np.full((10, 12, 3), 7, np.uint8)
  out, corner = _run(lambda x: (aug.cutout_at(x, 5, 6, 4, fill=128),
                                aug.cutout_at(x, 0, 11, 4, fill=128)), img)
  changed = out != 7
  assert np.all(out[changed] == 128)
  np.testing.assert_array_equal(np.argwhere(changed[..., 0]).min(0), [3, 4])
  np.testing.assert_array_equal(np.argwhere(changed[..., 0]).max(0), [6, 7])
  assert changed.sum() == 4 * 4 * 3
  # Rows [-2, 2) and columns [9, 13), clipped to the image: 2 x 3 pixels.
  assert (corner != 7).sum() == 2 * 3 * 3
  assert np.all(corner[:2, 9:] == 128)


def test_cutout_random_is_one_square():
  img = np.full((16, 16, 1), 9, np.uint8)
  outs = _run(jax.vmap(lambda k: aug.cutout(k, img, 6)),
              jax.random.split(jax.random.key(1), 32))
  for o in outs:
    ys, xs = np.nonzero(o[..., 0] != 9)
    assert np.all(o[ys, xs] == aug.GRAY)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert h <= 6 and w <= 6 and len(ys) == h * w  # a (clipped) rectangle
  assert any((o != 9).sum() == 36 for o in outs)  # some are not clipped


# ---------------------------------------------------------------------------
# RandAugment ops


def test_point_ops():
  img = _image()
  f = img.astype(np.float32)
  out = _run(lambda x: dict(
      identity=aug.identity(x), invert=aug.invert(x),
      solarize=aug.solarize(x, 128), solarize_none=aug.solarize(x, 256),
      posterize=aug.posterize(x, 3), posterize_8=aug.posterize(x, 8)), img)
  np.testing.assert_array_equal(out["identity"], f)
  np.testing.assert_array_equal(out["invert"], 255 - f)
  np.testing.assert_array_equal(out["solarize"], np.where(f < 128, f, 255 - f))
  np.testing.assert_array_equal(out["solarize_none"], f)
  np.testing.assert_array_equal(out["posterize"], img & 0b11100000)
  np.testing.assert_array_equal(out["posterize_8"], f)


def _equalize_ref(img):
  """PIL's ImageOps.equalize in integer numpy."""
  out = np.empty(img.shape, np.int64)
  for c in range(img.shape[-1]):
    ch = img[..., c].astype(np.int64)
    hist = np.bincount(ch.ravel(), minlength=256)
    nonzero = hist[hist > 0]
    step = (nonzero.sum() - nonzero[-1]) // 255
    if step == 0:
      out[..., c] = ch
    else:
      lut = (step // 2 + np.cumsum(hist) - hist) // step
      out[..., c] = np.minimum(lut, 255)[ch]
  return out


def test_auto_contrast_and_equalize():
  # Random low-contrast images: values in a random sub-range of 0..255.
  rng = np.random.default_rng(5)
  imgs = np.stack([rng.integers(rng.integers(0, 100), rng.integers(101, 256),
                                (32, 32, 3)) for _ in range(16)])
  imgs = imgs.astype(np.uint8)
  imgs[0, ..., 2] = 77  # a constant channel is left alone by both
  ac, eq = _run(jax.vmap(lambda x: (aug.auto_contrast(x), aug.equalize(x))),
                imgs)
  # Exactly PIL's integer LUTs (XLA's float division is not exact).
  lo = imgs.min((1, 2), keepdims=True).astype(np.int64)
  hi = imgs.max((1, 2), keepdims=True).astype(np.int64)
  ac_ref = np.where(hi > lo, (imgs - lo) * 255 // np.maximum(hi - lo, 1), imgs)
  np.testing.assert_array_equal(ac, ac_ref)
  np.testing.assert_array_equal(eq, np.stack([_equalize_ref(x) for x in imgs]))
  np.testing.assert_array_equal(ac[0, ..., 2], 77)
  np.testing.assert_array_equal(eq[0, ..., 2], 77)
  assert np.all(ac.min((1, 2))[1:] == 0) and np.all(ac.max((1, 2))[1:] == 255)
  # On a random low-contrast image (20 gray levels) Equalize spreads the
  # levels over 0..255 with a ~flat histogram.  (Large enough image: PIL's
  # integer `step` overshoots, clipping the top levels, on small ones.)
  low = _image((64, 64, 1), lo=100, hi=120)
  eq = _run(aug.equalize, low)
  hist = np.histogram(eq, bins=8, range=(0, 256))[0] / eq.size
  assert eq.min() == 0 and eq.max() >= 240
  assert np.all(hist > 0.07) and np.all(hist < 0.18), hist  # flat: 0.125


def test_enhance_ops():
  img = _image()
  gray1 = _image((10, 12, 1))
  f = img.astype(np.float32)
  ops = (aug.color, aug.contrast, aug.brightness, aug.sharpness)
  out = _run(lambda x, g: dict(
      one=[op(x, 1.0) for op in ops], black=aug.brightness(x, 0.0),
      gray=aug.color(x, 0.0), flat=aug.contrast(x, 0.0),
      sharp=aug.sharpness(x, 2.0), gray1=aug.color(g, 0.0)), img, gray1)
  for o in out["one"]:
    np.testing.assert_array_equal(o, f)
  np.testing.assert_array_equal(out["black"], 0 * f)
  assert np.all(out["gray"] == out["gray"][..., :1])
  assert np.unique(out["flat"]).size == 1
  np.testing.assert_array_equal(out["sharp"][0], f[0])  # PIL keeps the border
  assert not np.array_equal(out["sharp"], f)
  np.testing.assert_array_equal(out["gray1"], gray1)  # no colour to remove


def test_geometric_ops():
  img = _image((8, 8, 3))
  f = img.astype(np.float32)
  ops = (aug.rotate, aug.shear_x, aug.shear_y, aug.translate_x, aug.translate_y)
  out = _run(lambda x: dict(
      zero=[op(x, 0.0) for op in ops], r90=aug.rotate(x, 90.0),
      r270=aug.rotate(x, -90.0), tx=aug.translate_x(x, 3.0),
      ty=aug.translate_y(x, -2.0), sx=aug.shear_x(x, 0.5)), img)
  for o in out["zero"]:
    np.testing.assert_array_equal(o, f)
  np.testing.assert_array_equal(out["r90"], np.rot90(f))  # counter-clockwise
  np.testing.assert_array_equal(out["r270"], np.rot90(f, -1))
  np.testing.assert_array_equal(out["tx"][:, :5], f[:, 3:])  # moves left
  assert np.all(out["tx"][:, 5:] == aug.GRAY)
  np.testing.assert_array_equal(out["ty"][2:], f[:6])  # moves down
  np.testing.assert_array_equal(out["sx"][0], f[0])  # top row is the axis
  assert np.all(out["sx"][-1, -3:] == aug.GRAY)


def test_ops_match_pil():
  image_mod = pytest.importorskip("PIL.Image")
  ops_mod = pytest.importorskip("PIL.ImageOps")
  enhance = pytest.importorskip("PIL.ImageEnhance")
  rgb = _image((12, 10, 3), lo=40, hi=200)
  pil = image_mod.fromarray(rgb)
  factors = (0.3, 1.7)
  enhancers = dict(color=(aug.color, enhance.Color),
                   contrast=(aug.contrast, enhance.Contrast),
                   brightness=(aug.brightness, enhance.Brightness),
                   sharpness=(aug.sharpness, enhance.Sharpness))
  ours = _run(lambda x: dict(
      equalize=aug.equalize(x), posterize=aug.posterize(x, 2),
      solarize=aug.solarize(x, 100), shear_x=aug.shear_x(x, 0.3),
      autocontrast=aug.auto_contrast(x),
      **{f"{k}_{f}": op(x, f) for k, (op, _) in enhancers.items()
         for f in factors}), rgb)
  exact = dict(
      equalize=ops_mod.equalize(pil), posterize=ops_mod.posterize(pil, 2),
      solarize=ops_mod.solarize(pil, 100),
      shear_x=pil.transform(pil.size, image_mod.Transform.AFFINE,
                            (1, 0.3, 0, 0, 1, 0), fillcolor=(128,) * 3))
  for name, ref in exact.items():
    np.testing.assert_array_equal(ours[name], np.asarray(ref), err_msg=name)
  # PIL's AutoContrast LUT has float round-off (ours is the exact integer
  # one), PIL truncates where we round, and Contrast's mean is computed
  # slightly differently: at most one gray level apart.
  near = {"autocontrast": ops_mod.autocontrast(pil)}
  near.update({f"{k}_{f}": cls(pil).enhance(f)
               for k, (_, cls) in enhancers.items() for f in factors})
  for name, ref in near.items():
    diff = np.abs(ours[name] - np.asarray(ref, np.float32))
    assert diff.max() <= 1, (name, diff.max())


def test_legacy_magnitude_convention():
  img = _image((8, 8, 3))
  f = img.astype(np.float32)
  key = jax.random.key(0)
  zero_ops = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY",
              "Solarize", "Posterize", "Color", "Contrast", "Brightness",
              "Sharpness")
  legacy = lambda x, name, m, sign=1.0: aug.apply_op(x, name, aug.POLICIES[
      "legacy"].value(name, m * 10, sign, 8, 8, max_magnitude=10.0,
                      translate_frac=0.3, apply_prob=1.0))
  ra = functools.partial(aug.rand_augment, policy="legacy")
  out = _run(lambda x: dict(
      zero=[legacy(x, name, 0.0, -1.0) for name in zero_ops],
      solarize=legacy(x, "Solarize", 1.0),
      posterize=legacy(x, "Posterize", 1.0),
      tx=legacy(x, "TranslateX", 1.25, -1.0),
      tx_ref=aug.translate_x(x, -3.0),
      ra_none=ra(key, x, num_ops=0, magnitude=10),
      ra_id=ra(key, x, num_ops=3, magnitude=10, ops=("Identity",)),
      ra_skip=ra(key, x, num_ops=2, magnitude=10, ops=("Brightness",),
                 apply_prob=0.0),
      ra_10=ra(key, x, num_ops=2, magnitude=5),
      ra_30=ra(key, x, num_ops=2, magnitude=15, max_magnitude=30)), img)
  # Magnitude 0: every op with a magnitude is the identity.
  for name, o in zip(zero_ops, out["zero"]):
    np.testing.assert_array_equal(o, f, err_msg=name)
  # Full strength: Solarize inverts everything, Posterize keeps 4 bits.
  np.testing.assert_array_equal(out["solarize"], 255 - f)
  np.testing.assert_array_equal(out["posterize"], img & 0xF0)
  # Translate: 0.3 * m * width pixels (0.3 * 1.25 * 8 = 3).
  np.testing.assert_array_equal(out["tx"], out["tx_ref"])
  for name in ("ra_none", "ra_id", "ra_skip"):
    np.testing.assert_array_equal(out[name], f, err_msg=name)
  # Only magnitude / max_magnitude matters.
  np.testing.assert_array_equal(out["ra_10"], out["ra_30"])


def test_weak_view_with_cutout_changes_one_square():
  img = jnp.full((32, 32, 3), 50, jnp.uint8)
  out = aug.weak(jax.random.key(3), img, flip=False, translate=0, cutout=16)
  changed = np.asarray((out != 50).any(-1))
  assert 0 < changed.sum() <= 16 * 16
  rows, cols = np.nonzero(changed)
  assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16
  np.testing.assert_array_equal(
      aug.weak(jax.random.key(3), img, flip=False, translate=0), 50.0)
