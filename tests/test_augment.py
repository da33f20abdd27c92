"""On-device augmentations: determinism, per-example keys, each op's semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r2d2_jax.data import augment as aug

STRONG = dict(flip=True, translate=4, num_ops=2, magnitude=10, cutout=8)
VIEWS = {
    "weak": dict(kind="weak", flip=True, translate=4),
    "strong": dict(kind="strong", **STRONG),
    "weak_1": dict(kind="weak", flip=True, translate=4),
    "plain": dict(kind="none"),
}


def _images(shape, n=4, seed=0, lo=0, hi=256):
  rng = np.random.default_rng(seed)
  return rng.integers(lo, hi, (n, *shape), dtype=np.uint8)


@jax.jit
def _views(key, step, images, indices):
  return aug.make_views(key, step, images, indices, VIEWS)


# ---------------------------------------------------------------------------
# Whole views: shapes, determinism, per-example keys


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3), (64, 64, 3)])
def test_views_shape_dtype_range(shape):
  images = _images(shape)
  out = _views(jax.random.key(0), 3, images, np.arange(4))
  assert set(out) == set(VIEWS)
  for name, v in out.items():
    assert v.shape == images.shape and v.dtype == jnp.float32, name
    v = np.asarray(v)
    assert v.min() >= 0 and v.max() <= 255, name
  np.testing.assert_array_equal(out["plain"], images.astype(np.float32))
  # Views are independent draws: they differ from each other and the input.
  for a, b in [("weak", "strong"), ("weak", "weak_1"), ("weak", "plain")]:
    assert not np.array_equal(out[a], out[b]), (a, b)


def test_deterministic_and_key_dependent():
  images = _images((32, 32, 3))
  idx = np.arange(4)
  a = _views(jax.random.key(0), 5, images, idx)
  b = _views(jax.random.key(0), 5, images, idx)
  c = _views(jax.random.key(1), 5, images, idx)
  d = _views(jax.random.key(0), 6, images, idx)
  for name in ("weak", "strong"):
    np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a[name], c[name])  # other seed
    assert not np.array_equal(a[name], d[name])  # other step
    # Per example too: each example's draws differ between keys.
    for i in range(4):
      assert not np.array_equal(a[name][i], c[name][i])


def test_example_independent_of_batch_and_sharding():
  images = _images((32, 32, 3), n=8, seed=1)
  idx = np.arange(100, 108)
  key = jax.random.key(7)
  full = _views(key, 11, images, idx)
  # Example 5 alone, and the first half of the batch, give the same pixels.
  alone = _views(key, 11, images[5:6], idx[5:6])
  half = _views(key, 11, images[:4], idx[:4])
  # The batch sharded over the 8 (fake) devices gives the same pixels.
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("b",))
  shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("b"))
  sharded = _views(key, 11, jax.device_put(images, shard),
                   jax.device_put(idx, shard))
  for name in VIEWS:
    np.testing.assert_array_equal(alone[name][0], full[name][5])
    np.testing.assert_array_equal(half[name], full[name][:4])
    np.testing.assert_array_equal(sharded[name], full[name])


def test_example_keys_fold_in_order():
  key = jax.random.key(3)
  keys = aug.example_keys(key, 9, np.array([4, 2]), view="strong")
  expect = jax.random.fold_in(
      jax.random.fold_in(jax.random.fold_in(key, 9), 2),
      aug.view_id("strong"))
  np.testing.assert_array_equal(jax.random.key_data(keys[1]),
                                jax.random.key_data(expect))
  assert aug.view_id("strong") == aug.view_id("strong")
  assert aug.view_id("weak") != aug.view_id("weak_1")
  # Raw uint32 keys work as well.
  raw = aug.example_keys(jax.random.PRNGKey(0), 1, np.arange(3))
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
  img = _images((6, 5, 3), n=1)[0]
  key = jax.random.key(0)
  np.testing.assert_array_equal(aug.flip_lr(key, img, p=1.0), img[:, ::-1])
  np.testing.assert_array_equal(aug.flip_lr(key, img, p=0.0), img)


@pytest.mark.parametrize("dy,dx", [(0, 0), (2, -1), (-3, 3)])
def test_translate_by_is_a_shift(dy, dx):
  img = _images((8, 7, 3), n=1)[0]
  out = np.asarray(aug.translate_by(img, dy, dx, pad=3))
  # Interior is the shifted image; the border comes from the reflect padding.
  padded = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="reflect")
  np.testing.assert_array_equal(out, padded[3 - dy:3 - dy + 8, 3 - dx:3 - dx + 7])
  src = img[max(0, -dy):8 - max(0, dy), max(0, -dx):7 - max(0, dx)]
  np.testing.assert_array_equal(
      out[max(0, dy):8 + min(0, dy), max(0, dx):7 + min(0, dx)], src)
  const = aug.translate_by(img, dy, dx, pad=3, mode="constant", fill=128)
  if dy > 0:
    assert np.all(np.asarray(const)[:dy] == 128)


def test_translate_random_offsets_in_range():
  img = _images((8, 8, 1), n=1, seed=3)[0]
  allowed = [np.asarray(aug.translate_by(img, dy, dx, 2))
             for dy in range(-2, 3) for dx in range(-2, 3)]
  shift = jax.jit(jax.vmap(lambda k: aug.translate(k, img, 2)))
  outs = np.asarray(shift(jax.random.split(jax.random.key(0), 64)))
  hits = [next(j for j, a in enumerate(allowed) if np.array_equal(o, a))
          for o in outs]  # StopIteration if an output is no allowed shift
  assert len(set(hits)) > 10  # many distinct offsets are drawn


def test_cutout_at_exact_and_clipped():
  img = np.full((10, 12, 3), 7, np.uint8)
  out = np.asarray(aug.cutout_at(img, 5, 6, 4, fill=128))
  changed = out != 7
  assert np.all(out[changed] == 128)
  np.testing.assert_array_equal(np.argwhere(changed[..., 0]).min(0), [3, 4])
  np.testing.assert_array_equal(np.argwhere(changed[..., 0]).max(0), [6, 7])
  assert changed.sum() == 4 * 4 * 3
  corner = np.asarray(aug.cutout_at(img, 0, 11, 4, fill=128))
  assert (corner != 7).sum() == 2 * 2 * 3  # clipped to the top-right 2x2


def test_cutout_random_is_one_square():
  img = np.full((16, 16, 1), 9, np.uint8)
  cut = jax.jit(jax.vmap(lambda k: aug.cutout(k, img, 6)))
  outs = np.asarray(cut(jax.random.split(jax.random.key(1), 32)))
  for o in outs:
    ys, xs = np.nonzero(o[..., 0] != 9)
    assert np.all(o[ys, xs] == aug.GRAY)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert h <= 6 and w <= 6 and len(ys) == h * w  # a (clipped) rectangle
  assert any((o != 9).sum() == 36 for o in outs)  # some are not clipped


# ---------------------------------------------------------------------------
# RandAugment ops


def _low_contrast(shape, seed=0):
  return _images(shape, n=1, seed=seed, lo=100, hi=120)[0]


def test_identity_invert_solarize_posterize():
  img = _images((9, 11, 3), n=1)[0]
  f = img.astype(np.float32)
  np.testing.assert_array_equal(aug.identity(img), f)
  np.testing.assert_array_equal(aug.invert(img), 255 - f)
  np.testing.assert_array_equal(aug.solarize(img, 128),
                                np.where(f < 128, f, 255 - f))
  np.testing.assert_array_equal(aug.solarize(img, 256), f)
  np.testing.assert_array_equal(aug.posterize(img, 3), img & 0b11100000)
  np.testing.assert_array_equal(aug.posterize(img, 8), f)


def test_auto_contrast_and_equalize_spread_values():
  img = _low_contrast((32, 32, 3))
  ac = np.asarray(aug.auto_contrast(img))
  assert np.all(ac.min((0, 1)) == 0) and np.all(ac.max((0, 1)) == 255)
  eq = np.asarray(aug.equalize(img))
  for c in range(3):
    hist = np.histogram(eq[..., c], bins=8, range=(0, 256))[0] / eq[..., c].size
    assert np.all(hist > 0.05) and np.all(hist < 0.2), hist
  # Constant channels are left alone by both.
  const = np.full((8, 8, 1), 77, np.uint8)
  np.testing.assert_array_equal(aug.auto_contrast(const), const)
  np.testing.assert_array_equal(aug.equalize(const), const)


def test_enhance_ops():
  img = _images((10, 10, 3), n=1)[0]
  f = img.astype(np.float32)
  for op in (aug.color, aug.contrast, aug.brightness, aug.sharpness):
    np.testing.assert_array_equal(op(img, 1.0), f)
  np.testing.assert_array_equal(aug.brightness(img, 0.0), 0 * f)
  gray = np.asarray(aug.color(img, 0.0))
  assert np.all(gray == gray[..., :1])
  assert np.unique(np.asarray(aug.contrast(img, 0.0))).size == 1
  sharp = np.asarray(aug.sharpness(img, 2.0))
  np.testing.assert_array_equal(sharp[0], f[0])  # PIL keeps the border
  assert not np.array_equal(sharp, f)
  gray1 = _images((10, 10, 1), n=1)[0]
  np.testing.assert_array_equal(aug.color(gray1, 0.0), gray1)  # no colour


def test_geometric_ops():
  img = _images((8, 8, 3), n=1)[0]
  f = img.astype(np.float32)
  for op in (aug.rotate, aug.shear_x, aug.shear_y, aug.translate_x,
             aug.translate_y):
    np.testing.assert_array_equal(op(img, 0.0), f)
  np.testing.assert_array_equal(aug.rotate(img, 90.0), np.rot90(f))
  np.testing.assert_array_equal(aug.rotate(img, -90.0), np.rot90(f, -1))
  tx = np.asarray(aug.translate_x(img, 3.0))
  np.testing.assert_array_equal(tx[:, :5], f[:, 3:])  # moves left
  assert np.all(tx[:, 5:] == aug.GRAY)
  ty = np.asarray(aug.translate_y(img, -2.0))
  np.testing.assert_array_equal(ty[2:], f[:6])  # moves down
  sx = np.asarray(aug.shear_x(img, 0.5))
  np.testing.assert_array_equal(sx[0], f[0])  # top row is the shear's axis
  assert np.all(sx[-1, -3:] == aug.GRAY)


def test_ops_match_pil():
  image_mod = pytest.importorskip("PIL.Image")
  ops_mod = pytest.importorskip("PIL.ImageOps")
  enhance = pytest.importorskip("PIL.ImageEnhance")
  rng = np.random.default_rng(0)
  rgb = rng.integers(40, 200, (12, 10, 3), dtype=np.uint8)
  pil = image_mod.fromarray(rgb)
  exact = {
      "equalize": (aug.equalize(rgb), ops_mod.equalize(pil)),
      "autocontrast": (aug.auto_contrast(rgb), ops_mod.autocontrast(pil)),
      "posterize": (aug.posterize(rgb, 2), ops_mod.posterize(pil, 2)),
      "solarize": (aug.solarize(rgb, 100), ops_mod.solarize(pil, 100)),
      "shear_x": (aug.shear_x(rgb, 0.3), pil.transform(
          pil.size, image_mod.Transform.AFFINE, (1, 0.3, 0, 0, 1, 0),
          fillcolor=(128,) * 3)),
  }
  for name, (ours, ref) in exact.items():
    np.testing.assert_array_equal(ours, np.asarray(ref), err_msg=name)
  # PIL truncates where we round, and Contrast's mean is computed slightly
  # differently: at most one gray level apart.
  for name, ours, cls in [("color", aug.color, enhance.Color),
                          ("contrast", aug.contrast, enhance.Contrast),
                          ("brightness", aug.brightness, enhance.Brightness),
                          ("sharpness", aug.sharpness, enhance.Sharpness)]:
    for factor in (0.3, 1.7):
      ref = np.asarray(cls(pil).enhance(factor), np.float32)
      diff = np.abs(np.asarray(ours(rgb, factor)) - ref)
      assert diff.max() <= 1, (name, factor, diff.max())


def test_fused_layer_matches_each_op():
  """The switch with merged geometric branch == `apply_op` for every op."""
  ops = aug.ALL_OPS
  for shape in [(12, 10, 3), (9, 9, 1)]:
    img = _images(shape, n=1, seed=4)[0].astype(np.float32)
    idx = np.repeat(np.arange(len(ops)), 2)
    sign = np.tile([1.0, -1.0], len(ops)).astype(np.float32)
    layer = jax.jit(jax.vmap(functools.partial(
        aug._rand_augment_layer, img, ops=ops, m=1.3, translate_frac=0.3,
        fill=aug.GRAY)))
    fused = np.asarray(layer(idx, sign))
    for i, s, out in zip(idx, sign, fused):
      ref = aug.apply_op(img, ops[i], 1.3, s)
      np.testing.assert_array_equal(out, ref, err_msg=f"{ops[i]} {shape}")
    # op index len(ops) is "no op".
    np.testing.assert_array_equal(layer(np.array([len(ops)]),
                                        np.ones(1, np.float32))[0], img)


def test_magnitude_convention():
  img = _images((8, 8, 3), n=1)[0]
  f = img.astype(np.float32)
  # Magnitude 0: every op is the identity except the parameter-free ones.
  for name in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY",
               "Solarize", "Posterize", "Color", "Contrast", "Brightness",
               "Sharpness"):
    np.testing.assert_array_equal(aug.apply_op(img, name, 0.0, -1.0), f,
                                  err_msg=name)
  # Full strength: solarize inverts everything, posterize keeps 4 bits.
  np.testing.assert_array_equal(aug.apply_op(img, "Solarize", 1.0), 255 - f)
  np.testing.assert_array_equal(aug.apply_op(img, "Posterize", 1.0),
                                img & 0xF0)
  # Translate: +-0.3 * m * width pixels (8 * 0.3 * 1.25 = 3).
  np.testing.assert_array_equal(aug.apply_op(img, "TranslateX", 1.25, -1.0),
                                aug.translate_x(img, -3.0))
  ra = functools.partial(aug.rand_augment, jax.random.key(0), img)
  np.testing.assert_array_equal(ra(num_ops=0, magnitude=10), f)
  np.testing.assert_array_equal(ra(num_ops=3, magnitude=10, ops=("Identity",)),
                                f)
  np.testing.assert_array_equal(
      ra(num_ops=2, magnitude=10, ops=("Brightness",), apply_prob=0.0), f)
  # magnitude / max_magnitude is what counts.
  np.testing.assert_array_equal(
      ra(num_ops=2, magnitude=5, max_magnitude=10),
      ra(num_ops=2, magnitude=15, max_magnitude=30))


def test_rand_augment_extreme_magnitude_in_range():
  images = _images((16, 16, 3), n=32, seed=2)
  fn = jax.jit(jax.vmap(functools.partial(aug.strong, **dict(
      STRONG, magnitude=30))))
  out = np.asarray(fn(jax.random.split(jax.random.key(0), 32), images))
  assert out.min() >= 0 and out.max() <= 255
  np.testing.assert_array_equal(out, np.round(out))  # stays integer-valued
