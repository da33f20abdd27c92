"""RandAugment policies: which ops a strong view draws, how often, how strong.

A *policy* says which op list an image draws ``num_ops`` ops from, with which
probability each drawn op is applied, and how the magnitude becomes each op's
parameter (the "level -> argument" mapping).  The ops themselves are
:mod:`r2d2_jax.data.image_ops` (PIL semantics).  Policies are chosen by name
(``config.data.augment.strong.policy``); each matches one reference
implementation, documented in ``docs/algorithms.md`` ("Augmentation
policies"):

``'mpl'``
  The RandAugment of the Meta Pseudo Labels / UDA TF code
  (google-research ``meta_pseudo_labels/augment.py``): AutoAugment's level
  scale with ``_MAX_LEVEL = 10`` (``L = M / 10``, not clipped), a fixed
  magnitude, 15 ops (Invert and Cutout included, no Identity), each drawn op
  applied with a probability drawn once per image from U(0.2, 0.8).
``'fixmatch'``
  FixMatch's RandAugment (google-research ``fixmatch`` ``libml/augment.py``
  ``AugmentPoolRAMC``, ops in ``third_party/auto_augment/augmentations.py``):
  14 ops (Identity, no Invert / Cutout), each op's level drawn uniformly from
  ``{1, ..., M - 1}`` (M = 10: 1..9), each op applied with probability 0.5.
``'legacy'``
  This library's earlier RandAugment: severity rises with ``m = M /
  max_magnitude`` for every op, every drawn op applied.  Kept to reproduce
  older runs; no paper config uses it.
``'usb'``
  USB's RandAugment (microsoft/Semi-supervised-learning
  ``semilearn/datasets/augmentation/randaugment.py``, the strong view of its
  FlexMatch / FreeMatch / SoftMatch / AdaMatch configs, called as
  ``RandAugment(3, 5)``): 14 ops (Identity, no Invert / Cutout), every drawn
  op applied, each op's value drawn uniformly from its own [min, max] (the
  magnitude is accepted, in [0, 30], and never read: USB marks it
  "deprecated"), then ALWAYS a Cutout of side ``int(v) + 1``,
  ``v ~ U(0, 0.5) W`` pixels, coloured (125, 123, 114).  Geometric ops fill
  black (PIL's default), not gray.

Every policy draws everything from the key it is given, so a view stays a
pure function of (seed, step, example index).  A policy may also read a
``state`` pytree (e.g. CTAugment's bin weights, passed by the trainer from the
train state); no current policy does, and they ignore it.

Magnitude semantics (``L = M / 10``; ``l`` the level ``fixmatch`` draws
from 1..M-1; ``m = M / max_magnitude``, ``frac = translate_frac``; +- a
random sign per op):

===============  ======================  ===================  ==================
op               mpl (fixed M)           fixmatch (l)         legacy (m)
===============  ======================  ===================  ==================
Rotate           +-30 L degrees          +-int(3 l) degrees   +-30 m degrees
ShearX / Y       +-0.3 L                 +-0.03 l             +-0.3 m
TranslateX / Y   +-L translate_const px  +-l px               +-frac m size px
Color, Contr.,   factor 1.8 L + 0.1      factor 0.18 l + 0.1  max(1 +- 0.9 m, 0)
Bright., Sharp.
Solarize         invert >= int(256 L)    invert >=            invert >= 256(1-m)
                 mod 256 (uint8 cast)    256 - int(25.6 l)
Posterize        keep int(4 L) bits      keep 4 - int(0.4 l)  keep 8 - int(4 m)
                 (0 or > 8: 1 bit)       bits                 bits (>= 1)
Cutout           2 int(L cutout_const)   --                   --
                 square
SolarizeAdd      +int(110 L) below 128   --                   --
===============  ======================  ===================  ==================

``'usb'`` (``u ~ U(0, 1)`` per layer, the value ``min + (max - min) u``;
no separate sign): Rotate [-30, 30] degrees; ShearX / Y [-0.3, 0.3];
TranslateX / Y [-0.3, 0.3] times W / H pixels; Color, Contrast, Brightness,
Sharpness factor [0.05, 0.95] (never above 1); Solarize threshold [0, 256];
Posterize ``int(v)`` bits, v in [4, 8] (4..7); AutoContrast, Equalize,
Identity.  ``ops=`` picks a subset, e.g. USB's ``augment_list_no_color``
(its MedMNIST lists) or adds Invert.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from r2d2_jax.data import image_ops as ops_lib
from r2d2_jax.data.image_ops import GRAY

Array = jax.Array

GEOMETRIC_OPS: frozenset[str] = frozenset(
    {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"})
"""Ops implemented as one affine nearest-neighbour resampling."""

_ENHANCE = {"Color": ops_lib.color, "Contrast": ops_lib.contrast,
            "Brightness": ops_lib.brightness, "Sharpness": ops_lib.sharpness}


class Draws(NamedTuple):
  """What one policy drew for each of an image's ``num_ops`` layers.

  Attributes:
    op: ``[N]`` int32 index into the op list.
    apply: ``[N]`` bool, whether the drawn op is applied.
    sign: ``[N]`` float32 +1 / -1 for the signed ops.
    level: ``[N]`` float32 level per layer, or None for a policy whose level
      is the fixed magnitude.
    key: ``[N]`` keys for ops that draw more (Cutout's position).
  """
  op: Array
  apply: Array
  sign: Array
  level: Array | None
  key: Array


@dataclasses.dataclass(frozen=True)
class Policy:
  """A named RandAugment variant.

  Attributes:
    name: the name configs use.
    reference: the implementation it matches.
    ops: its default op list (the reference's order).
    known_ops: every op its level mapping covers (``ops=`` may choose any).
    magnitude_range: inclusive bounds of the magnitude M.
    integer_magnitude: whether M must be an integer.
    options: extra keyword options with their defaults.
    draw: ``draw(key, num_ops, num_choices, magnitude, state, **options) ->
      Draws``.
    value: ``value(name, level, sign, h, w, **options)``: the op's parameter
      (degrees, shear, pixels, factor, threshold, bits, square side, ...).
    fill: the default value of pixels uncovered by geometric ops (and by the
      Cutout op), when ``rand_augment`` is given no ``fill``.
    finish: None, or ``finish(key, img, **options) -> img``, applied after
      the layers whatever ``num_ops`` (``'usb'``: its always-on Cutout).
    check_options: None, or ``check_options(**options)``, raising
      ValueError for a bad option value (called by :func:`check`).
    reads_magnitude: False for a policy that accepts M (in its range) but
      never reads it (``'usb'``); named in the range error.
  """
  name: str
  reference: str
  ops: tuple[str, ...]
  known_ops: tuple[str, ...]
  magnitude_range: tuple[float, float]
  integer_magnitude: bool
  options: Mapping[str, Any]
  draw: Callable[..., Draws]
  value: Callable[..., Any]
  fill: float = GRAY
  finish: Callable[..., Array] | None = None
  check_options: Callable[..., None] | None = None
  reads_magnitude: bool = True


# ---------------------------------------------------------------------------
# 'mpl': meta_pseudo_labels/augment.py (also UDA's RandAugment)

_MPL_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize",
            "Solarize", "Color", "Contrast", "Brightness", "Sharpness",
            "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout")


def _sign(key: Array) -> Array:
  return jnp.where(jax.random.bernoulli(key), 1.0, -1.0)


def _mpl_draw(key, num_ops, num_choices, magnitude, state, **options):
  del magnitude, state, options
  k_prob, k_layers = jax.random.split(key)
  # One probability per image, shared by its layers (`distort` draws `prob`
  # outside the layer loop); an op is applied when U(0, 1) <= prob.
  prob = jax.random.uniform(k_prob, (), minval=0.2, maxval=0.8)

  def layer(k):
    k_op, k_apply, k_sign, k_op_key = jax.random.split(k, 4)
    return Draws(op=jax.random.randint(k_op, (), 0, num_choices),
                 apply=jax.random.uniform(k_apply) <= prob,
                 sign=_sign(k_sign), level=None, key=k_op_key)

  return jax.vmap(layer)(jax.random.split(k_layers, num_ops))


def _trunc(x: Any) -> Array:
  # tf.cast(float -> int32) truncates toward zero (levels are >= 0).
  return jnp.floor(jnp.asarray(x, jnp.float32))


def _mpl_value(name, level, sign, h, w, *, translate_const=None,
               cutout_const=None):
  # The reference computes `tf.cast(level, float32) / 10 * multiplier`.
  lvl = jnp.asarray(level, jnp.float32) / jnp.float32(10.0)
  size = min(h, w)
  if name == "Rotate":
    return sign * lvl * 30.0
  if name in ("ShearX", "ShearY"):
    return sign * lvl * 0.3
  if name in ("TranslateX", "TranslateY"):
    const = size // 8 if translate_const is None else translate_const
    return sign * lvl * jnp.float32(const)
  if name in _ENHANCE:
    return lvl * 1.8 + 0.1
  if name == "Solarize":
    # `solarize` casts the int32 threshold to the uint8 image dtype: it wraps
    # modulo 256 (M = 10 -> 0, inverts all; M = 16 -> 409 % 256 = 153).
    return jnp.mod(_trunc(lvl * 256.0), 256.0)
  if name == "Posterize":
    # shift = uint8(8 - bits); TF's right_shift clamps shifts above 7 to 7,
    # so 0 bits (shift 8) and > 8 bits (negative shift, wrapped) keep 1 bit.
    bits = _trunc(lvl * 4.0)
    return jnp.where((bits >= 1) & (bits <= 8), bits, 1.0)
  if name == "SolarizeAdd":
    return _trunc(lvl * 110.0)
  if name == "Cutout":
    const = size // 8 if cutout_const is None else cutout_const
    return 2.0 * _trunc(lvl * jnp.float32(const))  # a (2 pad) x (2 pad) square
  return jnp.float32(0.0)  # no parameter


MPL = Policy(
    name="mpl",
    reference="google-research meta_pseudo_labels/augment.py RandAugment "
              "(UDA / MPL TF code)",
    ops=_MPL_OPS, known_ops=_MPL_OPS + ("Identity", "SolarizeAdd"),
    magnitude_range=(0.0, 30.0), integer_magnitude=False,
    options={"translate_const": None, "cutout_const": None},
    draw=_mpl_draw, value=_mpl_value)


# ---------------------------------------------------------------------------
# 'fixmatch': google-research/fixmatch libml/augment.py AugmentPoolRAMC

_FIXMATCH_OPS = ("Identity", "AutoContrast", "Equalize", "Rotate",
                 "Solarize", "Color", "Contrast", "Brightness", "Sharpness",
                 "ShearX", "TranslateX", "TranslateY", "Posterize", "ShearY")


def _fixmatch_draw(key, num_ops, num_choices, magnitude, state, **options):
  del state, options

  def layer(k):
    k_op, k_apply, k_sign, k_level, k_op_key = jax.random.split(k, 5)
    # `np.random.randint(1, magnitude)`: 1 .. M - 1.
    level = jax.random.randint(k_level, (), 1, int(magnitude))
    return Draws(op=jax.random.randint(k_op, (), 0, num_choices),
                 apply=jax.random.uniform(k_apply) < 0.5,
                 sign=_sign(k_sign), level=level.astype(jnp.float32),
                 key=k_op_key)

  return jax.vmap(layer)(jax.random.split(key, num_ops))


def _fixmatch_value(name, level, sign, h, w):
  del h, w
  lvl = jnp.asarray(level, jnp.float32)
  # PARAMETER_MAX = 10: int_parameter = int(l * maxval / 10),
  # float_parameter = l * maxval / 10.
  if name == "Rotate":
    return sign * _trunc(lvl * 30.0 / 10.0)
  if name in ("ShearX", "ShearY"):
    return sign * lvl * 0.3 / 10.0
  if name in ("TranslateX", "TranslateY"):
    return sign * _trunc(lvl * 10.0 / 10.0)  # pixels, whatever the size
  if name in _ENHANCE:
    return lvl * 1.8 / 10.0 + 0.1
  if name == "Solarize":
    return 256.0 - _trunc(lvl * 256.0 / 10.0)
  if name == "Posterize":
    return 4.0 - _trunc(lvl * 4.0 / 10.0)
  return jnp.float32(0.0)


FIXMATCH = Policy(
    name="fixmatch",
    reference="google-research/fixmatch libml/augment.py AugmentPoolRAMC "
              "(RandAugment with random magnitude, 'rac')",
    ops=_FIXMATCH_OPS, known_ops=_FIXMATCH_OPS + ("Invert",),
    magnitude_range=(2.0, 10.0), integer_magnitude=True, options={},
    draw=_fixmatch_draw, value=_fixmatch_value)


# ---------------------------------------------------------------------------
# 'legacy': this library's earlier RandAugment

_LEGACY_OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize",
               "Color", "Posterize", "Contrast", "Brightness", "Sharpness",
               "ShearX", "ShearY", "TranslateX", "TranslateY")


def _legacy_draw(key, num_ops, num_choices, magnitude, state, *,
                 apply_prob=1.0, **options):
  del magnitude, state, options

  def layer(k):
    k_op, k_sign, k_apply = jax.random.split(k, 3)
    apply = (jax.random.bernoulli(k_apply, apply_prob) if apply_prob < 1.0
             else jnp.bool_(True))
    return Draws(op=jax.random.randint(k_op, (), 0, num_choices),
                 apply=apply, sign=_sign(k_sign), level=None,
                 key=jax.random.fold_in(k, 3))

  return jax.vmap(layer)(jax.random.split(key, num_ops))


def _legacy_value(name, level, sign, h, w, *, max_magnitude=10.0,
                  translate_frac=0.3, apply_prob=1.0):
  del apply_prob
  m = float(level) / float(max_magnitude)
  if name == "Rotate":
    return sign * 30.0 * m
  if name in ("ShearX", "ShearY"):
    return sign * 0.3 * m
  if name == "TranslateX":
    return sign * translate_frac * m * w
  if name == "TranslateY":
    return sign * translate_frac * m * h
  if name in _ENHANCE:
    return jnp.maximum(1.0 + sign * 0.9 * m, 0.0)
  if name == "Solarize":
    return jnp.float32(min(max(256.0 * (1.0 - m), 0.0), 256.0))
  if name == "Posterize":
    return jnp.float32(min(max(8 - int(4 * m), 1), 8))
  return jnp.float32(0.0)


LEGACY = Policy(
    name="legacy",
    reference="r2d2_jax before the named policies (no paper's code)",
    ops=_LEGACY_OPS, known_ops=_LEGACY_OPS + ("Invert",),
    magnitude_range=(0.0, float("inf")), integer_magnitude=False,
    options={"max_magnitude": 10.0, "translate_frac": 0.3, "apply_prob": 1.0},
    draw=_legacy_draw, value=_legacy_value)


# ---------------------------------------------------------------------------
# 'usb': microsoft/Semi-supervised-learning (USB) semilearn/datasets/
# augmentation/randaugment.py RandAugment

_USB_RANGES: dict[str, tuple[float, float]] = {  # `augment_list()`
    "AutoContrast": (0.0, 1.0), "Brightness": (0.05, 0.95),
    "Color": (0.05, 0.95), "Contrast": (0.05, 0.95), "Equalize": (0.0, 1.0),
    "Identity": (0.0, 1.0), "Posterize": (4.0, 8.0), "Rotate": (-30.0, 30.0),
    "Sharpness": (0.05, 0.95), "ShearX": (-0.3, 0.3), "ShearY": (-0.3, 0.3),
    "Solarize": (0.0, 256.0), "TranslateX": (-0.3, 0.3),
    "TranslateY": (-0.3, 0.3)}
_USB_OPS = tuple(_USB_RANGES)
USB_CUTOUT_FILL: tuple[int, int, int] = (125, 123, 114)
"""``CutoutAbs``'s colour in USB (an RGB mean of CIFAR-like images)."""


def _usb_draw(key, num_ops, num_choices, magnitude, state, **options):
  del magnitude, state, options

  def layer(k):
    k_op, k_value, k_op_key = jax.random.split(k, 3)
    # `random.choices(augment_list, k=n)`: uniform, with replacement; the
    # level is `random.random()`, the op's value `min + (max - min) * level`
    # (see `_usb_value`): the sign is in the value, every op is applied.
    return Draws(op=jax.random.randint(k_op, (), 0, num_choices),
                 apply=jnp.bool_(True), sign=jnp.float32(1.0),
                 level=jax.random.uniform(k_value), key=k_op_key)

  return jax.vmap(layer)(jax.random.split(key, num_ops))


def _usb_value(name, level, sign, h, w, **options):
  del sign, options
  lo, hi = _USB_RANGES.get(name, (0.0, 1.0))
  v = jnp.float32(lo) + jnp.float32(hi - lo) * jnp.asarray(level, jnp.float32)
  if name in ("Rotate", "ShearX", "ShearY", "Solarize") or name in _ENHANCE:
    return v  # degrees (PIL: counter-clockwise), shear, threshold, factor
  if name == "TranslateX":
    return v * jnp.float32(w)  # `v * img.size[0]` pixels
  if name == "TranslateY":
    return v * jnp.float32(h)  # `v * img.size[1]` pixels
  if name == "Posterize":
    return jnp.maximum(jnp.floor(v), 1.0)  # `max(1, int(v))` bits
  return jnp.float32(0.0)  # AutoContrast, Equalize, Identity, Invert


def _usb_fill(fill: Any, channels: int) -> Array:
  """The cutout colour for a ``channels``-channel image."""
  f = jnp.asarray(fill, jnp.float32).reshape(-1)
  if f.size == 1:
    return f
  if channels == 1:  # PIL's convert('L') of the colour (123 for USB's)
    wr, wg, wb = ops_lib._LUMA_FIXED  # pylint: disable=protected-access
    return jnp.floor((wr * f[0:1] + wg * f[1:2] + wb * f[2:3] + 32768.0)
                     / 65536.0)
  return f


def _usb_finish(key, img, *, cutout_frac=0.5, cutout_fill=USB_CUTOUT_FILL):
  """USB's always-on ``Cutout(img, random.random() * 0.5)``.

  ``v = U * cutout_frac * W`` pixels; ``CutoutAbs`` draws ``x0 =
  np.random.uniform(W)``, which is numpy's ``uniform(low=W, high=1.0)``,
  i.e. uniform on (1, W] (likewise y0 on (1, H]), and fills the box of
  :func:`image_ops.cutout_abs` (side ``int(v) + 1`` before clipping).
  """
  h, w, c = img.shape
  if cutout_frac <= 0:
    return img
  k_v, k_x, k_y = jax.random.split(key, 3)
  v = jax.random.uniform(k_v) * jnp.float32(cutout_frac) * jnp.float32(w)
  x0 = jnp.float32(w) - jnp.float32(w - 1) * jax.random.uniform(k_x)
  y0 = jnp.float32(h) - jnp.float32(h - 1) * jax.random.uniform(k_y)
  return ops_lib.cutout_abs(img, x0, y0, v, _usb_fill(cutout_fill, c))


def _usb_check_options(*, cutout_frac=0.5, cutout_fill=USB_CUTOUT_FILL):
  if not 0.0 <= float(cutout_frac) <= 0.5:
    raise ValueError(f"policy 'usb' option cutout_frac={cutout_frac} is "
                     "outside [0, 0.5] (USB's Cutout asserts v <= 0.5; 0 "
                     "disables the cutout)")
  fill = np.asarray(cutout_fill, np.float64).reshape(-1)
  if fill.size not in (1, 3) or not np.all((fill >= 0) & (fill <= 255)):
    raise ValueError(f"policy 'usb' option cutout_fill={cutout_fill!r} must "
                     "be one value or 3 (RGB) values in [0, 255]")


USB = Policy(
    name="usb",
    reference="microsoft/Semi-supervised-learning (USB) semilearn/datasets/"
              "augmentation/randaugment.py RandAugment",
    ops=_USB_OPS, known_ops=_USB_OPS + ("Invert",),
    magnitude_range=(0.0, 30.0), integer_magnitude=False,
    options={"cutout_frac": 0.5, "cutout_fill": USB_CUTOUT_FILL},
    draw=_usb_draw, value=_usb_value, fill=0.0, finish=_usb_finish,
    check_options=_usb_check_options, reads_magnitude=False)


POLICIES: dict[str, Policy] = {
    p.name: p for p in (MPL, FIXMATCH, LEGACY, USB)}
"""Every policy by name."""

DEFAULT_POLICY = "mpl"
"""The policy of a strong view that names none (``configs/common.py`` too)."""


# ---------------------------------------------------------------------------
# Checking a policy's arguments


def get_policy(name: str) -> Policy:
  """The policy called ``name``; a ValueError lists the known ones."""
  if name not in POLICIES:
    raise ValueError(f"unknown RandAugment policy {name!r}; known: "
                     f"{tuple(POLICIES)}")
  return POLICIES[name]


def check(policy: str, magnitude: float, ops: Sequence[str] | None = None,
          **options: Any) -> tuple[Policy, tuple[str, ...], dict[str, Any]]:
  """Validates a policy's arguments (static; raises with the valid choices).

  Args:
    policy: policy name.
    magnitude: RandAugment M.
    ops: op list, or None for the policy's own.
    **options: the policy's extra options.

  Returns:
    ``(policy, ops, options)`` with the options' defaults filled in.

  Raises:
    ValueError: unknown policy or op, or a magnitude outside the policy's
      range (or not an integer where the policy needs one).
    TypeError: an option the policy does not take.
  """
  pol = get_policy(policy)
  lo, hi = pol.magnitude_range
  if not lo <= float(magnitude) <= hi:
    unread = ("" if pol.reads_magnitude else
              f" (policy {pol.name!r} does not read the magnitude: any value "
              "in the range gives the same views)")
    raise ValueError(f"magnitude {magnitude} is outside policy {pol.name!r}'s "
                     f"range [{lo:g}, {hi:g}]{unread}")
  if pol.integer_magnitude and float(magnitude) != int(magnitude):
    raise ValueError(f"policy {pol.name!r} needs an integer magnitude (levels "
                     f"are drawn from 1..M-1), got {magnitude}")
  ops = pol.ops if ops is None else tuple(ops)
  for name in ops:
    if name not in pol.known_ops:
      raise ValueError(f"unknown RandAugment op {name!r} for policy "
                       f"{pol.name!r}; known: {pol.known_ops}")
  unknown = set(options) - set(pol.options)
  if unknown:
    raise TypeError(f"policy {pol.name!r} takes no option(s) "
                    f"{sorted(unknown)}; its options: {tuple(pol.options)}")
  options = {**pol.options, **options}
  if pol.check_options is not None:
    pol.check_options(**options)
  return pol, ops, options


# ---------------------------------------------------------------------------
# Applying ops


def geometric_matrix(name: str, value: Any, h: int, w: int) -> Array:
  """The 2x3 inverse map of a geometric op with parameter ``value``."""
  if name == "Rotate":
    return ops_lib.rotation_matrix(value, h, w)
  if name == "ShearX":
    return ops_lib.shear_x_matrix(value)
  if name == "ShearY":
    return ops_lib.shear_y_matrix(value)
  if name == "TranslateX":
    return ops_lib.translate_matrix(value, 0.0)
  if name == "TranslateY":
    return ops_lib.translate_matrix(0.0, value)
  raise ValueError(f"{name!r} is not a geometric op")


def apply_op(img: Array, name: str, value: Any = 0.0,
             key: Array | None = None, fill: float = GRAY) -> Array:
  """Applies op ``name`` with its parameter ``value`` (a policy's ``value``).

  Args:
    img: ``[H, W, C]`` integer-valued image in [0, 255].
    name: op name.
    value: degrees (Rotate), shear factor, pixels (Translate: content moves
      left / up for positive values), enhancement factor, Solarize threshold,
      Posterize bits kept, SolarizeAdd addition, or Cutout square side;
      unused by AutoContrast, Equalize, Invert, Identity.
    key: PRNG key of Cutout's position (uniform over all pixels).
    fill: value of pixels uncovered by geometric ops and Cutout.

  Returns:
    ``[H, W, C]`` float32 integer-valued image in [0, 255].
  """
  img = jnp.asarray(img, jnp.float32)
  h, w, _ = img.shape
  if name in GEOMETRIC_OPS:
    return ops_lib.affine_nearest(img, geometric_matrix(name, value, h, w),
                                  fill)
  if name in _ENHANCE:
    return _ENHANCE[name](img, value)
  if name == "Identity":
    return img
  if name == "Invert":
    return ops_lib.invert(img)
  if name == "AutoContrast":
    return ops_lib.auto_contrast(img)
  if name == "Equalize":
    return ops_lib.equalize(img)
  if name == "Solarize":
    return ops_lib.solarize(img, value)
  if name == "SolarizeAdd":
    return ops_lib.solarize_add(img, value)
  if name == "Posterize":
    return ops_lib.posterize(img, jnp.asarray(value, jnp.int32))
  if name == "Cutout":
    if key is None:
      raise ValueError("Cutout needs a key for its position")
    ky, kx = jax.random.split(key)
    cy = jax.random.randint(ky, (), 0, h)
    cx = jax.random.randint(kx, (), 0, w)
    return ops_lib.cutout_at(img, cy, cx, jnp.asarray(value, jnp.int32), fill)
  raise ValueError(f"unknown RandAugment op {name!r}")


def _layer(img: Array, draw: Draws, level: Any, ops: tuple[str, ...],
           value: Callable[..., Any], fill: float) -> Array:
  """One layer: ``apply_op(img, ops[draw.op], value(...))`` if ``draw.apply``.

  Under ``vmap`` every switch branch is computed, so all geometric ops share
  ONE branch: their 2x3 matrices are selected by a (cheap, scalar) inner
  switch and the image is resampled once instead of once per geometric op.
  """
  h, w, _ = img.shape
  geo = [name for name in ops if name in GEOMETRIC_OPS]
  other = [name for name in ops if name not in GEOMETRIC_OPS]

  def param(name):
    return value(name, level, draw.sign, h, w)

  branches: list[Callable[[Array], Array]] = [
      (lambda x, _n=name: apply_op(x, _n, param(_n), draw.key, fill))
      for name in other]
  branches.append(lambda x: x)  # not applied
  if geo:
    matrices = [(lambda _n=name: geometric_matrix(_n, param(_n), h, w))
                for name in geo]
    geo_of = jnp.asarray([geo.index(n) if n in geo else 0 for n in ops] + [0],
                         jnp.int32)

    def geometric(x: Array) -> Array:
      g = geo_of[op_index]
      mat = jax.lax.switch(g, matrices) if len(geo) > 1 else matrices[0]()
      return ops_lib.affine_nearest(x, mat, fill)

    branches.append(geometric)
  # Static table: op index -> switch branch; len(ops) is "not applied".
  branch_of = jnp.asarray(
      [len(other) + 1 if n in GEOMETRIC_OPS else other.index(n) for n in ops]
      + [len(other)], jnp.int32)
  op_index = jnp.where(draw.apply, draw.op, len(ops))
  return jax.lax.switch(branch_of[op_index], branches, img)


def rand_augment(key: Array, img: Array, *, num_ops: int, magnitude: float,
                 policy: str = DEFAULT_POLICY,
                 ops: Sequence[str] | None = None, state: Any = None,
                 fill: float | None = None, **options: Any) -> Array:
  """RandAugment (Cubuk et al. 2020) as one of the named policies.

  Each of the ``num_ops`` layers draws an op (uniformly, with replacement),
  whether to apply it and, for the policy's signed ops, a sign, all from
  ``key``; a policy with a ``finish`` (``'usb'``'s cutout) then applies it.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image on the 0..255 scale (rounded to integers).
    num_ops: number of layers (N in the paper).
    magnitude: M, on the policy's scale (module docstring).
    policy: ``'mpl'``, ``'fixmatch'``, ``'legacy'`` or ``'usb'``.
    ops: op list to draw from; None: the policy's (its reference's) list.
    state: optional pytree the policy may read (e.g. CTAugment's bin
      weights); the current policies ignore it.
    fill: value of pixels uncovered by geometric ops and the Cutout op;
      None: the policy's (gray 128; black 0 for ``'usb'``, PIL's default).
    **options: the policy's options: ``'mpl'``: ``translate_const`` and
      ``cutout_const`` in pixels at L = 1 (None: ``min(H, W) // 8``, MPL's
      CIFAR call; its ImageNet call uses the class defaults 100 and 40);
      ``'legacy'``: ``max_magnitude`` (10), ``translate_frac`` (0.3),
      ``apply_prob`` (1); ``'usb'``: ``cutout_frac`` (0.5: the final
      cutout's side is up to half the width; 0 disables it) and
      ``cutout_fill`` (USB's RGB (125, 123, 114)).

  Returns:
    ``[H, W, C]`` float32 integer-valued image in [0, 255].
  """
  pol, ops, options = check(policy, magnitude, ops, **options)
  fill = pol.fill if fill is None else fill
  img = jnp.asarray(img, jnp.float32)
  if img.ndim != 3:
    raise ValueError(f"expected one image [H, W, C], got shape {img.shape}")
  img = jnp.clip(jnp.round(img), 0.0, 255.0)  # the references' uint8
  # A policy without `finish` draws its layers from `key` itself.
  k_layers, k_finish = ((key, None) if pol.finish is None
                        else jax.random.split(key))
  if num_ops > 0 and ops:
    draws = pol.draw(k_layers, num_ops, len(ops), magnitude, state, **options)
    value = lambda *a: pol.value(*a, **options)

    def layer(x: Array, draw: Draws) -> tuple[Array, None]:
      level = magnitude if draw.level is None else draw.level
      return _layer(x, draw, level, ops, value, fill), None

    # A scan (not a Python loop): the layer is compiled once, and XLA cannot
    # fuse one layer's select-of-all-branches into the next layer's ops
    # (which made it recompute them; ~20% slower on CPU).
    img, _ = jax.lax.scan(layer, img, draws)
  if pol.finish is not None:
    img = pol.finish(k_finish, img, **options)
  return img
