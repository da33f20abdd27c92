"""Strong-view RandAugment policies against their references.

* every op against PIL (ImageOps / ImageEnhance / Image.transform) on real
  images: sklearn's sample photos at 32 px (RGB), sklearn's digits upscaled
  (gray) and MNIST when ../shared/data/mnist is there;
* each policy's level -> argument mapping against a transcription of its
  reference's arithmetic (meta_pseudo_labels/augment.py; fixmatch's
  third_party/auto_augment/augmentations.py; USB's semilearn/datasets/
  augmentation/randaugment.py, with its always-on cutout);
* the draws: which ops, how often applied, which levels;
* fewer than 1 % constant strong views at every paper config's magnitude;
* views stay a function of (seed, step, index); a state reaches the policy;
* unknown policies, ops, options and out-of-range magnitudes are refused
  with the valid choices.
"""

import functools
import gzip
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from r2d2_jax import train
from r2d2_jax.data import augment as aug
from r2d2_jax.data import image_ops
from r2d2_jax.data import randaugment as ra
from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(os.path.dirname(ROOT), "shared", "data", "mnist")


# ---------------------------------------------------------------------------
# Real images


@functools.lru_cache(maxsize=None)
def _photos(size, n, seed=0):
  """``n`` random crops of sklearn's two sample photos, box-resized to size."""
  # pylint: disable-next=g-import-not-at-top
  from sklearn.datasets import load_sample_images
  photos = load_sample_images().images
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    img = photos[i % 2]
    s = int(rng.integers(max(size, 48), 420))
    y = int(rng.integers(0, img.shape[0] - s + 1))
    x = int(rng.integers(0, img.shape[1] - s + 1))
    crop = Image.fromarray(img[y:y + s, x:x + s])
    out.append(np.asarray(crop.resize((size, size), Image.Resampling.BOX)))
  return np.stack(out)


@functools.lru_cache(maxsize=None)
def _digits(size=None):
  """sklearn's digits on 0..255 as the library loads them, maybe upscaled."""
  # pylint: disable-next=g-import-not-at-top
  from sklearn.datasets import load_digits
  imgs = np.round(load_digits().images * (255.0 / 16.0)).astype(np.uint8)
  if size is not None:
    imgs = np.stack([np.asarray(Image.fromarray(x).resize(
        (size, size), Image.Resampling.BILINEAR)) for x in imgs])
  return imgs[..., None]


@functools.lru_cache(maxsize=None)
def _mnist(n):
  """The first ``n`` MNIST training images (gzip idx), or None without them."""
  path = os.path.join(MNIST, "train-images-idx3-ubyte.gz")
  if not os.path.exists(path):
    return None
  with gzip.open(path, "rb") as f:
    header = np.frombuffer(f.read(16), ">i4")
    assert header[0] == 2051, header
    rows, cols = int(header[2]), int(header[3])
    data = np.frombuffer(f.read(n * rows * cols), np.uint8)
  return data.reshape(n, rows, cols, 1)


def _image_sets():
  """RGB photos and gray digits (MNIST, or sklearn's upscaled without it)."""
  mnist = _mnist(6)
  return {"photos32": _photos(32, 6),
          "gray": _digits(32)[:6] if mnist is None else mnist}


def _pil(img):
  return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def _np(pil_img, channels):
  a = np.asarray(pil_img, np.float32)
  return a[..., None] if channels == 1 else a


# ---------------------------------------------------------------------------
# Ops against PIL

_FILL = 128
_AFFINE = {  # PIL's affine coefficients (a, b, c, d, e, f) for a parameter v
    "ShearX": lambda v: (1, v, 0, 0, 1, 0),
    "ShearY": lambda v: (1, 0, 0, v, 1, 0),
    "TranslateX": lambda v: (1, 0, v, 0, 1, 0),
    "TranslateY": lambda v: (1, 0, 0, 0, 1, v),
}
# (op, parameter) pairs at the values the policies produce: mpl at M = 10,
# 16, 17 on CIFAR (translate_const 4), fixmatch at levels 1..9.
_EXACT = ([("Invert", 0), ("Equalize", 0)]
          + [("Solarize", t) for t in (0, 26, 128, 153, 179, 231)]
          + [("Posterize", b) for b in (1, 2, 4, 6)]
          + [(op, v) for op in ("ShearX", "ShearY") for v in (0.09, -0.3, 0.48)]
          + [(op, v) for op in ("TranslateX", "TranslateY")
             for v in (3.0, -6.4, 9.0)])
_FACTORS = (0.1, 0.28, 1.72, 2.98, 3.16)
_NEAR = ([("AutoContrast", 0)]
         + [(op, f) for op in ("Color", "Contrast", "Brightness", "Sharpness")
            for f in _FACTORS])
_ROTATIONS = (-30.0, 27.0, 48.0)


