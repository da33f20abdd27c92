"""On-device image augmentations (weak / RandAugment / strong views).

Every public augmentation is a pure function ``fn(key, img, **static) -> img``
of ONE image ``img[H, W, C]`` (C = 1 or 3, any H x W).  Batches are handled by
``jax.vmap`` (see :func:`augment_batch`), and every example gets its own key
from :func:`example_keys`, i.e. ``fold_in(fold_in(seed_key, step), index)``.
The augmented batch at step ``k`` is therefore a pure function of
``(seed, step, example index)`` and does not depend on the batch composition,
the device count or the sharding (bit-identical on one backend; a different
backend may round a rare pixel differently by one gray level).

Value conventions
-----------------
* Inputs may be any dtype (normally ``uint8``) on the 0..255 scale; outputs are
  ``float32`` on the 0..255 scale.  Normalisation happens elsewhere.
* Flip, translate and cutout keep integer-valued inputs integer-valued.
  RandAugment rounds its input to integers and every op re-quantises its
  output to integers in [0, 255], like the PIL / TF reference implementations
  that work on uint8.  That is what makes Posterize / Equalize / Solarize
  well defined after another op.
* Pixels exposed by geometric ops and cutout are filled with gray
  (:data:`GRAY` = 128, the ``replace`` value of the TF reference).

RandAugment magnitude convention
--------------------------------
``magnitude`` is on the AutoAugment "level" scale used by the TF reference
code of UDA / Meta Pseudo Labels (``_MAX_LEVEL = 10``): the *relative*
strength is ``m = magnitude / max_magnitude`` with ``max_magnitude = 10``.
``m`` is NOT clipped to 1: MPL uses magnitude 16 (CIFAR) and 17 (ImageNet)
with ``_MAX_LEVEL = 10``, i.e. it extrapolates the linear ranges, and so do
we.  Pass ``max_magnitude=30`` to work on a 0..30 scale instead.  At
relative strength ``m``:

=================  ==========================================================
Rotate             +-30*m degrees (random sign)
ShearX / ShearY    +-0.3*m shear factor (random sign), about the top-left
                   corner like PIL / TF
TranslateX / Y     +-translate_frac*m*W (resp. H) pixels (random sign);
                   ``translate_frac`` = 0.3 by default (FixMatch / UDA; MPL's
                   CIFAR code uses 1/8 of the image size)
Solarize           invert pixels >= 256*(1-m) (m=0: nothing, m>=1: all)
Posterize          keep 8-floor(4*m) bits, at least 1 (m=1: 4 bits)
Color, Contrast,   enhancement factor 1 +- 0.9*m (random sign), clipped at 0
Brightness,        (PIL ImageEnhance semantics: 1 = identity)
Sharpness
Identity, Invert,  no magnitude
AutoContrast,
Equalize
=================  ==========================================================

Severity increases with ``m`` for every op (the UDA / FixMatch convention).
This deliberately differs from the TF AutoAugment code that MPL copied, where
Posterize / Solarize get *weaker* with magnitude and the enhance ops use an
unsigned factor ``1.8*m + 0.1``.

Differences from the MPL TF code (``meta_pseudo_labels/augment.py``), besides
the severity direction: its op list has Invert and Cutout and no Identity (use
``ops=``), and it applies each drawn op with probability ~0.5 (use
``apply_prob=0.5``); its CIFAR jitter pads with gray 128 (use
``pad_mode='constant'``), ours reflects like FixMatch.

Performance notes
-----------------
Under ``vmap``, ``lax.switch`` with a per-example index evaluates every branch
and selects, so each op is kept cheap:

* the five geometric ops share one switch branch: a per-example 2x3 matrix
  and ONE nearest-neighbour integer gather (nearest is also what PIL's and
  TF's default resampling does);
* Equalize is a 256-bin scatter-add histogram and a row-wise LUT gather, with
  float instead of integer division (which XLA:CPU does not vectorise);
* per-channel reductions fold pixels into the minor axis (see
  :func:`_per_channel`); the point ops are elementwise;
* the RandAugment layers run in a ``lax.scan`` so that XLA does not fuse (and
  recompute) one layer's select-of-all-branches into the next layer.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
AugmentFn = Callable[[Array, Array], Array]

GRAY: float = 128.0
"""Fill value for pixels uncovered by geometric ops and cutout."""

# PIL's ITU-R 601-2 luma in 16-bit fixed point (0.299, 0.587, 0.114), used
# by Color and Contrast.  Every intermediate is an integer < 2**24, so float32
# computes it exactly whatever the fusion / FMA contraction.
_LUMA_FIXED = (19595.0, 38470.0, 7471.0)


def _as_float(img: Any) -> Array:
  img = jnp.asarray(img)
  if img.ndim != 3:
    raise ValueError(f"expected one image [H, W, C], got shape {img.shape}; "
                     "use jax.vmap / augment_batch for batches")
  return img.astype(jnp.float32)


def _per_channel(reduce: Callable[..., Array], img: Array) -> Array:
  """``reduce`` over H and W for each channel -> ``[C]``.

  XLA:CPU vectorises along the minor axis, so reducing a ``[H*W, C]`` view
  with C = 1..3 is slow; folding k pixels into the minor axis first
  (``[H*W/k, k*C]``) makes it ~7x faster.
  """
  h, w, c = img.shape
  k = next(k for k in (16, 8, 4, 2, 1) if (h * w) % k == 0)
  partial = reduce(img.reshape(h * w // k, k * c), axis=0)
  return reduce(partial.reshape(k, c), axis=0)


def _quantise(img: Array) -> Array:
  # uint8 semantics of the reference implementations, kept in float32.
  return jnp.clip(jnp.round(img), 0.0, 255.0)


# --------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------


def view_id(view: int | str) -> int:
  """Stable integer id of a view, folded into the example keys.

  Strings are hashed with CRC32 (stable across processes, unlike ``hash``),
  so adding, removing or reordering views never changes the randomness of
  the other views.

  Args:
    view: an integer id or a view name.

  Returns:
    A non-negative int32-representable integer.
  """
  if isinstance(view, str):
    return zlib.crc32(view.encode("utf-8")) & 0x7FFFFFFF
  return int(view)


def example_keys(seed_key: Array, step: Any, indices: Any,
                 view: int | str | None = None) -> Array:
  """Per-example keys that depend only on (seed, step, example index[, view]).

  ``key_i = fold_in(fold_in(seed_key, step), indices[i])`` and, when ``view``
  is given, ``fold_in(key_i, view_id(view))``.

  Args:
    seed_key: a PRNG key (typed ``jax.random.key`` or raw ``PRNGKey``).
    step: the training step (python int or traced integer scalar).
    indices: ``[B]`` integer indices of the examples in the dataset.
    view: optional view id / name for independent views of one example.

  Returns:
    ``[B]`` keys (same key flavour as ``seed_key``).
  """
  step_key = jax.random.fold_in(seed_key, step)
  indices = jnp.asarray(indices)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, indices)
  if view is not None:
    vid = view_id(view)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, vid)
  return keys


def augment_batch(fn: AugmentFn, keys: Array, images: Array) -> Array:
  """Applies a per-image augmentation to a batch: ``vmap(fn)(keys, images)``.

  Args:
    fn: ``fn(key, img) -> img``, e.g. ``functools.partial(weak, flip=True,
      translate=4)``.
    keys: ``[B]`` keys, normally from :func:`example_keys`.
    images: ``[B, H, W, C]`` images.

  Returns:
    ``[B, H, W, C]`` float32 images.
  """
  return jax.vmap(fn)(keys, images)


# --------------------------------------------------------------------------
# Weak augmentations: flip, translate (pad + random crop), cutout
# --------------------------------------------------------------------------


def flip_lr(key: Array, img: Array, p: float = 0.5) -> Array:
  """Horizontal flip with probability ``p``.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    p: flip probability.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  do_flip = jax.random.bernoulli(key, p)
  return jnp.where(do_flip, img[:, ::-1], img)


