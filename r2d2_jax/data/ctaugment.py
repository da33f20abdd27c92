"""CTAugment (FixMatch's default strong augmentation), on device.

docs/algorithms.md, "CTAugment" (and "Stateful augmentations" for the
interface).  Reference: google-research/fixmatch ``libml/ctaugment.py`` (the
ops, their bins, ``rate_to_p``, ``policy``, ``update_rates``), ``fixmatch.py``
(``AugmentPoolCTACutOut``: strong = ``policy(probe=False)`` then cutout at
level 1; the labeled batch's probe = ``policy(probe=True)`` of its weak
image) and ``cta/lib/train.py`` (``train_step``: the probe is classified by
the EMA network in eval mode, then ``update_rates`` for each labeled image).

State
  One weight ("rate") per bin of each parameter of each op: ``rates[o, j, b]``
  (``[19, 2, 17]`` float32, 1 at the start; only the ``NBINS[o, j]`` first
  bins of parameter ``j < NPARAMS[o]`` are used, the others stay 1).
  17 bins for every parameter, but Posterize (8) and Rescale (17, 6);
  Identity has none.

Training draw (``policy(probe=False)``), for each of the ``num_ops`` layers
  op o ~ uniform over the ops; for each parameter j of o:
    p = rates[o, j] + (1 - decay);  p /= max(p);  p[p < threshold] = 0
    bin ~ p / sum(p);  value_j = (bin + U(0, 1)) / NBINS[o, j]

Probe draw (``policy(probe=True)``)
  op o ~ uniform;  value_j ~ U(0, 1)

Update (``update_rates``), after classifying the probe of labeled image i:
  proximity_i = 1 - 0.5 * sum_c |p_c(probe_i) - onehot(y_i)_c|
  for each layer (o, values) of image i, in order, for each parameter j:
    b = int(value_j * NBINS[o, j] * 0.999)
    rates[o, j, b] <- decay * rates[o, j, b] + (1 - decay) * proximity_i
  sequentially over the batch's images in order (a repeated bin sees the
  earlier images' updates, as the reference's Python loop): `update`.

Op semantics (value v in [0, 1) per parameter; PIL on uint8, 0..255):
  autocontrast, equalize, invert, blur, smooth: Image.blend(x, op(x), v)
    (blur / smooth are PIL's BLUR 5x5 / SMOOTH 3x3 kernels, border copied);
  brightness, color, contrast, sharpness: ImageEnhance.*(x).enhance(0.1 + 1.9 v);
  cutout: a gray (127) square, side 2 (s // 2) with s = 1 + int(v min(H, W) 0.499);
  posterize: keep 1 + int(7.999 v) bits;  solarize: threshold int(255.999 v);
  rescale (v, m): crop 0.25 v of each side, resize back with PIL's
    (LANCZOS, BICUBIC, BILINEAR, BOX, HAMMING, NEAREST)[int(5.99 m)];
  rotate: int(round(90 v - 45)) degrees; shear_x / shear_y: (2 v - 1) 0.3;
  translate_x / translate_y: (2 v - 1) 0.3 PIXELS (the reference's quirk:
    with nearest resampling a shift below half a pixel is the identity);
  the geometric ops fill with black (PIL's transform / rotate default).
Image.blend truncates (PIL: ``(UINT8)(a + alpha (b - a))``); here it is done
in integer arithmetic with alpha on a 2^-20 grid, so it is exact whatever the
fusion (a pixel can differ from PIL's double-precision result by one gray
level only when that result is within ~1e-4 of an integer).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r2d2_jax.data import image_ops

Array = jax.Array

NAME = "ctaugment"
"""The policy name (``config.data.augment.strong.policy``) and the key of its
state in the method's augmentation state (``{NAME: {'rates': ...}}``)."""

OPS: tuple[str, ...] = (
    "autocontrast", "blur", "brightness", "color", "contrast", "cutout",
    "equalize", "invert", "identity", "posterize", "rescale", "rotate",
    "sharpness", "shear_x", "shear_y", "smooth", "solarize", "translate_x",
    "translate_y")
"""The reference's ops, in its registration order (``random.choice`` order)."""

BINS: dict[str, tuple[int, ...]] = {
    **{name: (17,) for name in OPS},
    "identity": (), "posterize": (8,), "rescale": (17, 6)}