def _pil_op(pil_img, name, v):
  fill = _FILL if pil_img.mode == "L" else (_FILL,) * 3
  if name == "Invert":
    return ImageOps.invert(pil_img)
  if name == "Equalize":
    return ImageOps.equalize(pil_img)
  if name == "AutoContrast":
    return ImageOps.autocontrast(pil_img)
  if name == "Solarize":
    return ImageOps.solarize(pil_img, v)
  if name == "Posterize":
    return ImageOps.posterize(pil_img, v)
  if name in _AFFINE:
    return pil_img.transform(pil_img.size, Image.Transform.AFFINE,
                             _AFFINE[name](v), Image.Resampling.NEAREST,
                             fillcolor=fill)
  if name == "Rotate":
    return pil_img.rotate(v, Image.Resampling.NEAREST, fillcolor=fill)
  return getattr(ImageEnhance, name)(pil_img).enhance(v)


@pytest.mark.parametrize("images", list(_image_sets()))
def test_ops_match_pil_on_real_images(images):
  imgs = _image_sets()[images]
  c = imgs.shape[-1]
  pairs = _EXACT + _NEAR + [("Rotate", r) for r in _ROTATIONS]
  ours = jax.jit(jax.vmap(lambda x: [ra.apply_op(x, n, v) for n, v in pairs]))(
      imgs)
  for k, (name, v) in enumerate(pairs):
    for i, img in enumerate(imgs):
      got = np.asarray(ours[k][i])
      ref = _np(_pil_op(_pil(img), name, v), c)
      diff = np.abs(got - ref)
      where = f"{images}[{i}] {name}({v})"
      if (name, v) in _EXACT:
        np.testing.assert_array_equal(got, ref, err_msg=where)
      elif name == "Rotate":
        # Our matrix entries are rounded to 1/1024 (bit-stable coordinates),
        # so a pixel whose source lies within ~0.02 px of a pixel edge may
        # take its neighbour: at most 2 % of the pixels differ.
        assert np.mean(diff.max(-1) > 0) <= 0.02, (where, np.mean(diff > 0))
      else:
        # PIL's float LUTs round (AutoContrast) / truncate (ImageEnhance)
        # where ours is exact-then-rounded: at most one gray level apart.
        assert diff.max() <= 1, (where, diff.max())


def test_cutout_op_is_the_reference_square():
  """MPL's `cutout(image, pad_size)`: rows/cols [c - pad, c + pad), clipped."""
  img = np.full((32, 32, 3), 7, np.uint8)
  keys = jax.random.split(jax.random.key(0), 64)
  outs = np.asarray(jax.jit(jax.vmap(
      lambda k: ra.apply_op(img, "Cutout", 12.0, k)))(keys))
  sizes = []
  for o in outs:
    ys, xs = np.nonzero(o[..., 0] != 7)
    assert np.all(o[ys, xs] == aug.GRAY)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    assert len(ys) == h * w and h <= 12 and w <= 12  # one clipped rectangle
    sizes.append(len(ys))
  assert max(sizes) == 144 and min(sizes) < 144  # some are clipped


# ---------------------------------------------------------------------------
# Level -> argument mappings, transcribed from the references