def translate_by(img: Array, dy: Any, dx: Any, pad: int, mode: str = "reflect",
                 fill: float = GRAY) -> Array:
  """Shifts the image content by ``(dy, dx)`` pixels, ``|dy|, |dx| <= pad``.

  ``out[i, j] = padded_img[i - dy, j - dx]``: positive ``dy`` moves the
  content down, positive ``dx`` moves it right.  Implemented as a
  ``dynamic_slice`` of the padded image (a pad-and-crop).

  Args:
    img: ``[H, W, C]`` image.
    dy: vertical shift (int, may be traced), in ``[-pad, pad]``.
    dx: horizontal shift (int, may be traced), in ``[-pad, pad]``.
    pad: static padding; must be < H and < W for ``mode='reflect'``.
    mode: ``jnp.pad`` mode for the uncovered border ('reflect', 'edge',
      'symmetric', 'wrap' or 'constant').
    fill: value for ``mode='constant'``.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  if pad <= 0:
    return img
  h, w, c = img.shape
  widths = ((pad, pad), (pad, pad), (0, 0))
  if mode == "constant":
    padded = jnp.pad(img, widths, mode="constant", constant_values=fill)
  else:
    padded = jnp.pad(img, widths, mode=mode)
  dy = jnp.asarray(dy, jnp.int32)
  dx = jnp.asarray(dx, jnp.int32)
  return jax.lax.dynamic_slice(padded, (pad - dy, pad - dx, 0), (h, w, c))


def translate(key: Array, img: Array, pad: int, mode: str = "reflect",
              fill: float = GRAY) -> Array:
  """Random integer translation by up to +-``pad`` pixels (pad + random crop).

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    pad: static maximum shift in pixels (0 disables).
    mode: border mode, see :func:`translate_by`.
    fill: value for ``mode='constant'``.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  if pad <= 0:
    return _as_float(img)
  d = jax.random.randint(key, (2,), -pad, pad + 1)
  return translate_by(img, d[0], d[1], pad, mode=mode, fill=fill)


