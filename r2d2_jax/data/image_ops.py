"""Pixel-level image ops of the strong augmentations, as pure jnp functions.

Each op maps ONE image ``img[H, W, C]`` (C = 1 or 3, any H x W) to one image
and takes its parameters as (possibly traced) scalars, so that it runs under
``jit`` / ``vmap`` with a per-example parameter.  Which op a policy draws and
with which parameter is :mod:`r2d2_jax.data.randaugment`'s business; this
module only says what an op does with a given parameter.

Value conventions
-----------------
* Inputs may be any dtype on the 0..255 scale; outputs are ``float32`` on the
  0..255 scale.  Every op maps an integer-valued image in [0, 255] to an
  integer-valued image in [0, 255], like the PIL / TF reference
  implementations that work on uint8 (that is what makes Posterize / Equalize
  / Solarize well defined after another op).
* Each op follows PIL (``ImageOps`` / ``ImageEnhance`` / ``Image.transform``),
  exactly or within one gray level where PIL's own float round-off decides
  (see ``tests/test_augment_policies.py`` for the tolerances).
* Pixels exposed by geometric ops and cutout are filled with gray
  (:data:`GRAY` = 128, the ``replace`` value of the MPL / UDA TF code).

Performance notes
-----------------
Under ``vmap``, ``lax.switch`` with a per-example index evaluates every branch
and selects, so each op is kept cheap:

* the geometric ops are a 2x3 matrix and ONE nearest-neighbour integer gather
  (:func:`affine_nearest`; nearest is also what PIL's and TF's default
  resampling does), so a policy can share one gather among all of them;
* Equalize is a 256-bin scatter-add histogram and a row-wise LUT gather, with
  float instead of integer division (which XLA:CPU does not vectorise);
* per-channel reductions fold pixels into the minor axis (see
  :func:`_per_channel`); the point ops are elementwise.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

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


def cutout_at(img: Array, cy: Any, cx: Any, size: Any,
              fill: float = GRAY) -> Array:
  """Fills the ``size x size`` square centred at ``(cy, cx)`` with ``fill``.

  The square covers rows ``[cy - size//2, cy - size//2 + size)`` and the
  same for columns, clipped to the image.

  Args:
    img: ``[H, W, C]`` image.
    cy: centre row (int, may be traced).
    cx: centre column (int, may be traced).
    size: side of the square (int, may be traced; 0 is the identity).
    fill: fill value.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  h, w, _ = img.shape
  size = jnp.asarray(size, jnp.int32)
  y0 = jnp.asarray(cy, jnp.int32) - size // 2
  x0 = jnp.asarray(cx, jnp.int32) - size // 2
  # Broadcast compares instead of a scatter: cheap and vmap-friendly.
  rows = jnp.arange(h, dtype=jnp.int32)[:, None, None]
  cols = jnp.arange(w, dtype=jnp.int32)[None, :, None]
  inside = (rows >= y0) & (rows < y0 + size) & (cols >= x0) & (cols < x0 + size)
  return jnp.where(inside, jnp.float32(fill), img)


def cutout_abs(img: Array, x0: Any, y0: Any, v: Any,
               fill: Any = GRAY) -> Array:
  """USB's (and kekmodel FixMatch's) ``CutoutAbs`` box for a drawn corner.

  Fills ``ImageDraw.rectangle((x0', y0', x1, y1))`` with ``x0' = int(max(0,
  x0 - v/2))``, ``x1 = min(W, x0' + v)`` (likewise y): both corners
  included, coordinates truncated, clipped to the image, so the box is
  ``int(v) + 1`` pixels wide before clipping.  ``v <= 0`` is the identity
  (USB's ``Cutout`` returns the image for ``v <= 0``).

  Args:
    img: ``[H, W, C]`` image.
    x0: the drawn column (float, may be traced), before ``- v/2``.
    y0: the drawn row (float, may be traced).
    v: the side in pixels (float, may be traced).
    fill: a scalar or a ``[C]`` colour.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  h, w, _ = img.shape
  v = jnp.asarray(v, jnp.float32)
  left = jnp.floor(jnp.maximum(0.0, jnp.asarray(x0, jnp.float32) - v / 2.0))
  top = jnp.floor(jnp.maximum(0.0, jnp.asarray(y0, jnp.float32) - v / 2.0))
  right = jnp.floor(jnp.minimum(jnp.float32(w), left + v))
  bottom = jnp.floor(jnp.minimum(jnp.float32(h), top + v))
  rows = jnp.arange(h, dtype=jnp.float32)[:, None, None]
  cols = jnp.arange(w, dtype=jnp.float32)[None, :, None]
  inside = ((rows >= top) & (rows <= bottom) & (cols >= left)
            & (cols <= right) & (v > 0.0))
  return jnp.where(inside, jnp.asarray(fill, jnp.float32), img)


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


def solarize_add(img: Array, addition: Any, threshold: Any = 128) -> Array:
  """Adds ``addition`` to pixels ``< threshold``, clipped to [0, 255].

  The TF AutoAugment ``SolarizeAdd`` (no PIL equivalent).

  Args:
    img: ``[H, W, C]`` image.
    addition: scalar added to the dark pixels (may be traced).
    threshold: pixels ``>= threshold`` are left alone.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = _as_float(img)
  added = jnp.clip(img + jnp.round(addition), 0.0, 255.0)
  return jnp.where(img < threshold, added, img)


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


def affine_nearest(img: Array, mat: Array, fill: float) -> Array:
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


def rotation_matrix(degrees: Any, h: int, w: int) -> Array:
  # Rotation about the image centre; positive = counter-clockwise on screen.
  theta = jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  cx, cy = w / 2.0, h / 2.0
  return jnp.stack([jnp.stack([cos, -sin, cx - cos * cx + sin * cy]),
                    jnp.stack([sin, cos, cy - sin * cx - cos * cy])])


def shear_x_matrix(shear: Any) -> Array:
  s = jnp.asarray(shear, jnp.float32)
  one, zero = jnp.ones_like(s), jnp.zeros_like(s)
  return jnp.stack([jnp.stack([one, s, zero]), jnp.stack([zero, one, zero])])


def shear_y_matrix(shear: Any) -> Array:
  s = jnp.asarray(shear, jnp.float32)
  one, zero = jnp.ones_like(s), jnp.zeros_like(s)
  return jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([s, one, zero])])