def _mpl_ref(name, m, size, translate_const, cutout_const):
  """meta_pseudo_labels/augment.py `level_to_arg` + the ops' uint8 casts."""
  lvl = np.float32(m) / np.float32(10)   # tf.cast(level, float32) / _MAX_LEVEL
  mult = lambda k: int(np.float32(lvl * np.float32(k)))  # _mult_to_arg
  if name == "Rotate":
    return lvl * np.float32(30)
  if name in ("ShearX", "ShearY"):
    return lvl * np.float32(0.3)
  if name in ("TranslateX", "TranslateY"):
    return lvl * np.float32(translate_const or size // 8)
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    return lvl * np.float32(1.8) + np.float32(0.1)
  if name == "Solarize":   # tf.cast(threshold, uint8) wraps
    return int(np.array(mult(256)).astype(np.uint8))
  if name == "Posterize":  # shift = uint8(8 - bits), right_shift clamps to 7
    shift = int(np.array(8 - mult(4)).astype(np.uint8))
    return 8 - min(shift, 7)
  if name == "Cutout":
    return 2 * mult(cutout_const or size // 8)
  if name == "SolarizeAdd":
    return mult(110)
  return 0.0


def _fixmatch_ref(name, level):
  """fixmatch third_party/auto_augment/augmentations.py (PARAMETER_MAX 10)."""
  int_p = lambda maxval: int(level * maxval / 10)
  float_p = lambda maxval: float(level) * maxval / 10
  return {"Rotate": int_p(30), "ShearX": float_p(0.3), "ShearY": float_p(0.3),
          "TranslateX": int_p(10), "TranslateY": int_p(10),
          "Solarize": 256 - int_p(256), "Posterize": 4 - int_p(4),
          "Color": float_p(1.8) + .1, "Contrast": float_p(1.8) + .1,
          "Brightness": float_p(1.8) + .1,
          "Sharpness": float_p(1.8) + .1}.get(name, 0.0)


_SIGNED = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


@pytest.mark.parametrize("size,consts", [(32, (None, None)), (224, (100, 40))])
def test_mpl_level_to_arg_matches_reference(size, consts):
  for m in (0, 3, 5, 10, 16, 17, 20, 25, 27, 30):
    for name in ra.MPL.known_ops:
      for sign in (1.0, -1.0):
        got = float(ra.MPL.value(name, m, sign, size, size,
                                 translate_const=consts[0],
                                 cutout_const=consts[1]))
        ref = float(_mpl_ref(name, m, size, *consts))
        ref *= sign if name in _SIGNED else 1.0
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{name} M={m} size={size}")
  # The values the paper configs run at, spelled out.
  v = lambda name, m: float(ra.MPL.value(name, m, 1.0, 32, 32,
                                         translate_const=None,
                                         cutout_const=None))
  assert v("Solarize", 16) == 153 and v("Solarize", 17) == 179
  assert v("Solarize", 10) == 0 and v("Posterize", 16) == 6
  assert v("Posterize", 0) == 1 and v("Posterize", 30) == 1
  np.testing.assert_allclose([v("Brightness", 16), v("Rotate", 16)],
                             [2.98, 48.0], rtol=1e-6)
  assert v("Cutout", 16) == 12 and v("TranslateX", 16) == pytest.approx(6.4)


def test_fixmatch_level_to_arg_matches_reference():
  for level in range(1, 10):
    for name in ra.FIXMATCH.known_ops:
      for sign in (1.0, -1.0):
        got = float(ra.FIXMATCH.value(name, jnp.float32(level), sign, 32, 32))
        ref = _fixmatch_ref(name, level) * (sign if name in _SIGNED else 1.0)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6,
                                   err_msg=f"{name} level={level}")


def test_legacy_mapping_is_unchanged():
  v = lambda name, m, sign=1.0: float(ra.LEGACY.value(
      name, m, sign, 8, 8, max_magnitude=10.0, translate_frac=0.3,
      apply_prob=1.0))
  assert v("Solarize", 10) == 0 and v("Solarize", 0) == 256
  assert v("Posterize", 10) == 4 and v("Posterize", 20) == 1
  assert v("Brightness", 16, -1.0) == 0.0  # the constant views of the issue
  assert v("TranslateX", 12.5, -1.0) == pytest.approx(-3.0)


# ---------------------------------------------------------------------------
# The draws


def _draws(policy, magnitude, n=20000):
  keys = jax.random.split(jax.random.key(0), n)
  draw = lambda k: policy.draw(k, 2, len(policy.ops), magnitude, None,
                               **policy.options)
  d = jax.jit(jax.vmap(draw))(keys)._replace(key=None)
  return jax.tree.map(np.asarray, d)


def test_mpl_draws_one_probability_per_image():
  d = _draws(ra.MPL, 16)
  assert d.level is None  # the fixed magnitude
  # Each op is applied with probability p ~ U(0.2, 0.8), p shared by the
  # image's two layers: P(applied) = 0.5, P(both) = E[p^2] = 0.28 (0.25 if
  # each layer drew its own p).
  assert abs(d.apply.mean() - 0.5) < 0.015
  assert abs(d.apply.all(1).mean() - 0.28) < 0.012, d.apply.all(1).mean()
  counts = np.bincount(d.op.ravel(), minlength=15) / d.op.size
  assert counts.shape == (15,) and np.all(np.abs(counts - 1 / 15) < 0.01)
  assert abs((d.sign > 0).mean() - 0.5) < 0.015
  assert ra.MPL.ops[2] == "Invert" and ra.MPL.ops[-1] == "Cutout"
  assert "Identity" not in ra.MPL.ops


def test_fixmatch_draws_a_level_per_op():
  d = _draws(ra.FIXMATCH, 10)
  # np.random.randint(1, 10): levels 1..9, uniform; probability 0.5 per op,
  # independently.
  counts = np.bincount(d.level.astype(int).ravel(), minlength=11) / d.level.size
  assert counts[0] == 0 and counts[10] == 0
  assert np.all(np.abs(counts[1:10] - 1 / 9) < 0.01), counts
  assert abs(d.apply.mean() - 0.5) < 0.015
  assert abs(d.apply.all(1).mean() - 0.25) < 0.012
  assert not np.array_equal(d.level[:, 0], d.level[:, 1])
  counts = np.bincount(d.op.ravel(), minlength=14) / d.op.size
  assert np.all(np.abs(counts - 1 / 14) < 0.01)
  assert "Identity" in ra.FIXMATCH.ops and "Invert" not in ra.FIXMATCH.ops


def test_fused_layer_matches_each_op():
  """The switch with one merged geometric branch == `apply_op`, every op."""
  cases = [(ra.MPL, 16.0, None), (ra.FIXMATCH, 10, 7.0),
           (ra.LEGACY, 13.0, None)]
  for policy, magnitude, level in cases:
    ops = policy.known_ops
    options = dict(policy.options)
    n = len(ops)
    # Every op once, signs alternating (the mappings' signs are tested above).
    draws = ra.Draws(
        op=np.arange(n, dtype=np.int32), apply=np.ones(n, bool),
        sign=np.where(np.arange(n) % 2, -1.0, 1.0).astype(np.float32),
        level=None if level is None else np.full(n, level, np.float32),
        key=jax.random.split(jax.random.key(1), n))
    lvl = magnitude if level is None else level
    value = lambda *a, _p=policy, _o=options: _p.value(*a, **_o)

    def fused_and_each(img, draws=draws, ops=ops, value=value, lvl=lvl):
      h, w, _ = img.shape

      def one(d):
        level = lvl if d.level is None else d.level
        # pylint: disable-next=protected-access
        return ra._layer(img, d, level, ops, value, aug.GRAY)
      fused = jax.vmap(one)(draws)
      skipped = one(jax.tree.map(lambda a: a[0], draws)._replace(
          apply=jnp.bool_(False)))
      each = [ra.apply_op(img, ops[i], value(ops[i], lvl, s, h, w),
                          draws.key[j])
              for j, (i, s) in enumerate(zip(draws.op.tolist(),
                                             draws.sign.tolist()))]
      return fused, skipped, each

    # One shape per policy (compiling every op twice is the cost here).
    shape = (9, 9, 1) if policy is ra.FIXMATCH else (12, 10, 3)
    img = _photos(16, 1)[0, :shape[0], :shape[1], :shape[2]]
    fused, skipped, each = jax.jit(fused_and_each)(img.astype(np.float32))
    np.testing.assert_array_equal(skipped, img)
    for j, out in enumerate(each):
      np.testing.assert_array_equal(
          fused[j], out, err_msg=f"{policy.name} {ops[j]} {shape}")


# ---------------------------------------------------------------------------
# Whole strong views at the paper configs' settings


def _flat_fraction(images, spec, seed=0):
  """The fraction of strong views that carry no image.

  A view is flat when its pixels other than the gray fill (128: cutout and
  uncovered borders) all have one value, e.g. Brightness 0 (black) with a
  gray cutout square.
  """
  fn = aug.view_fn(spec)
  keys = jax.random.split(jax.random.key(seed), len(images))
  views = np.asarray(jax.jit(jax.vmap(fn))(keys, images))
  flat = views.reshape(len(images), -1)
  masked = np.where(flat == aug.GRAY, np.nan, flat)
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-gray views
    spread = np.nanmax(masked, 1) - np.nanmin(masked, 1)
  return float(np.mean(~(spread > 0)))  # NaN (all gray) counts as flat


def _strong_spec(config_name):
  c = _module_config(config_name)
  info = sources.get_info(c.data.dataset)
  specs = train.view_specs({"unlabeled": ("strong",)}, c.data.augment, info)
  return specs["unlabeled"]["strong"]


def _images_for(config_name, n):
  if config_name == "mpl_imagenet10":
    return _photos(224, n, seed=1)
  if config_name == "mpl_mnist":
    mnist = _mnist(n)
    return mnist if mnist is not None else _digits(28)[:n]
  if config_name == "mpl_digits":
    return _digits()[:n]
  return _photos(32, n, seed=2)


@pytest.mark.parametrize("config_name,n", [
    ("mpl_cifar10_4k", 500), ("mpl_imagenet10", 32), ("mpl_mnist", 500),
    ("mpl_digits", 500)])
def test_paper_configs_give_few_flat_strong_views(config_name, n):
  spec = _strong_spec(config_name)
  assert spec["policy"] == "mpl"
  if config_name == "mpl_cifar10_4k":  # UDA's strong view is MPL's
    assert _strong_spec("uda_cifar10_4k") == spec
  frac = _flat_fraction(_images_for(config_name, n), spec)
  assert frac < 0.01, (config_name, frac)


def test_legacy_at_magnitude_16_gives_flat_views():
  """The issue's measurement: the old scale at M = 16 flattens ~12 %."""
  spec = dict(_strong_spec("mpl_cifar10_4k"), policy="legacy")
  assert _flat_fraction(_photos(32, 300, seed=2), spec) > 0.05


def _module_config(name):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f"configs.{name}").get_config()