"""Bins of each parameter of each op (``@register(...)`` in the reference)."""

MAX_PARAMS = 2
MAX_BINS = 17
NBINS = np.asarray([list(BINS[o]) + [0] * (MAX_PARAMS - len(BINS[o]))
                    for o in OPS], np.int32)        # [19, 2]; 0: no parameter
NPARAMS = np.asarray([len(BINS[o]) for o in OPS], np.int32)

CUTOUT_FILL = 127.0
"""The gray of the reference's cutout (``(127, 127, 127)``)."""

GEOMETRIC = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")

RESCALE_METHODS = ("lanczos", "bicubic", "bilinear", "box", "hamming",
                   "nearest")
"""``(Image.ANTIALIAS, BICUBIC, BILINEAR, BOX, HAMMING, NEAREST)``;
ANTIALIAS is LANCZOS (the name was removed in Pillow 10)."""

_BLEND_BITS = 20
_PRECISION_BITS = 22  # Pillow's Resample.c, 8 bits per channel


# ---------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class CTAugmentHparams:
  """CTAugment's settings (``config.data.augment.strong`` with
  ``policy='ctaugment'``); the reference's flags ``adepth``, ``ath``,
  ``adecay``.

  Attributes:
    num_ops: ops per image (``adepth`` = 2), >= 1.
    threshold: bins whose normalised weight is below it are never drawn
      (``ath`` = 0.80), in (0, 1].
    decay: of the bin weights' moving average (``adecay`` = 0.99), in [0, 1).
    ops: the op subset drawn from (None: all 19, the reference).
  """
  num_ops: int = 2
  threshold: float = 0.80
  decay: float = 0.99
  ops: tuple[str, ...] | None = None

  def __post_init__(self):
    _check_number("num_ops", self.num_ops, 1, None, integer=True)
    _check_number("threshold", self.threshold, 0.0, 1.0, lo_open=True)
    _check_number("decay", self.decay, 0.0, 1.0, hi_open=True)
    if self.ops is not None:
      object.__setattr__(self, "ops", tuple(self.ops))
      op_indices(self.ops)


def _check_number(name, value, lo, hi, *, lo_open=False, hi_open=False,
                  integer=False):
  # methods.base.check_range's messages (not imported: methods imports data).
  interval = (f"{'(' if lo_open else '['}{lo}, "
              f"{'inf' if hi is None else hi}{')' if hi_open else ']'}")
  kinds = (int, np.integer) if integer else (int, float, np.number)
  if isinstance(value, bool) or not isinstance(value, kinds):
    raise ValueError(f"{name}={value!r} must be "
                     f"{'an integer' if integer else 'a number'} in "
                     f"{interval}.")
  if ((value <= lo if lo_open else value < lo) or
      (hi is not None and (value >= hi if hi_open else value > hi))):
    raise ValueError(f"{name}={value!r} is outside {interval}.")


OPTIONS = ("threshold", "decay")
"""The policy's own options in a strong view spec (beside num_ops, ops)."""


def hparams_from(spec: Any) -> CTAugmentHparams:
  """The settings of a strong view spec / config block (``magnitude`` unread).

  Raises:
    ValueError / TypeError: a value out of range or an unknown option,
      naming the field.
  """
  spec = dict(spec.items())
  known = {"policy", "num_ops", "ops", "magnitude", "flip", "translate",
           "pad_mode", "cutout", "weak_after", "fill", "state",
           *OPTIONS}
  unknown = sorted(set(spec) - known)
  if unknown:
    raise TypeError(f"policy 'ctaugment' takes no option(s) {unknown}; its "
                    f"options: num_ops, ops, {', '.join(OPTIONS)}")
  kwargs = {k: spec[k] for k in ("num_ops", "threshold", "decay", "ops")
            if spec.get(k) is not None}
  return CTAugmentHparams(**kwargs)


def op_indices(ops: Sequence[str] | None) -> tuple[int, ...]:
  """Indices into :data:`OPS` of an op subset (None: all)."""
  if ops is None:
    return tuple(range(len(OPS)))
  for name in ops:
    if name not in OPS:
      raise ValueError(f"unknown CTAugment op {name!r}; known: {OPS}")
  if not ops:
    raise ValueError("ops=() draws nothing; give at least one CTAugment op")
  return tuple(OPS.index(name) for name in ops)