def cutout_at(img: Array, cy: Any, cx: Any, size: int,
              fill: float = GRAY) -> Array:
  """Fills the ``size x size`` square centred at ``(cy, cx)`` with ``fill``.

  The square covers rows ``[cy - size//2, cy - size//2 + size)`` and the
  same for columns, clipped to the image.

  Args:
    img: ``[H, W, C]`` image.
    cy: centre row (int, may be traced).
    cx: centre column (int, may be traced).
    size: static side of the square.
    fill: fill value.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  h, w, _ = img.shape
  y0 = jnp.asarray(cy, jnp.int32) - size // 2
  x0 = jnp.asarray(cx, jnp.int32) - size // 2
  # Broadcast compares instead of a scatter: cheap and vmap-friendly.
  rows = jnp.arange(h, dtype=jnp.int32)[:, None, None]
  cols = jnp.arange(w, dtype=jnp.int32)[None, :, None]
  inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)
  return jnp.where(inside, jnp.float32(fill), img)


def cutout(key: Array, img: Array, size: int, fill: float = GRAY) -> Array:
  """Cutout (DeVries & Taylor 2017) as in FixMatch / MPL.

  The centre is uniform over all pixels, so the square may be clipped by
  the border.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    size: static side of the square (0 disables).
    fill: fill value (gray by default, as MPL's ``replace=128``).

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  if size <= 0:
    return img
  h, w, _ = img.shape
  ky, kx = jax.random.split(key)
  cy = jax.random.randint(ky, (), 0, h)
  cx = jax.random.randint(kx, (), 0, w)
  return cutout_at(img, cy, cx, size, fill)


_cutout = cutout  # `weak` / `strong` shadow the name with an argument.


def weak(key: Array, img: Array, *, flip: bool = True, translate: int = 0,
         pad_mode: str = "reflect", cutout: int = 0) -> Array:
  """Weak view: random horizontal flip, random translation, optional cutout.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    flip: whether to flip left/right with probability 0.5.
    translate: maximum translation in pixels (pad-and-crop; 0 disables).
    pad_mode: border mode of the translation.
    cutout: side of a cutout square (0 disables), e.g. R2-D2's supervised
      stage "translate 4 + flip + cutout 16".

  Returns:
    ``[H, W, C]`` float32 image.
  """
  k_flip, k_translate = jax.random.split(key)
  out = _as_float(img)
  if flip:
    out = flip_lr(k_flip, out)
  if translate > 0:
    out = _translate(k_translate, out, translate, mode=pad_mode)
  if cutout > 0:
    out = _cutout(jax.random.fold_in(key, 2), out, cutout)
  return out


_translate = translate  # `weak` / `strong` shadow the name with an argument.


# --------------------------------------------------------------------------
# RandAugment ops.  Each takes an integer-valued float32 image in [0, 255]
# and returns one; parameters may be traced scalars.
# --------------------------------------------------------------------------


def identity(img: Array) -> Array:
  """Returns the image unchanged (as float32)."""
  return _as_float(img)


def invert(img: Array) -> Array:
  """``255 - img``."""
  return 255.0 - _as_float(img)


def solarize(img: Array, threshold: Any) -> Array:
  """Inverts pixels ``>= threshold`` (PIL ``ImageOps.solarize``).

  Args:
    img: ``[H, W, C]`` image.
    threshold: scalar in [0, 256]; 256 is the identity, 0 inverts all.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  return jnp.where(img < threshold, img, 255.0 - img)


def posterize(img: Array, bits: Any) -> Array:
  """Keeps the ``bits`` most significant bits of each channel value.

  Args:
    img: ``[H, W, C]`` integer-valued image.
    bits: number of bits kept, 1..8 (int, may be traced).

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  shift = 8 - jnp.asarray(bits, jnp.int32)
  x = jnp.clip(img, 0, 255).astype(jnp.int32)
  return ((x >> shift) << shift).astype(jnp.float32)


def auto_contrast(img: Array) -> Array:
  """Per-channel linear stretch of [min, max] to [0, 255] (PIL, cutoff 0).

  Args:
    img: ``[H, W, C]`` image.

  Returns:
    ``[H, W, C]`` float32 image; constant channels are left unchanged.
  """
  img = _as_float(img)
  lo = _per_channel(jnp.min, img)
  hi = _per_channel(jnp.max, img)
  # PIL truncates: lut[i] = int((i - lo) * 255 / (hi - lo)), an exact
  # fraction with denominator d = hi - lo.  XLA's float division is not
  # exact (it may use a reciprocal), so nudge by half a step of 1/d before
  # flooring: integer quotients no longer fall to the integer below.
  d = jnp.maximum(hi - lo, 1.0)
  out = jnp.clip(jnp.floor(((img - lo) * 255.0 + 0.5) / d), 0.0, 255.0)
  return jnp.where(hi > lo, out, img)


def equalize(img: Array) -> Array:
  """Per-channel histogram equalisation (PIL ``ImageOps.equalize``).

  Uses a 256-bin histogram and the PIL lookup table
  ``lut[v] = (step // 2 + #{pixels < v}) // step`` with
  ``step = (N - #{pixels == max}) // 255``; identity when ``step == 0``.

  Args:
    img: ``[H, W, C]`` integer-valued image in [0, 255].

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  h, w, c = img.shape
  x = jnp.clip(img, 0, 255).astype(jnp.int32).reshape(h * w, c)
  flat = x + 256 * jnp.arange(c, dtype=jnp.int32)  # bin id per (pixel, channel)
  hist = jnp.zeros((c * 256,), jnp.int32).at[flat.reshape(-1)].add(1)
  hist = hist.reshape(c, 256)
  n_max = jnp.take_along_axis(hist, jnp.max(x, axis=0)[:, None], axis=1)[:, 0]
  step = ((h * w - n_max) // 255).astype(jnp.float32)[:, None]  # [C, 1]
  below = (jnp.cumsum(hist, axis=1) - hist).astype(jnp.float32)  # #pixels < v
  # Float math (unlike integer division) vectorises on CPU.  The quotient
  # is a fraction with denominator `step`; adding half of 1/step before the
  # floor absorbs XLA's inexact division.
  lut = jnp.floor((jnp.floor(step / 2) + below + 0.5) / jnp.maximum(step, 1.0))
  lut = jnp.where(step > 0, jnp.clip(lut, 0.0, 255.0),
                  jnp.arange(256, dtype=jnp.float32))
  # Row-wise take_along_axis gathers ~4x faster than a flat gather on CPU.
  out = jnp.take_along_axis(lut, x.T, axis=1)  # [C, H*W]
  return out.T.reshape(h, w, c)


def _factor(factor: Any) -> Array:
  # Enhancement factors are rounded to multiples of 1/256: then blends of
  # integer images are exact in float32 and the final rounding cannot depend
  # on how XLA fused the program (FMA or not), i.e. on the batch size,
  # sharding or backend.
  return jnp.round(jnp.asarray(factor, jnp.float32) * 256.0) / 256.0


def _blend(degenerate: Array, img: Array, factor: Any) -> Array:
  # PIL ImageEnhance: factor 0 -> degenerate, 1 -> original, >1 extrapolates.
  return _quantise(degenerate + _factor(factor) * (img - degenerate))


def _luma(img: Array) -> Array:
  """PIL's integer ``convert('L')`` luma, ``[H, W, 1]`` (exact)."""
  if img.shape[-1] == 1:
    return img
  # Explicit slices: a reduction over a minor axis of size 3 is slow on CPU.
  r, g, b = img[..., 0:1], img[..., 1:2], img[..., 2:3]
  wr, wg, wb = _LUMA_FIXED
  # (.. + 2**15) >> 16; multiplying by 2**-16 is exact.
  return jnp.floor((wr * r + wg * g + wb * b + 32768.0) * (1.0 / 65536.0))


def color(img: Array, factor: Any) -> Array:
  """Saturation (PIL ``ImageEnhance.Color``); identity for 1-channel images.

  Args:
    img: ``[H, W, C]`` image.
    factor: 0 = grayscale, 1 = identity, >1 more saturated.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  return _blend(_luma(img), img, factor)


def contrast(img: Array, factor: Any) -> Array:
  """Contrast (PIL ``ImageEnhance.Contrast``: blend with the mean luma).

  Args:
    img: ``[H, W, C]`` image.
    factor: 0 = uniform gray at the mean luma, 1 = identity.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  h, w, _ = img.shape
  # PIL: int(mean luma + 0.5).  The integer sum is exact in any order (it
  # is < 2**24 up to 256x256 images, and an int32 sum beyond), and the
  # rounding division is done in integers.
  luma = _luma(img).reshape(-1)
  if h * w * 255 < 2**24:
    total = jnp.sum(luma).astype(jnp.int32)  # a fast float reduction
  else:
    total = jnp.sum(luma.astype(jnp.int32))
  mean = ((2 * total + h * w) // (2 * h * w)).astype(jnp.float32)
  return _blend(mean, img, factor)


def brightness(img: Array, factor: Any) -> Array:
  """Brightness (PIL ``ImageEnhance.Brightness``: blend with black).

  Args:
    img: ``[H, W, C]`` image.
    factor: 0 = black, 1 = identity.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  return _quantise(img * _factor(factor))


def sharpness(img: Array, factor: Any) -> Array:
  """Sharpness (PIL ``ImageEnhance.Sharpness``).

  Blends with PIL's SMOOTH filter (3x3 kernel [[1,1,1],[1,5,1],[1,1,1]]/13);
  the one-pixel border keeps its original value as in PIL / TF.

  Args:
    img: ``[H, W, C]`` image.
    factor: 0 = smoothed, 1 = identity, >1 sharpened.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  h, w, _ = img.shape
  if h < 3 or w < 3:
    return img
  # Separable 3x3 box sum on the interior, plus 4x the centre = SMOOTH * 13.
  rows = img[:-2] + img[1:-1] + img[2:]
  box = rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]
  smooth = jnp.round((box + 4.0 * img[1:-1, 1:-1]) / 13.0)
  # pad + where with a static mask is ~2x faster than `.at[].set` on CPU.
  interior = np.zeros((h, w, 1), bool)
  interior[1:-1, 1:-1] = True
  smooth = jnp.pad(smooth, ((1, 1), (1, 1), (0, 0)))
  degenerate = jnp.where(interior, smooth, img)
  return _blend(degenerate, img, factor)


def _affine_nearest(img: Array, mat: Array, fill: float) -> Array:
  """Inverse-maps output pixels through ``mat`` and samples nearest.

  ``mat`` is 2x3 and maps output (x, y, 1) to input (x, y), in continuous
  coordinates where pixel i spans [i, i+1) (PIL convention); uncovered
  pixels get ``fill``.  A single integer gather of whole pixels (all C
  channels at once).
  """
  h, w, c = img.shape
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  # Matrix entries on a 1/1024 grid make every coordinate below an exact
  # float32 (a multiple of 1/2048 below 2**12), so `floor` cannot depend on
  # fusion / FMA contraction.  Costs at most ~0.25 px at 224 px.
  mat = jnp.round(mat * 1024.0) / 1024.0
  src_x = mat[0, 0] * xs + mat[0, 1] * ys + mat[0, 2]
  src_y = mat[1, 0] * xs + mat[1, 1] * ys + mat[1, 2]
  ix = jnp.floor(src_x).astype(jnp.int32)
  iy = jnp.floor(src_y).astype(jnp.int32)
  valid = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
  idx = jnp.clip(iy, 0, h - 1) * w + jnp.clip(ix, 0, w - 1)
  out = img.reshape(h * w, c)[idx.reshape(-1)].reshape(h, w, c)
  return jnp.where(valid[..., None], out, jnp.float32(fill))


def _rotation_matrix(degrees: Any, h: int, w: int) -> Array:
  # Rotation about the image centre; positive = counter-clockwise on screen.
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cx, cy = w / 2.0, h / 2.0
  return jnp.stack([jnp.stack([cos, -sin, cx - cos * cx + sin * cy]),
                    jnp.stack([sin, cos, cy - sin * cx - cos * cy])])


def _shear_x_matrix(shear: Any) -> Array:
  s = jnp.asarray(shear, jnp.float32)
  one, zero = jnp.ones_like(s), jnp.zeros_like(s)
  return jnp.stack([jnp.stack([one, s, zero]), jnp.stack([zero, one, zero])])


def _shear_y_matrix(shear: Any) -> Array:
  s = jnp.asarray(shear, jnp.float32)
  one, zero = jnp.ones_like(s), jnp.zeros_like(s)
  return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([s, one, zero])])