# ---------------------------------------------------------------------------
# Determinism, state, errors


# 'mpl', the default policy, is checked the same way by test_augment.py.
@pytest.mark.parametrize("policy,magnitude", [("fixmatch", 10)])
def test_views_are_functions_of_seed_step_index(policy, magnitude):
  views = {"strong": dict(kind="strong", policy=policy, magnitude=magnitude,
                          translate=2, cutout=8)}
  images = _photos(16, 8, seed=3)
  f = jax.jit(lambda k, s, x, i: aug.make_views(k, s, x, i, views)["strong"])
  idx = np.arange(10, 18)
  a = np.asarray(f(jax.random.key(0), 4, images, idx))
  perm = np.array([3, 0, 7, 1, 6, 2, 5, 4])
  b = np.asarray(f(jax.random.key(0), 4, images[perm], idx[perm]))
  np.testing.assert_array_equal(b, a[perm])  # batch order does not matter
  assert not np.array_equal(a, f(jax.random.key(0), 5, images, idx))  # step
  assert not np.array_equal(a, f(jax.random.key(1), 4, images, idx))  # seed
  assert not np.array_equal(a, f(jax.random.key(0), 4, images, idx + 1))


def _reads_state_policy() -> ra.Policy:
  """A test policy whose one op is chosen by `state['op']`: Identity or Invert."""

  def draw(key, num_ops, num_choices, magnitude, state, **options):
    del num_choices, magnitude, options
    return ra.Draws(op=jnp.full((num_ops,), state["op"], jnp.int32),
                    apply=jnp.ones((num_ops,), bool),
                    sign=jnp.ones((num_ops,)), level=None,
                    key=jax.random.split(key, num_ops))

  return ra.Policy(
      name="reads_state", reference="test", ops=("Identity", "Invert"),
      known_ops=("Identity", "Invert"), magnitude_range=(0, 10),
      integer_magnitude=False, options={}, draw=draw,
      value=lambda *a: 0.0)