# ---------------------------------------------------------------------------
# State, weights, draws, update


def init_state() -> dict[str, Array]:
  """``{'rates': ones [19, 2, 17]}``: every bin at 1 (``np.ones``)."""
  return {"rates": jnp.ones((len(OPS), MAX_PARAMS, MAX_BINS), jnp.float32)}


def rate_to_p(rates: Array, nbins: Any, threshold: float, decay: float
              ) -> Array:
  """``rate_to_p``: weights -> drawing probabilities (unnormalised).

  Args:
    rates: ``[..., 17]`` bin weights.
    nbins: ``[...]`` number of valid bins (the others get 0).
    threshold: bins below it (after dividing by the max) get 0.
    decay: the floor ``1 - decay`` added to every weight.

  Returns:
    ``[..., 17]``: ``p = rates + 1 - decay; p /= max(p); p[p < th] = 0``.
  """
  valid = jnp.arange(MAX_BINS) < jnp.asarray(nbins)[..., None]
  p = jnp.where(valid, rates + (1.0 - decay), 0.0)
  p = p / jnp.maximum(jnp.max(p, -1, keepdims=True), 1e-30)
  return jnp.where(p < threshold, 0.0, p)


class Draws(NamedTuple):
  """What one image drew for its ``num_ops`` layers (the probe's aux).

  Attributes:
    op: ``[N]`` int32 index into :data:`OPS`.
    values: ``[N, 2]`` float32 parameter values in [0, 1) (0 where the op has
      fewer parameters).
  """
  op: Array
  values: Array


_UNIFORMS = 7  # per layer: op, 2 values' offsets, 2 bins, cutout's (y, x)


def draw(key: Array, num_ops: int, rates: Array | None, *,
         threshold: float = 0.8, decay: float = 0.99,
         ops: Sequence[str] | None = None) -> tuple[Draws, Array]:
  """One image's layers: the training draw from ``rates``, or the probe draw.

  Everything comes from ONE ``[num_ops, 7]`` uniform draw (one threefry call
  per image: far cheaper to compile than a key split per choice); a bin is
  drawn by inverting the cumulative sum of :func:`rate_to_p`.

  Args:
    key: PRNG key.
    num_ops: layers.
    rates: ``[19, 2, 17]`` bin weights; None: the probe draw (values U(0, 1)).
    threshold: of :func:`rate_to_p`.
    decay: of :func:`rate_to_p`.
    ops: op subset (None: all).

  Returns:
    (``Draws`` with ``[N]`` / ``[N, 2]`` leaves, ``[N, 2]`` uniforms for
    Cutout's position).
  """
  choices = jnp.asarray(op_indices(ops), jnp.int32)
  u = jax.random.uniform(key, (num_ops, _UNIFORMS), jnp.float32)
  pick = jnp.floor(u[:, 0] * choices.shape[0]).astype(jnp.int32)
  op = choices[jnp.clip(pick, 0, choices.shape[0] - 1)]
  n = jnp.asarray(NBINS)[op]                                   # [N, 2]
  if rates is None:
    values = u[:, 1:3]
  else:
    p = rate_to_p(rates[op], n, threshold, decay)              # [N, 2, 17]
    cdf = jnp.cumsum(p, -1)
    target = u[:, 3:5, None] * cdf[..., -1:]
    bins = jnp.sum(cdf <= target, -1)
    # u < 1, but u * total may round up to total: stay on a drawable bin.
    last = MAX_BINS - 1 - jnp.argmax(p[..., ::-1] > 0, -1)
    bins = jnp.minimum(bins, last).astype(jnp.float32)
    values = (bins + u[:, 1:3]) / jnp.maximum(n, 1).astype(jnp.float32)
  return Draws(op=op, values=jnp.where(n > 0, values, 0.0)), u[:, 5:7]


def proximity(probs: Array, labels: Array) -> Array:
  """``1 - 0.5 * sum_c |p_c - onehot(y)_c|`` per row (cta/lib/train.py)."""
  onehot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
  return 1.0 - 0.5 * jnp.sum(jnp.abs(probs - onehot), -1)


