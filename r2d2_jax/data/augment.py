"""On-device image augmentations: weak and strong views of a batch.

Every public augmentation is a pure function ``fn(key, img, **static) -> img``
of ONE image ``img[H, W, C]`` (C = 1 or 3, any H x W).  Batches are handled by
``jax.vmap`` (see :func:`augment_batch`), and every example gets its own key
from :func:`example_keys`, i.e. ``fold_in(fold_in(seed_key, step), index)``.
The augmented batch at step ``k`` is therefore a pure function of
``(seed, step, example index)`` and does not depend on the batch composition,
the device count or the sharding (bit-identical on one backend; a different
backend may round a rare pixel differently by one gray level).

* Inputs may be any dtype (normally ``uint8``) on the 0..255 scale; outputs
  are ``float32`` on the 0..255 scale.  Normalisation happens elsewhere.
* Flip, translate and cutout keep integer-valued inputs integer-valued.
* The strong view's RandAugment is one of the named policies of
  :mod:`r2d2_jax.data.randaugment` (``'mpl'``, ``'fixmatch'``, ``'legacy'``),
  its ops those of :mod:`r2d2_jax.data.image_ops` (re-exported here).
* A view may read an augmentation ``state`` pytree (e.g. CTAugment's bin
  weights) that the trainer passes to :func:`make_views`; no current policy
  reads it.
* Pixels exposed by translation with ``pad_mode='constant'``, geometric ops
  and cutout are gray (:data:`GRAY` = 128, the ``replace`` value of the TF
  references).
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from r2d2_jax.data import randaugment
# The ops, re-exported: `augment.solarize`, `augment.GRAY`, ...
from r2d2_jax.data.image_ops import (  # pylint: disable=unused-import
    GRAY, _as_float, auto_contrast, brightness, color, contrast, cutout_at,
    equalize, identity, invert, posterize, rotate, sharpness, shear_x,
    shear_y, solarize, solarize_add, translate_x, translate_y)
from r2d2_jax.data.randaugment import (  # pylint: disable=unused-import
    DEFAULT_POLICY, GEOMETRIC_OPS, POLICIES, apply_op, rand_augment)

Array = jax.Array
AugmentFn = Callable[[Array, Array], Array]

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
         pad_mode: str = "reflect", cutout: int = 0,
         pad_fill: float = GRAY) -> Array:
  """Weak view: random horizontal flip, random translation, optional cutout.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    flip: whether to flip left/right with probability 0.5.
    translate: maximum translation in pixels (pad-and-crop; 0 disables).
    pad_mode: border mode of the translation.
    cutout: side of a cutout square (0 disables), e.g. R2-D2's supervised
      stage "translate 4 + flip + cutout 16".
    pad_fill: the border value of ``pad_mode='constant'``, on the 0..255 scale
      (gray by default; 0 is torchvision's ``RandomCrop(32, padding=4)``, which
      pads the uint8 image with black before normalising: SemiMeta).

  Returns:
    ``[H, W, C]`` float32 image.
  """
  k_flip, k_translate = jax.random.split(key)
  out = _as_float(img)
  if flip:
    out = flip_lr(k_flip, out)
  if translate > 0:
    out = _translate(k_translate, out, translate, mode=pad_mode, fill=pad_fill)
  if cutout > 0:
    out = _cutout(jax.random.fold_in(key, 2), out, cutout)
  return out


_translate = translate  # `weak` / `strong` shadow the name with an argument.

def strong(key: Array, img: Array, *, flip: bool = True, translate: int = 0,
           pad_mode: str = "reflect", policy: str = DEFAULT_POLICY,
           num_ops: int = 2, magnitude: float = 10.0, cutout: int = 0,
           weak_after: bool = False, state: Any = None,
           **policy_options: Any) -> Array:
  """Strong view: weak, then a RandAugment policy, then cutout.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    flip: random horizontal flip.
    translate: maximum pad-and-crop translation in pixels.
    pad_mode: border mode of the translation ('constant' pads gray, as
      MPL's CIFAR code does; 'reflect' as FixMatch's).
    policy: RandAugment policy name (:data:`POLICIES`).
    num_ops: RandAugment N.
    magnitude: RandAugment M on the policy's scale.
    cutout: side of the final cutout square in pixels (0 disables; MPL's
      CIFAR code: 16, i.e. ``pad_size = 32 // 4``; FixMatch: 16).
    weak_after: flip and translate once more after the cutout, as MPL's
      CIFAR code does (`_flip_and_jitter` on both sides of RandAugment).
    state: optional augmentation state for the policy (see
      :func:`make_views`).
    **policy_options: forwarded to :func:`randaugment.rand_augment` (``ops``,
      ``fill`` and the policy's own options).

  Returns:
    ``[H, W, C]`` float32 image in [0, 255].
  """
  k_weak, k_ra, k_cut = jax.random.split(key, 3)
  out = weak(k_weak, img, flip=flip, translate=translate, pad_mode=pad_mode)
  out = rand_augment(k_ra, out, num_ops=num_ops, magnitude=magnitude,
                     policy=policy, state=state, **policy_options)
  if cutout > 0:
    out = _cutout(k_cut, out, cutout, fill=policy_options.get("fill", GRAY))
  if weak_after:
    out = weak(jax.random.fold_in(key, 3), out, flip=flip,
               translate=translate, pad_mode=pad_mode)
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


def view_fn(spec: Mapping[str, Any], state: Any = None) -> AugmentFn:
  """Turns a view description into a per-image ``fn(key, img) -> img``.

  A strong or RandAugment view's policy, magnitude, ops and options are
  checked here (a ValueError lists the valid choices), not at the first
  traced step.

  Args:
    spec: a dict / ``ConfigDict`` with ``kind`` in {'none', 'weak',
      'strong', 'rand_augment'} and that function's keyword arguments,
      e.g. ``dict(kind='strong', flip=True, translate=4, policy='mpl',
      num_ops=2, magnitude=16, cutout=16)``.
    state: optional augmentation state (a pytree, may be traced) handed to
      the policy of a strong / RandAugment view; ignored by the others.

  Returns:
    The per-image augmentation with the hyper-parameters bound (static).
  """
  spec = dict(spec.items())
  kind = spec.pop("kind", None)
  if kind not in _KINDS:
    raise ValueError(f"unknown view kind {kind!r}; known: {tuple(_KINDS)}")
  if spec.get("ops") is not None:
    spec["ops"] = tuple(spec["ops"])
  fn = _KINDS[kind]
  if kind == "none":
    if spec:
      raise TypeError(f"view kind 'none' takes no arguments, got {spec}")
    return fn
  if kind in ("strong", "rand_augment"):
    not_options = ("flip", "translate", "pad_mode", "cutout", "weak_after",
                   "num_ops", "fill", "policy", "magnitude", "ops")
    randaugment.check(spec.get("policy", DEFAULT_POLICY),
                      spec.get("magnitude", 10.0), spec.get("ops"),
                      **{k: v for k, v in spec.items() if k not in not_options})
    spec["state"] = state

  def augment_one(key: Array, img: Array) -> Array:
    return fn(key, img, **spec)

  return augment_one


def make_views(key: Array, step: Any, images: Array, indices: Any,
               views: Mapping[str, Mapping[str, Any]],
               state: Any = None) -> dict[str, Array]:
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
    state: optional augmentation state, the same for every example (e.g.
      CTAugment's bin weights, from the train state); passed to each strong
      view's policy.  None (the default) for policies that read none.

  Returns:
    ``{name: [B, H, W, C] float32}`` with the same keys as ``views``.
  """
  base = example_keys(key, step, indices)
  out = {}
  for name, spec in views.items():
    fn = view_fn(spec, state)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, view_id(name))
    out[name] = jax.vmap(fn)(keys, images)
  return out