def test_state_reaches_the_policy(monkeypatch):
  """A policy may read `state` (CTAugment's bins); here: which op to use."""
  monkeypatch.setitem(ra.POLICIES, "reads_state", _reads_state_policy())
  views = {"strong": dict(kind="strong", policy="reads_state", num_ops=1,
                          flip=False)}
  images = _photos(32, 2)
  f = jax.jit(lambda s: aug.make_views(jax.random.key(0), 0, images,
                                       np.arange(2), views, state=s))
  np.testing.assert_array_equal(f({"op": jnp.int32(0)})["strong"], images)
  np.testing.assert_array_equal(f({"op": jnp.int32(1)})["strong"],
                                255.0 - images)


def test_bad_policy_magnitude_op_option_are_refused():
  strong = lambda **kw: aug.view_fn(dict(kind="strong", **kw))
  with pytest.raises(ValueError, match=r"unknown RandAugment policy 'cta'; "
                     r"known: \('mpl', 'fixmatch', 'legacy'[,)]"):
    strong(policy="cta")
  with pytest.raises(ValueError, match=r"magnitude 31 is outside policy "
                     r"'mpl''s range \[0, 30\]"):
    strong(policy="mpl", magnitude=31)
  for m in (11, 1):
    with pytest.raises(ValueError, match=r"outside policy 'fixmatch''s range "
                       r"\[2, 10\]"):
      strong(policy="fixmatch", magnitude=m)
  with pytest.raises(ValueError, match="needs an integer magnitude"):
    strong(policy="fixmatch", magnitude=9.5)
  with pytest.raises(ValueError, match="unknown RandAugment op 'Cutout' for "
                     "policy 'fixmatch'; known:"):
    strong(policy="fixmatch", ops=("Rotate", "Cutout"))
  with pytest.raises(TypeError, match=r"takes no option\(s\) "
                     r"\['translate_const'\]; its options: \(\)"):
    strong(policy="fixmatch", translate_const=4)
  # The trainer checks its specs when it builds them.
  c = _module_config("mpl_cifar10_4k")
  c.data.augment.strong.magnitude = 40
  with pytest.raises(R2D2Error, match="view 'strong'.*range"):
    train.view_specs({"u": ("strong",)}, c.data.augment,
                     sources.get_info("cifar10"))