def update(rates: Array, op: Array, values: Array, prox: Array,
           decay: float) -> Array:
  """``update_rates`` for every labeled image, sequentially, in batch order.

  Args:
    rates: ``[19, 2, 17]`` bin weights.
    op: ``[B, N]`` the probes' ops.
    values: ``[B, N, 2]`` their values.
    prox: ``[B]`` proximity of each probe's prediction to its label.
    decay: the moving average's decay.

  Returns:
    The new ``[19, 2, 17]`` weights.
  """
  b, n = op.shape
  nbins = jnp.asarray(NBINS)
  xs = (op.reshape(b * n), values.reshape(b * n, MAX_PARAMS),
        jnp.repeat(prox.astype(jnp.float32), n))
  keep, mix = jnp.float32(decay), jnp.float32(1.0 - decay)

  def body(r, x):
    o, v, p = x
    for j in range(MAX_PARAMS):
      nb = nbins[o, j]
      bin_ = jnp.floor(v[j] * nb.astype(jnp.float32) * 0.999).astype(
          jnp.int32)
      old = r[o, j, bin_]
      r = r.at[o, j, bin_].set(jnp.where(nb > 0, old * keep + p * mix, old))
    return r, None

  rates, _ = jax.lax.scan(body, rates, xs)
  return rates


# ---------------------------------------------------------------------------
# PIL pieces


def blend(a: Array, b: Array, alpha: Any) -> Array:
  """PIL ``Image.blend(a, b, alpha)``: ``(UINT8)(a + alpha (b - a))``, clipped.

  Integer arithmetic with alpha rounded to a multiple of 2^-20 (exact, so
  independent of fusion); alpha in [0, 2].
  """
  scale = 1 << _BLEND_BITS
  al = jnp.round(jnp.asarray(alpha, jnp.float32) * scale).astype(jnp.int32)
  ai = jnp.asarray(a, jnp.float32).astype(jnp.int32)
  bi = jnp.asarray(b, jnp.float32).astype(jnp.int32)
  out = (ai * scale + al * (bi - ai)) >> _BLEND_BITS      # floor
  return jnp.clip(out, 0, 255).astype(jnp.float32)


def _kernel_filter(img: Array, kernel: np.ndarray, divisor: float) -> Array:
  """PIL ``ImageFilter.Kernel``: ``floor(sum / divisor + 0.5)``, border copied."""
  h, w, _ = img.shape
  k = kernel.shape[0]
  r = k // 2
  if h < k or w < k:
    return img
  total = jnp.zeros((h - 2 * r, w - 2 * r, img.shape[-1]), jnp.float32)
  for dy in range(k):
    for dx in range(k):
      if kernel[dy, dx]:
        total = total + float(kernel[dy, dx]) * img[dy:dy + h - 2 * r,
                                                    dx:dx + w - 2 * r]
  # Integer sums < 2^24: exact; / 16 exact; / 13 is never at a half.
  inner = jnp.floor(total / divisor + 0.5)
  interior = np.zeros((h, w, 1), bool)
  interior[r:h - r, r:w - r] = True
  return jnp.where(interior, jnp.pad(inner, ((r, r), (r, r), (0, 0))), img)


_BLUR = np.asarray([[1, 1, 1, 1, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1],
                    [1, 0, 0, 0, 1], [1, 1, 1, 1, 1]], np.float64)