def _translate_matrix(tx: Any, ty: Any) -> Array:
  tx = jnp.asarray(tx, jnp.float32)
  ty = jnp.asarray(ty, jnp.float32)
  one, zero = jnp.ones_like(tx), jnp.zeros_like(tx)
  return jnp.stack([jnp.stack([one, zero, tx]), jnp.stack([zero, one, ty])])


def rotate(img: Array, degrees: Any, fill: float = GRAY) -> Array:
  """Rotates about the image centre, counter-clockwise for positive angles.

  Args:
    img: ``[H, W, C]`` image.
    degrees: angle in degrees (may be traced); 90 on a square image equals
      ``np.rot90(img)``.
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  h, w, _ = img.shape
  return _affine_nearest(img, _rotation_matrix(degrees, h, w), fill)


def shear_x(img: Array, shear: Any, fill: float = GRAY) -> Array:
  """``out(x, y) = img(x + shear * y, y)`` (PIL / TF ShearX).

  Args:
    img: ``[H, W, C]`` image.
    shear: shear factor (may be traced).
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  return _affine_nearest(_as_float(img), _shear_x_matrix(shear), fill)


def shear_y(img: Array, shear: Any, fill: float = GRAY) -> Array:
  """``out(x, y) = img(x, y + shear * x)`` (PIL / TF ShearY).

  Args:
    img: ``[H, W, C]`` image.
    shear: shear factor (may be traced).
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  return _affine_nearest(_as_float(img), _shear_y_matrix(shear), fill)


def translate_x(img: Array, pixels: Any, fill: float = GRAY) -> Array:
  """``out(x, y) = img(x + pixels, y)``: content moves LEFT by ``pixels``
  (PIL / TF TranslateX sign convention).

  Args:
    img: ``[H, W, C]`` image.
    pixels: shift (float, may be traced; sampled nearest).
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  return _affine_nearest(_as_float(img), _translate_matrix(pixels, 0.0), fill)