def test_trainer_hands_the_methods_augment_state_to_the_policy(monkeypatch,
                                                                tmp_path):
  """`Method.augment_state(state)` is what the jitted step's views read."""
  from flax import struct  # pylint: disable=g-import-not-at-top
  from r2d2_jax import methods, train  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  class State(struct.PyTreeNode):
    step: jax.Array
    op: jax.Array

  def init_state(rng):
    del rng
    return State(step=jnp.zeros((), jnp.int32), op=jnp.int32(1))

  def train_step(state, batch, rng):
    del rng
    return (state.replace(step=state.step + 1),
            {"strong": batch["labeled"]["strong"]})

  method = methods.Method(
      name="reads_augment_state", views=lambda c: {"labeled": ("strong",)},
      init_state=init_state, train_step=train_step,
      augment_state=lambda state: {"op": state.op})
  monkeypatch.setitem(methods.METHODS, method.name, method)
  monkeypatch.setitem(ra.POLICIES, "reads_state", _reads_state_policy())
  c = helpers.tiny_config(method.name)
  c.data.augment.weak.translate = 0
  c.data.augment.strong = dict(policy="reads_state", num_ops=1, cutout=0)
  stage = train.Stage(c, str(tmp_path))
  batch = stage.pipeline.global_batch(0, stage.streams)
  images = np.asarray(batch["labeled"]["image"], np.float32)
  for op, expected in ((1, 255.0 - images), (0, images)):
    state = stage.init_state().replace(op=jnp.int32(op))
    _, m = stage.train_step(state, batch)
    np.testing.assert_allclose(
        np.asarray(m["strong"]),
        np.asarray(train.normalize(jnp.asarray(expected), stage.info)),
        rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------
# 'usb': USB's RandAugment (semilearn/datasets/augmentation/randaugment.py)
#
# Break checks done (each made the named test fail, then was restored):
# * `_usb_value` TranslateX: `v * h` -> wrong only for non-square images,
#   caught by the mapping test's 24 x 16 size; Posterize `floor` -> `round`
#   (mapping test); Rotate range [-30, 30] -> [0, 30] (mapping test);
# * `_usb_draw` ops drawn without replacement (a permutation) -> the draws
#   test (P(two layers equal) = 0); the level `uniform(0, 0.5)` -> draws test;
# * `_usb_finish` x0 ~ U(0, W) instead of numpy's U(1, W] -> the cutout
#   distribution test (P(left column 0) = 0.158, not 4/31; the coverage map
#   alone at n = 4000 did not catch it); `cutout_abs` skipping v < 1
#   (`v >= 1`) -> same test ("every view has a box");
# * `cutout_abs` half-open box (`<` for `<=`) -> the PIL rectangle test;
# * `USB.fill` 128 instead of 0 -> the PIL chain test (black borders);
# * `check` dropping `check_options` -> the error test.

_USB_LIST = [  # `augment_list()`, transcribed: (op, min, max)
    ("AutoContrast", 0, 1), ("Brightness", 0.05, 0.95),
    ("Color", 0.05, 0.95), ("Contrast", 0.05, 0.95), ("Equalize", 0, 1),
    ("Identity", 0, 1), ("Posterize", 4, 8), ("Rotate", -30, 30),
    ("Sharpness", 0.05, 0.95), ("ShearX", -0.3, 0.3), ("ShearY", -0.3, 0.3),
    ("Solarize", 0, 256), ("TranslateX", -0.3, 0.3),
    ("TranslateY", -0.3, 0.3)]
_USB_RANGE = {name: (lo, hi) for name, lo, hi in _USB_LIST}


def _usb_ref_arg(name, u, size):
  """`val = min + (max - min) * random()` and what USB's op does with it."""
  lo, hi = _USB_RANGE[name]
  val = lo + float(hi - lo) * u
  w, h = size  # PIL's img.size
  if name == "TranslateX":
    return val * w
  if name == "TranslateY":
    return val * h
  if name == "Posterize":
    return max(1, int(val))
  if name in ("AutoContrast", "Equalize", "Identity"):
    return 0.0
  return val


def _usb_pil(pil_img, name, u):
  """USB's op `name` at `val = min + (max - min) * u`, on a PIL image."""
  lo, hi = _USB_RANGE[name]
  v = lo + float(hi - lo) * u
  img = pil_img
  if name == "AutoContrast":
    return ImageOps.autocontrast(img)
  if name == "Equalize":
    return ImageOps.equalize(img)
  if name == "Identity":
    return img
  if name == "Posterize":
    return ImageOps.posterize(img, max(1, int(v)))
  if name == "Rotate":
    return img.rotate(v)
  if name == "Solarize":
    return ImageOps.solarize(img, v)
  if name in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
    # Our matrices are on a 1/1024 grid: PIL gets the same rounded value.
    r = lambda t: round(t * 1024) / 1024
    coeffs = {"ShearX": (1, r(v), 0, 0, 1, 0), "ShearY": (1, 0, 0, r(v), 1, 0),
              "TranslateX": (1, 0, r(v * img.size[0]), 0, 1, 0),
              "TranslateY": (1, 0, 0, 0, 1, r(v * img.size[1]))}[name]
    return img.transform(img.size, Image.AFFINE, coeffs)
  return getattr(ImageEnhance, name)(img).enhance(v)


def test_usb_value_matches_reference():
  assert ra.USB.ops == tuple(name for name, _, _ in _USB_LIST)
  assert not ra.USB.reads_magnitude and ra.USB.fill == 0.0
  us = [0.0, 0.03, 0.25, 0.5, 0.7311, 0.999999]
  for w, h in ((32, 32), (24, 16)):
    for name in ra.USB.ops:
      got = np.asarray(jax.vmap(lambda u, n=name, w=w, h=h: ra.USB.value(
          n, u, 1.0, h, w, **ra.USB.options))(np.float32(us)))
      ref = [_usb_ref_arg(name, float(np.float32(u)), (w, h)) for u in us]
      np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-5,
                                 err_msg=f"{name} {w}x{h}")
  # The sign is the value's own: `sign` is not read.
  assert float(ra.USB.value("Rotate", 0.1, -1.0, 32, 32)) == pytest.approx(-24)
  # Posterize keeps 4..7 bits (`random()` < 1 never gives 8).
  assert float(ra.USB.value("Posterize", np.float32(0.999999), 1., 32, 32)) == 7


def test_usb_draws_ops_with_replacement_and_uniform_values():
  n = 20000
  keys = jax.random.split(jax.random.key(0), n)
  d = jax.jit(jax.vmap(lambda k: ra.USB.draw(k, 3, 14, 5.0, None)))(keys)
  op, level = np.asarray(d.op), np.asarray(d.level)
  assert op.shape == level.shape == (n, 3)
  assert np.all(np.asarray(d.apply)) and np.all(np.asarray(d.sign) == 1.0)
  counts = np.bincount(op.ravel(), minlength=14) / op.size
  assert counts.shape == (14,) and np.all(np.abs(counts - 1 / 14) < 0.01)
  # `random.choices`: with replacement, the layers independent.
  for a, b in ((0, 1), (1, 2)):
    assert abs(np.mean(op[:, a] == op[:, b]) - 1 / 14) < 0.01
  # `random.random()`: U[0, 1), ten equal bins.
  assert level.min() >= 0.0 and level.max() < 1.0
  hist = np.histogram(level, bins=10, range=(0, 1))[0] / level.size
  assert np.all(np.abs(hist - 0.1) < 0.01), hist
  assert abs(np.corrcoef(level[:, 0], level[:, 1])[0, 1]) < 0.03
  # The magnitude is not read (the level is never None, so `rand_augment`
  # passes M to nothing else).
  other = jax.jit(jax.vmap(lambda k: ra.USB.draw(k, 3, 14, 30.0, None)))(
      keys[:64])
  np.testing.assert_array_equal(other.op, op[:64])
  np.testing.assert_array_equal(other.level, level[:64])