def translate_matrix(tx: Any, ty: Any) -> Array:
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
  return affine_nearest(img, rotation_matrix(degrees, h, w), fill)


def shear_x(img: Array, shear: Any, fill: float = GRAY) -> Array:
  """``out(x, y) = img(x + shear * y, y)`` (PIL / TF ShearX).

  Args:
    img: ``[H, W, C]`` image.
    shear: shear factor (may be traced).
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  return affine_nearest(_as_float(img), shear_x_matrix(shear), fill)


def shear_y(img: Array, shear: Any, fill: float = GRAY) -> Array:
  """``out(x, y) = img(x, y + shear * x)`` (PIL / TF ShearY).

  Args:
    img: ``[H, W, C]`` image.
    shear: shear factor (may be traced).
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  return affine_nearest(_as_float(img), shear_y_matrix(shear), fill)


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
  return affine_nearest(_as_float(img), translate_matrix(pixels, 0.0), fill)


def translate_y(img: Array, pixels: Any, fill: float = GRAY) -> Array:
  """``out(x, y) = img(x, y + pixels)``: content moves UP by ``pixels``.

  Args:
    img: ``[H, W, C]`` image.
    pixels: shift (float, may be traced; sampled nearest).
    fill: value of uncovered pixels.

  Returns:
    ``[H, W, C]`` float32 image.
  """
  return affine_nearest(_as_float(img), translate_matrix(0.0, pixels), fill)