def translate_y(img: Array, pixels: Any, fill: float = GRAY) -> Array:
  """``out(x, y) = img(x, y + pixels)``: content moves UP by ``pixels``.

  Args:
    img: ``[H, W, C]`` image.
    pixels: shift (float, may be traced; sampled nearest).
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  return _affine_nearest(_as_float(img), _translate_matrix(0.0, pixels), fill)


# --------------------------------------------------------------------------
# RandAugment
# --------------------------------------------------------------------------

RAND_AUGMENT_OPS: tuple[str, ...] = (
    "Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color",
    "Posterize", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateX", "TranslateY")
"""Default RandAugment op list (Cubuk et al. 2020, without Invert)."""

ALL_OPS: tuple[str, ...] = RAND_AUGMENT_OPS + ("Invert",)
"""Every op :func:`apply_op` knows."""

GEOMETRIC_OPS: frozenset[str] = frozenset(
    {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
"""Ops implemented as one affine nearest-neighbour resampling."""


def _check_ops(ops: Sequence[str]) -> tuple[str, ...]:
  ops = tuple(ops)
  for name in ops:
    if name not in ALL_OPS:
      raise ValueError(f"unknown RandAugment op {name!r}; known: {ALL_OPS}")
  return ops


def _op_matrix(name: str, m: float, sign: Array, h: int, w: int,
               translate_frac: float) -> Array:
  """2x3 inverse affine map of a geometric op at relative strength ``m``."""
  if name == "Rotate":
    return _rotation_matrix(sign * 30.0 * m, h, w)
  if name == "ShearX":
    return _shear_x_matrix(sign * 0.3 * m)
  if name == "ShearY":
    return _shear_y_matrix(sign * 0.3 * m)
  if name == "TranslateX":
    return _translate_matrix(sign * translate_frac * m * w, 0.0)
  if name == "TranslateY":
    return _translate_matrix(0.0, sign * translate_frac * m * h)
  raise ValueError(f"{name!r} is not a geometric op")


def apply_op(img: Array, name: str, m: float, sign: Any = 1.0, *,
             translate_frac: float = 0.3, fill: float = GRAY) -> Array:
  """Applies one RandAugment op at relative strength ``m``.

  See the module docstring for the mapping from ``m`` to op parameters.

  Args:
    img: ``[H, W, C]`` integer-valued image in [0, 255].
    name: op name, one of :data:`ALL_OPS`.
    m: static relative strength ``magnitude / max_magnitude`` (may be > 1).
    sign: +1 or -1 (may be traced) for the signed ops.
    translate_frac: TranslateX/Y shift at ``m = 1`` as a fraction of the
      image width / height.
    fill: value of pixels uncovered by geometric ops.

  Returns:
    ``[H, W, C]`` float32 integer-valued image in [0, 255].
  """
  _check_ops((name,))
  img = _as_float(img)
  h, w, _ = img.shape
  m = float(m)
  sign = jnp.asarray(sign, jnp.float32)
  if name in GEOMETRIC_OPS:
    return _affine_nearest(
        img, _op_matrix(name, m, sign, h, w, translate_frac), fill)
  factor = jnp.maximum(1.0 + sign * 0.9 * m, 0.0)
  if name == "Identity":
    return img
  if name == "Invert":
    return invert(img)
  if name == "AutoContrast":
    return auto_contrast(img)
  if name == "Equalize":
    return equalize(img)
  if name == "Solarize":
    return solarize(img, float(np.clip(256.0 * (1.0 - m), 0.0, 256.0)))
  if name == "Posterize":
    return posterize(img, int(np.clip(8 - int(4 * m), 1, 8)))
  if name == "Color":
    return color(img, factor)
  if name == "Contrast":
    return contrast(img, factor)
  if name == "Brightness":
    return brightness(img, factor)
  assert name == "Sharpness", name
  return sharpness(img, factor)


def _rand_augment_layer(img: Array, op_index: Array, sign: Array,
                        ops: tuple[str, ...], m: float, translate_frac: float,
                        fill: float) -> Array:
  """``apply_op(img, ops[op_index], m, sign)`` for a traced ``op_index``.

  ``op_index == len(ops)`` means "no op".  Under ``vmap`` every switch
  branch is computed, so all geometric ops share ONE branch: their 2x3
  matrices are selected by a (cheap, scalar) inner switch and the image is
  resampled once instead of once per geometric op.
  """
  h, w, _ = img.shape
  geo = [name for name in ops if name in GEOMETRIC_OPS]
  other = [name for name in ops if name not in GEOMETRIC_OPS]
  branches: list[Callable[..., Array]] = [
      (lambda x, s, g, _n=name: apply_op(
          x, _n, m, s, translate_frac=translate_frac, fill=fill))
      for name in other]
  branches.append(lambda x, s, g: x)  # "no op" (apply_prob < 1)
  if geo:
    matrices = [(lambda s, _n=name: _op_matrix(_n, m, s, h, w, translate_frac))
                for name in geo]

    def geometric(x: Array, s: Array, g: Array) -> Array:
      mat = jax.lax.switch(g, matrices, s) if len(geo) > 1 else matrices[0](s)
      return _affine_nearest(x, mat, fill)

    branches.append(geometric)
  # Static tables: op index -> (switch branch, index among geometric ops).
  branch_of = [len(other) + 1 if name in GEOMETRIC_OPS else other.index(name)
               for name in ops] + [len(other)]
  geo_of = [geo.index(name) if name in GEOMETRIC_OPS else 0
            for name in ops] + [0]
  branch = jnp.asarray(branch_of, jnp.int32)[op_index]
  geo_index = jnp.asarray(geo_of, jnp.int32)[op_index]
  return jax.lax.switch(branch, branches, img, sign, geo_index)


def rand_augment(key: Array, img: Array, *, num_ops: int, magnitude: float,
                 max_magnitude: float = 10.0,
                 ops: Sequence[str] = RAND_AUGMENT_OPS,
                 translate_frac: float = 0.3, apply_prob: float = 1.0,
                 fill: float = GRAY) -> Array:
  """RandAugment (Cubuk et al. 2020): ``num_ops`` uniformly drawn ops in a row.

  Each op is drawn independently per example and per layer (with
  replacement) and signed ops get an independent random sign.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image on the 0..255 scale (rounded to integers).
    num_ops: number of ops applied in sequence (N in the paper).
    magnitude: shared magnitude (M); relative strength is
      ``magnitude / max_magnitude`` (not clipped, see module docstring).
    max_magnitude: the magnitude of relative strength 1 (10, as the
      ``_MAX_LEVEL`` of the UDA / MPL TF code).
    ops: static op names to draw from (see :data:`ALL_OPS`).
    translate_frac: TranslateX/Y shift at relative strength 1.
    apply_prob: probability of applying each drawn op (1 = always, as in the
      paper; MPL's code applies each op with a per-image probability drawn
      from U(0.2, 0.8), i.e. 0.5 on average).
    fill: value of pixels uncovered by geometric ops.

  Returns:
    ``[H, W, C]`` float32 integer-valued image in [0, 255].
  """
  img = _quantise(_as_float(img))
  ops = _check_ops(ops)
  if num_ops <= 0 or not ops:
    return img
  m = float(magnitude) / float(max_magnitude)

  def layer(x: Array, layer_key: Array) -> tuple[Array, None]:
    k_op, k_sign, k_apply = jax.random.split(layer_key, 3)
    op_index = jax.random.randint(k_op, (), 0, len(ops))
    sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
    if apply_prob < 1.0:
      skip = ~jax.random.bernoulli(k_apply, apply_prob)
      op_index = jnp.where(skip, len(ops), op_index)
    return _rand_augment_layer(x, op_index, sign, ops, m, translate_frac,
                               fill), None

  # A scan (not a Python loop): the layer is compiled once, and XLA cannot
  # fuse one layer's select-of-all-branches into the next layer's ops
  # (which made it recompute them; ~20% slower on CPU).
  img, _ = jax.lax.scan(layer, img, jax.random.split(key, num_ops))
  return img


def strong(key: Array, img: Array, *, flip: bool = True, translate: int = 0,
           num_ops: int = 2, magnitude: float = 10.0, cutout: int = 0,
           pad_mode: str = "reflect", **rand_augment_kwargs: Any) -> Array:
  """Strong view (FixMatch / MPL): weak, then RandAugment, then cutout.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    flip: random horizontal flip.
    translate: maximum pad-and-crop translation in pixels.
    num_ops: RandAugment N.
    magnitude: RandAugment M (see module docstring).
    cutout: side of the cutout square in pixels (0 disables).
    pad_mode: border mode of the translation.
    **rand_augment_kwargs: forwarded to :func:`rand_augment`
      (``max_magnitude``, ``ops``, ``translate_frac``, ``apply_prob``,
      ``fill``).

  Returns:
    ``[H, W, C]`` float32 image in [0, 255].
  """
  k_weak, k_ra, k_cut = jax.random.split(key, 3)
  out = weak(k_weak, img, flip=flip, translate=translate, pad_mode=pad_mode)
  out = rand_augment(k_ra, out, num_ops=num_ops, magnitude=magnitude,
                     **rand_augment_kwargs)
  if cutout > 0:
    out = _cutout(k_cut, out, cutout,
                  fill=rand_augment_kwargs.get("fill", GRAY))
  return out




# --------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------


def no_augment(key: Array, img: Array) -> Array:
  """No augmentation: the image as float32 (``key`` is ignored)."""
  del key
  return _as_float(img)


_KINDS: dict[str, Callable[..., Array]] = {
    "none": no_augment, "weak": weak, "strong": strong,
    "rand_augment": rand_augment,
}


def view_fn(spec: Mapping[str, Any]) -> AugmentFn:
  """Turns a view description into a per-image ``fn(key, img) -> img``.

  Args:
    spec: a dict / ``ConfigDict`` with ``kind`` in {'none', 'weak',
      'strong', 'rand_augment'} and that function's keyword arguments,
      e.g. ``dict(kind='strong', flip=True, translate=4, num_ops=2,
      magnitude=10, cutout=16)``.

  Returns:
    The per-image augmentation with the hyper-parameters bound (static).
  """
  spec = dict(spec.items())
  kind = spec.pop("kind", None)
  if kind not in _KINDS:
    raise ValueError(f"unknown view kind {kind!r}; known: {tuple(_KINDS)}")
  if "ops" in spec:
    spec["ops"] = tuple(spec["ops"])
  fn = _KINDS[kind]
  if kind == "none":
    if spec:
      raise TypeError(f"view kind 'none' takes no arguments, got {spec}")
    return fn

  def augment_one(key: Array, img: Array) -> Array:
    return fn(key, img, **spec)

  return augment_one


def make_views(key: Array, step: Any, images: Array, indices: Any,
               views: Mapping[str, Mapping[str, Any]]) -> dict[str, Array]:
  """Builds every requested view of a batch.

  View ``name`` of example ``indices[i]`` uses the key
  ``fold_in(fold_in(fold_in(key, step), indices[i]), view_id(name))``, so
  views are independent of each other and of the batch composition.  Call
  it inside ``jit`` with ``views`` as a static (closed-over) Python value.

  Args:
    key: the seed PRNG key.
    step: training step (int or traced scalar).
    images: ``[B, H, W, C]`` images (uint8 or float on the 0..255 scale).
    indices: ``[B]`` dataset indices of the examples.
    views: ``{name: spec}``, each spec as accepted by :func:`view_fn`.

  Returns:
    ``{name: [B, H, W, C] float32}`` with the same keys as ``views``.
  """
  base = example_keys(key, step, indices)
  out = {}
  for name, spec in views.items():
    fn = view_fn(spec)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, view_id(name))
    out[name] = jax.vmap(fn)(keys, images)
  return out