def test_usb_ops_match_pil_on_random_images():
  """Through the policy's value: exact, or within PIL's own round-off."""
  rng = np.random.default_rng(0)
  imgs = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
  us = np.float32([0.0, 0.1, 0.37, 0.5, 0.64, 0.9, 0.9999])
  names = ra.USB.ops + ("Invert",)

  def ours(img):
    h, w, _ = img.shape
    return [jax.vmap(lambda u, n=n: ra.apply_op(
        img, n, ra.USB.value(n, u, 1.0, h, w), fill=ra.USB.fill))(us)
            for n in names]

  out = jax.jit(jax.vmap(ours))(imgs)
  for k, name in enumerate(names):
    for i, img in enumerate(imgs):
      for j, u in enumerate(us):
        got = np.asarray(out[k][i, j])
        if name == "Invert":
          ref = np.asarray(ImageOps.invert(Image.fromarray(img)), np.float32)
        else:
          ref = np.asarray(_usb_pil(Image.fromarray(img), name, float(u)),
                           np.float32)
        where = f"{name}(u={u}) image {i}"
        diff = np.abs(got - ref)
        if name == "Rotate":
          # PIL's rotate matrix in float64 vs ours on a 1/1024 grid: pixels
          # whose source lies near a pixel edge may take the neighbour
          # (measured at random angles: mean 1 %, worst 5.5 % of pixels).
          assert np.mean(diff.max(-1) > 0) <= 0.06, (where, diff.max())
        elif name in ("Brightness", "Color", "Contrast", "Sharpness"):
          assert diff.max() <= 1, where  # PIL truncates, ours rounds
        else:
          np.testing.assert_array_equal(got, ref, err_msg=where)


def test_usb_cutout_box_is_pil_rectangle():
  """`image_ops.cutout_abs` == USB's CutoutAbs with the same x0, y0, v."""
  rng = np.random.default_rng(1)
  base = np.full((32, 32, 3), 9, np.uint8)
  cases = [(32.0, 32.0, 15.99), (1.0001, 1.0001, 0.2), (17.3, 4.9, 7.5),
           (2.0, 31.0, 16.0), (31.5, 8.0, 3.0), (5.0, 5.0, 0.0)]
  cases += [(float(rng.uniform(1, 32)), float(rng.uniform(1, 32)),
             float(rng.uniform(0, 16))) for _ in range(40)]
  arr = np.float32(cases)
  got = np.asarray(jax.jit(jax.vmap(
      lambda c: image_ops.cutout_abs(
          base, c[0], c[1], c[2], jnp.float32(ra.USB_CUTOUT_FILL))))(arr))
  for (x0, y0, v), g in zip(arr.tolist(), got):
    img = Image.fromarray(base)
    if v > 0:  # `Cutout` returns the image for v <= 0
      w, h = img.size
      x0 = int(max(0, x0 - v / 2.))
      y0 = int(max(0, y0 - v / 2.))
      x1, y1 = min(w, x0 + v), min(h, y0 + v)
      ImageDraw.Draw(img).rectangle((x0, y0, x1, y1), (125, 123, 114))
    np.testing.assert_array_equal(g, np.asarray(img), err_msg=str((x0, y0, v)))


def _usb_reference_cutouts(n, size=32, seed=0):
  """USB's `Cutout(img, random.random() * 0.5)` masks, n times.

  The box is `ImageDraw.rectangle`'s (corners included, coordinates
  truncated, clipped), as `test_usb_cutout_box_is_pil_rectangle` checks.
  """
  import random  # pylint: disable=g-import-not-at-top
  random.seed(seed)
  np.random.seed(seed)
  boxes = []
  for _ in range(n):
    v = random.random() * 0.5
    assert v > 0
    v = v * size  # img.size[0]
    w = h = size
    x0 = np.random.uniform(w)  # numpy: uniform(low=w, high=1.0)
    y0 = np.random.uniform(h)
    x0 = int(max(0, x0 - v / 2.))
    y0 = int(max(0, y0 - v / 2.))
    x1, y1 = min(w, x0 + v), min(h, y0 + v)
    boxes.append((x0, y0, int(x1), int(y1)))
  x0, y0, x1, y1 = (np.array(b)[:, None, None] for b in zip(*boxes))
  rows, cols = np.mgrid[0:size, 0:size]
  return (rows >= y0) & (rows <= y1) & (cols >= x0) & (cols <= x1)