_SMOOTH = np.asarray([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float64)


def pil_blur(img: Array) -> Array:
  """PIL ``img.filter(ImageFilter.BLUR)``."""
  return _kernel_filter(img, _BLUR, 16.0)


def pil_smooth(img: Array) -> Array:
  """PIL ``img.filter(ImageFilter.SMOOTH)``."""
  return _kernel_filter(img, _SMOOTH, 13.0)


def _luma(img: Array) -> Array:
  return image_ops._luma(img)  # pylint: disable=protected-access


def _contrast_mean(img: Array) -> Array:
  # PIL: int(ImageStat.Stat(img.convert('L')).mean[0] + 0.5).
  h, w, _ = img.shape
  total = jnp.sum(_luma(img).reshape(-1).astype(jnp.int32))
  return ((2 * total + h * w) // (2 * h * w)).astype(jnp.float32)


def enhance(img: Array, name: str, factor: Any) -> Array:
  """PIL ``ImageEnhance.<name>(img).enhance(factor)`` (a blend, truncating)."""
  if name == "brightness":
    degenerate = jnp.zeros_like(img)
  elif name == "color":
    degenerate = jnp.broadcast_to(_luma(img), img.shape)
  elif name == "contrast":
    degenerate = jnp.broadcast_to(_contrast_mean(img), img.shape)
  elif name == "sharpness":
    degenerate = pil_smooth(img)
  else:
    raise ValueError(f"unknown enhancement {name!r}")
  return blend(degenerate, img, factor)


# -- Rescale: Pillow's Resample.c coefficients, precomputed per crop ------

def _box(x):
  return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear(x):
  x = abs(x)
  return 1.0 - x if x < 1.0 else 0.0


def _hamming(x):
  x = abs(x)
  if x == 0.0:
    return 1.0
  if x >= 1.0:
    return 0.0
  x *= math.pi
  return math.sin(x) / x * (0.54 + 0.46 * math.cos(x))


def _bicubic(x, a=-0.5):
  x = abs(x)
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
  if x < 2.0:
    return (((x - 5) * x + 8) * x - 4) * a
  return 0.0


def _sinc(x):
  if x == 0.0:
    return 1.0
  x *= math.pi
  return math.sin(x) / x


def _lanczos(x):
  return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


_FILTERS = {"lanczos": (_lanczos, 3.0), "bicubic": (_bicubic, 2.0),
            "bilinear": (_bilinear, 1.0), "box": (_box, 0.5),
            "hamming": (_hamming, 1.0)}
_TAPS = 7  # 2 ceil(3) + 1: Lanczos when enlarging


def _axis_coeffs(in_size: int, out_size: int, method: str
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Pillow's 8-bit fixed-point coefficients of one axis: (index, weight)."""
  idx = np.zeros((out_size, _TAPS), np.int32)
  wts = np.zeros((out_size, _TAPS), np.int64)
  scale = in_size / out_size
  if method == "nearest":
    # ImagingScaleAffine: xo = a[0] / 2, COORD(xo), xo += a[0] (accumulated
    # in double: (x + 0.5) a[0] may land just below an integer).
    xo = scale * 0.5
    for xx in range(out_size):
      idx[xx, 0] = min(int(xo), in_size - 1)
      wts[xx, 0] = 1 << _PRECISION_BITS
      xo += scale
    return idx, wts
  filt, support = _FILTERS[method]
  filterscale = max(scale, 1.0)
  support = support * filterscale
  for xx in range(out_size):
    center = (xx + 0.5) * scale
    xmin = max(int(center - support + 0.5), 0)
    xmax = min(int(center + support + 0.5), in_size) - xmin
    ks = [filt((x + xmin - center + 0.5) / filterscale) for x in range(xmax)]
    total = sum(ks)
    for x, k in enumerate(ks):
      k = k / total if total != 0.0 else k
      idx[xx, x] = xmin + x
      wts[xx, x] = (int(-0.5 + k * (1 << _PRECISION_BITS)) if k < 0 else
                    int(0.5 + k * (1 << _PRECISION_BITS)))
  return idx, wts


@functools.lru_cache(maxsize=None)
def rescale_tables(n: int) -> tuple[np.ndarray, np.ndarray]:
  """For an axis of ``n`` pixels: ``[K, 6, n, 7]`` source indices and weights
  of cropping ``k`` pixels off each end (k < K) and resizing back to ``n``
  with each method (k = 0: the identity, PIL's ``resize`` of an unchanged
  size returns a copy)."""
  kmax = int(round(0.25 * n)) + 1
  idx = np.zeros((kmax, len(RESCALE_METHODS), n, _TAPS), np.int32)
  wts = np.zeros((kmax, len(RESCALE_METHODS), n, _TAPS), np.int32)
  for k in range(kmax):
    for m, method in enumerate(RESCALE_METHODS):
      if k == 0 or n - 2 * k <= 0:
        idx[k, m, :, 0] = np.arange(n)
        wts[k, m, :, 0] = 1 << _PRECISION_BITS
        continue
      i, w = _axis_coeffs(n - 2 * k, n, method)
      idx[k, m] = i + k
      wts[k, m] = w
  return idx, wts


def _resample(img: Array, idx: Array, wts: Array, axis: int) -> Array:
  """One Pillow pass: ``clip8((2^21 + sum_t x[idx] w) >> 22)`` along ``axis``."""
  x = img.astype(jnp.int32)
  if axis == 1:
    g = x[:, idx, :]                                     # [H, n, T, C]
    s = jnp.sum(g * wts[None, :, :, None], axis=2)
  else:
    g = x[idx, :, :]                                     # [n, T, W, C]
    s = jnp.sum(g * wts[:, :, None, None], axis=1)
  s = (s + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS
  return jnp.clip(s, 0, 255).astype(jnp.float32)


def rescale(img: Array, scale_value: Any, method_value: Any) -> Array:
  """The reference's ``rescale(x, scale, method)`` on the 0..255 scale.

  Crop ``round(0.25 v W)`` pixels off the left and right (``round(0.25 v
  H)`` top and bottom) and resize back with PIL's
  ``RESCALE_METHODS[int(5.99 m)]``: horizontal pass, then vertical, each
  rounded to uint8 (Pillow's ``ImagingResample``).
  """
  h, w, _ = img.shape
  s = jnp.asarray(scale_value, jnp.float32) * 0.25
  m = jnp.floor(jnp.asarray(method_value, jnp.float32) * 5.99).astype(
      jnp.int32)
  m = jnp.clip(m, 0, len(RESCALE_METHODS) - 1)
  out = img
  for axis, n in ((1, w), (0, h)):
    idx_t, wts_t = rescale_tables(n)
    k = jnp.clip(jnp.round(s * n).astype(jnp.int32), 0, idx_t.shape[0] - 1)
    idx = jnp.asarray(idx_t)[k, m]
    wts = jnp.asarray(wts_t)[k, m]
    out = jnp.where(k > 0, _resample(out, idx, wts, axis), out)
  return out


# ---------------------------------------------------------------------------
# Ops


def geometric_matrix(name: str, value: Any, h: int, w: int) -> Array:
  """The 2x3 inverse map of a geometric op at parameter value ``value``."""
  v = jnp.asarray(value, jnp.float32)
  if name == "rotate":
    return image_ops.rotation_matrix(jnp.round((2.0 * v - 1.0) * 45.0), h, w)
  shift = (2.0 * v - 1.0) * 0.3
  if name == "shear_x":
    return image_ops.shear_x_matrix(shift)
  if name == "shear_y":
    return image_ops.shear_y_matrix(shift)
  if name == "translate_x":
    return image_ops.translate_matrix(shift, 0.0)
  if name == "translate_y":
    return image_ops.translate_matrix(0.0, shift)
  raise ValueError(f"{name!r} is not a geometric op")


def cutout_side(level: Any, h: int, w: int) -> Array:
  """Side of the reference's cutout square: 2 (s // 2), s = 1 + int(0.499 v min)."""
  s = 1 + jnp.floor(jnp.asarray(level, jnp.float32) * min(h, w) * 0.499
                    ).astype(jnp.int32)
  return 2 * (s // 2)


def apply_op(img: Array, name: str, values: Any, pos: Any = None
             ) -> Array:
  """Applies CTAugment op ``name`` at parameter values ``values`` ([2]).

  Args:
    img: ``[H, W, C]`` integer-valued float image in [0, 255].
    name: one of :data:`OPS`.
    values: ``[2]`` values in [0, 1) (the second only for rescale).
    pos: ``[2]`` uniforms in [0, 1) placing Cutout's centre (row, column;
      uniform over the pixels, as the reference's ``np.random.randint``).

  Returns:
    ``[H, W, C]`` float32 integer-valued image in [0, 255].
  """
  img = jnp.asarray(img, jnp.float32)
  h, w, _ = img.shape
  v = jnp.asarray(values, jnp.float32)
  v0 = v[0]
  if name in GEOMETRIC:
    return image_ops.affine_nearest(img, geometric_matrix(name, v0, h, w), 0.0)
  if name == "identity":
    return img
  if name == "autocontrast":
    return blend(img, image_ops.auto_contrast(img), v0)
  if name == "equalize":
    return blend(img, image_ops.equalize(img), v0)
  if name == "invert":
    return blend(img, 255.0 - img, v0)
  if name == "blur":
    return blend(img, pil_blur(img), v0)
  if name == "smooth":
    return blend(img, pil_smooth(img), v0)
  if name in ("brightness", "color", "contrast", "sharpness"):
    return enhance(img, name, 0.1 + 1.9 * v0)
  if name == "posterize":
    return image_ops.posterize(img, 1 + jnp.floor(v0 * 7.999).astype(jnp.int32))
  if name == "solarize":
    return image_ops.solarize(img, jnp.floor(v0 * 255.999))
  if name == "rescale":
    return rescale(img, v0, v[1])
  if name == "cutout":
    if pos is None:
      raise ValueError("cutout needs its position (pos)")
    pos = jnp.asarray(pos, jnp.float32)
    cy = jnp.minimum(jnp.floor(pos[0] * h).astype(jnp.int32), h - 1)
    cx = jnp.minimum(jnp.floor(pos[1] * w).astype(jnp.int32), w - 1)
    return image_ops.cutout_at(img, cy, cx, cutout_side(v0, h, w),
                               CUTOUT_FILL)
  raise ValueError(f"unknown CTAugment op {name!r}; known: {OPS}")


def _layer(img: Array, draws: Draws, pos: Array, ops: Sequence[str]) -> Array:
  """One layer; the geometric ops share one resampling (all branches run
  under vmap)."""
  h, w, _ = img.shape
  names = [OPS[i] for i in op_indices(ops)]
  geo = [n for n in names if n in GEOMETRIC]
  other = [n for n in names if n not in GEOMETRIC]
  branches = [(lambda x, _n=n: apply_op(x, _n, draws.values, pos))
              for n in other]
  if geo:
    matrices = [(lambda _n=n: geometric_matrix(_n, draws.values[0], h, w))
                for n in geo]
    geo_of = np.zeros(len(OPS), np.int32)
    for i, n in enumerate(geo):
      geo_of[OPS.index(n)] = i

    def geometric(x):
      g = jnp.asarray(geo_of)[draws.op]
      mat = jax.lax.switch(g, matrices) if len(geo) > 1 else matrices[0]()
      return image_ops.affine_nearest(x, mat, 0.0)

    branches.append(geometric)
  branch_of = np.zeros(len(OPS), np.int32)
  for n in names:
    branch_of[OPS.index(n)] = (len(other) if n in GEOMETRIC
                               else other.index(n))
  if len(branches) == 1:
    return branches[0](img)
  return jax.lax.switch(jnp.asarray(branch_of)[draws.op], branches, img)


def apply(img: Array, draws: Draws, pos: Array,
          ops: Sequence[str] | None = None) -> Array:
  """Applies an image's layers in order (``ctaugment.apply``).

  Args:
    img: ``[H, W, C]`` image on the 0..255 scale (rounded, clipped: the
      reference's uint8).
    draws: ``[N]`` layers (:func:`draw`).
    pos: ``[N, 2]`` Cutout positions (:func:`draw`).
    ops: the op subset the draws come from (None: all).

  Returns:
    ``[H, W, C]`` float32 image.
  """
  img = jnp.clip(jnp.round(jnp.asarray(img, jnp.float32)), 0.0, 255.0)

  def body(x, layer):
    d, k = layer
    return _layer(x, d, k, ops or OPS), None

  img, _ = jax.lax.scan(body, img, (draws, pos))
  return img


def augment(key: Array, img: Array, state: Any, *, num_ops: int = 2,
            threshold: float = 0.8, decay: float = 0.99,
            ops: Sequence[str] | None = None) -> Array:
  """The training draw from the state's weights, applied (strong view).

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image on the 0..255 scale.
    state: ``{'rates': [19, 2, 17]}`` (this policy's entry of the method's
      augmentation state).
    num_ops, threshold, decay, ops: the settings (:class:`CTAugmentHparams`).

  Returns:
    ``[H, W, C]`` float32 image.
  """
  draws, pos = draw(key, num_ops, state["rates"], threshold=threshold,
                    decay=decay, ops=ops)
  return apply(img, draws, pos, ops)


def probe(key: Array, img: Array, *, num_ops: int = 2,
          ops: Sequence[str] | None = None) -> tuple[Array, Draws]:
  """The probe draw (values U(0, 1)) applied; returns (image, draws)."""
  draws, pos = draw(key, num_ops, None, ops=ops)
  return apply(img, draws, pos, ops), draws