def test_usb_cutout_is_always_applied_as_the_reference_draws_it():
  n = 20000
  img = np.full((32, 32, 3), 9, np.uint8)
  fill = np.float32(ra.USB_CUTOUT_FILL)

  # Identity layers only: the view is the policy's own final cutout.
  def masks_of(m):
    def one(k):
      view = ra.rand_augment(k, img, num_ops=3, magnitude=m, policy="usb",
                             ops=("Identity",))
      mask = jnp.all(view == fill, -1)
      return mask, jnp.sum(~mask & jnp.any(view != 9, -1))
    return jax.jit(jax.vmap(one))

  keys = jax.random.split(jax.random.key(3), n)
  masks, others = jax.tree.map(np.asarray, masks_of(5.0)(keys))
  assert others.sum() == 0  # nothing else changes
  ref = _usb_reference_cutouts(n)
  assert masks.any((1, 2)).all() and ref.any((1, 2)).all()  # every view
  # Side int(v) + 1 <= 16 (v < 16), clipped at the right / bottom border.
  side = lambda m: m.any(1).sum(-1)
  assert side(masks).max() <= 16 and side(ref).max() == 16
  hist = lambda m: np.bincount(side(m), minlength=17)[1:] / n
  np.testing.assert_allclose(hist(masks), hist(ref), atol=0.01)
  # Where the boxes fall: numpy's uniform(32) is U(1, 32] (not U(0, 32)),
  # so the left column is 0 with probability P(32 - 31 U - 8 U' < 1) = 4/31
  # (U(0, 32) would give 5/32); likewise the top row.
  np.testing.assert_allclose(masks.mean(0), ref.mean(0), atol=0.03)
  left = lambda m, axis: np.argmax(m.any(axis), -1)
  for axis in (1, 2):
    assert abs(np.mean(left(masks, axis) == 0) - 4 / 31) < 0.01
    assert abs(np.mean(left(ref, axis) == 0) - 4 / 31) < 0.01
    np.testing.assert_allclose(
        np.bincount(left(masks, axis), minlength=32) / n,
        np.bincount(left(ref, axis), minlength=32) / n, atol=0.008)


def test_usb_views_match_a_pil_transcription():
  """Whole views (3 layers, no cutout) against USB's ops applied in PIL."""
  exact = ("Identity", "AutoContrast", "Equalize", "Posterize", "Solarize",
           "ShearX", "ShearY", "TranslateX", "TranslateY")
  rng = np.random.default_rng(2)
  imgs = rng.integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
  keys = jax.random.split(jax.random.key(5), len(imgs))
  f = jax.jit(jax.vmap(lambda k, x: ra.rand_augment(
      k, x, num_ops=3, magnitude=5.0, policy="usb", ops=exact,
      cutout_frac=0.0)))
  views = np.asarray(f(keys, imgs))
  # The draws rand_augment makes: layers from the first half of the key.
  draws = jax.jit(jax.vmap(lambda k: ra.USB.draw(jax.random.split(k)[0], 3,
                                                 len(exact), 5.0, None)))(keys)
  geometric = 0
  for i, img in enumerate(imgs):
    pil = Image.fromarray(img)
    for op, u in zip(np.asarray(draws.op[i]), np.asarray(draws.level[i])):
      pil = _usb_pil(pil, exact[op], float(u))
      geometric += exact[op] in ra.GEOMETRIC_OPS
    np.testing.assert_array_equal(views[i], np.asarray(pil, np.float32),
                                  err_msg=f"view {i}")
  assert geometric >= 8  # black borders (PIL's fill) were compared


def test_usb_fused_layer_matches_each_op():
  ops = ra.USB.known_ops
  n = len(ops)
  draws = ra.Draws(op=np.arange(n, dtype=np.int32), apply=np.ones(n, bool),
                   sign=np.ones(n, np.float32),
                   level=np.linspace(0.05, 0.95, n).astype(np.float32),
                   key=jax.random.split(jax.random.key(1), n))
  value = lambda *a: ra.USB.value(*a, **ra.USB.options)

  def fused_and_each(img):
    h, w, _ = img.shape
    # pylint: disable-next=protected-access
    one = lambda d: ra._layer(img, d, d.level, ops, value, ra.USB.fill)
    each = [ra.apply_op(img, ops[j], value(ops[j], draws.level[j], 1.0, h, w),
                        fill=ra.USB.fill) for j in range(n)]
    return jax.vmap(one)(draws), each

  img = _photos(16, 1)[0, :12, :10].astype(np.float32)
  fused, each = jax.jit(fused_and_each)(img)
  for j, out in enumerate(each):
    np.testing.assert_array_equal(fused[j], out, err_msg=ops[j])


def test_usb_bad_options_are_refused():
  strong = lambda **kw: aug.view_fn(dict(kind="strong", policy="usb", **kw))
  strong(magnitude=0)
  strong(magnitude=30, cutout_frac=0.25, cutout_fill=128)  # all accepted
  with pytest.raises(ValueError, match=r"magnitude 31 is outside policy "
                     r"'usb''s range \[0, 30\] \(policy 'usb' does not read "
                     r"the magnitude"):
    strong(magnitude=31)
  with pytest.raises(ValueError, match=r"cutout_frac=0.6 is outside "
                     r"\[0, 0.5\]"):
    strong(cutout_frac=0.6)
  with pytest.raises(ValueError, match=r"cutout_fill=\(1, 2\) must be one "
                     r"value or 3"):
    strong(cutout_fill=(1, 2))
  with pytest.raises(ValueError, match="unknown RandAugment op 'Cutout' for "
                     "policy 'usb'"):
    strong(ops=("Rotate", "Cutout"))
  with pytest.raises(TypeError, match=r"takes no option\(s\) "
                     r"\['translate_const'\]; its options: \('cutout_frac', "
                     r"'cutout_fill'\)"):
    strong(translate_const=4)
