"""On-device image augmentations: weak and strong views of a batch.

Every public augmentation is a pure function ``fn(key, img, **static) -> img``
of ONE image ``img[H, W, C]`` (C = 1 or 3, any H x W).  Batches are handled by
``jax.vmap`` (see :func:`augment_batch`), and every example gets its own key
from :func:`example_keys`, i.e. ``fold_in(fold_in(seed_key, step), index)``.
The augmented batch at step ``k`` is therefore a pure function of
``(seed, step, example index)`` (and of the augmentation state, below) and
does not depend on the batch composition, the device count or the sharding
(bit-identical on one backend; a different backend may round a rare pixel
differently by one gray level).

* Inputs may be any dtype (normally ``uint8``) on the 0..255 scale; outputs
  are ``float32`` on the 0..255 scale.  Normalisation happens elsewhere.
* Flip, translate and cutout keep integer-valued inputs integer-valued.
* The strong view's RandAugment is one of the named policies of
  :mod:`r2d2_jax.data.randaugment` (``'mpl'``, ``'fixmatch'``, ``'legacy'``),
  its ops those of :mod:`r2d2_jax.data.image_ops` (re-exported here), or the
  stateful policy ``'ctaugment'`` (:mod:`r2d2_jax.data.ctaugment`).
* Pixels exposed by translation with ``pad_mode='constant'``, geometric ops
  and cutout are gray (:data:`GRAY` = 128, the ``replace`` value of the TF
  references); CTAugment's own ops follow its reference (black for the
  geometric ops, 127 for cutout).

Stateful augmentations (docs/algorithms.md, "Stateful augmentations")
---------------------------------------------------------------------
An augmentation that reads and learns a state (CTAugment's bin weights) is a
policy listed in :data:`STATEFUL_POLICIES` (name -> module) whose module has

  ``NAME``                   the policy name, also the key of its entry in the
                             augmentation state;
  ``init_state() -> pytree`` its initial state;
  ``hparams_from(spec)``     its settings from the strong view's spec
                             (``config.data.augment.strong``), validated
                             (errors name the field);
  ``augment(key, img, state, **settings) -> img``
                             the strong view's draw, reading ``state``;
  ``probe(key, img, **settings) -> (img, aux)``
                             a draw whose outcome (``aux``, a pytree of
                             arrays) the method learns from.
The contract between the pieces:
  1. the METHOD keeps ``{NAME: init_state()}`` in its train state (FixMatch:
     ``FixMatchState.augment``) and returns it from ``Method.augment_state``;
  2. the TRAINER calls ``prepare_batch(..., augment_state=
     method.augment_state(state))`` inside the jitted step; every strong view
     of a stateful policy reads ``augment_state[NAME]`` (the state BEFORE the
     step's update, the same for every example);
  3. a view named ``'probe'`` in ``Method.views`` is the probe draw of the
     strong policy, applied after the weak view's flip / translate; a view fn
     may return ``(image, aux)``: ``make_views`` / ``prepare_batch`` hand
     ``aux`` to the step as ``batch[stream]['<view>_aux']`` (unnormalised);
  4. the METHOD's step learns the new state from the aux and its network
     (CTAugment: ``ctaugment.proximity`` of the EVAL network's prediction on
     the probe, then ``ctaugment.update``), and writes it back to its state,
     so it is checkpointed and resumed with the rest of the state.
``views.view_specs`` refuses (``R2D2Error`` naming
``config.data.augment.strong.policy``) a stateful policy for a method whose
``augment_state`` has no entry for it, or that has no strong view.
"""

from __future__ import annotations

import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from r2d2_jax.data import ctaugment
from r2d2_jax.data import randaugment
# The ops, re-exported: `augment.solarize`, `augment.GRAY`, ...
from r2d2_jax.data.image_ops import (  # pylint: disable=unused-import
    GRAY, _as_float, auto_contrast, brightness, color, contrast, cutout_at,
    equalize, identity, invert, posterize, rotate, sharpness, shear_x,
    shear_y, solarize, solarize_add, translate_x, translate_y)
from r2d2_jax.data.randaugment import (  # pylint: disable=unused-import
    DEFAULT_POLICY, GEOMETRIC_OPS, POLICIES, apply_op, rand_augment)

Array = jax.Array
AugmentFn = Callable[[Array, Array], Any]

STATEFUL_POLICIES: dict[str, Any] = {ctaugment.NAME: ctaugment}
"""The strong-view policies that read a learned state (module docstring)."""

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
  if policy in STATEFUL_POLICIES:
    out, fill = _stateful_strong(k_ra, out, policy, num_ops, state,
                                 policy_options)
  else:
    out = rand_augment(k_ra, out, num_ops=num_ops, magnitude=magnitude,
                       policy=policy, state=state, **policy_options)
    fill = policy_options.get("fill", GRAY)
  if cutout > 0:
    out = _cutout(k_cut, out, cutout, fill=fill)
  if weak_after:
    out = weak(jax.random.fold_in(key, 3), out, flip=flip,
               translate=translate, pad_mode=pad_mode)
  return out


def _stateful_strong(key: Array, img: Array, policy: str, num_ops: int,
                     state: Any, options: Mapping[str, Any]
                     ) -> tuple[Array, float]:
  """A stateful policy's strong draw; returns (image, the cutout fill)."""
  module = STATEFUL_POLICIES[policy]
  hp = module.hparams_from(dict(options, num_ops=num_ops))
  if state is None or module.NAME not in state:
    raise ValueError(
        f"policy {policy!r} reads its learned state from the augmentation "
        f"state (entry {module.NAME!r}), which the method does not provide "
        "(Method.augment_state); see docs/algorithms.md, 'Stateful "
        "augmentations'")
  out = module.augment(key, img, state[module.NAME], num_ops=hp.num_ops,
                       threshold=hp.threshold, decay=hp.decay, ops=hp.ops)
  # The reference's final cutout (level 1) is gray 127, not 128.
  return out, options.get("fill", module.CUTOUT_FILL)


def probe(key: Array, img: Array, *, policy: str = ctaugment.NAME,
          num_ops: int = 2, ops: Any = None, state: Any = None,
          **weak_kwargs: Any) -> tuple[Array, Any]:
  """The probe view of a stateful policy: weak, then the policy's probe draw.

  Args:
    key: PRNG key.
    img: ``[H, W, C]`` image.
    policy: a stateful policy (:data:`STATEFUL_POLICIES`).
    num_ops: its number of layers.
    ops: its op subset (None: all).
    state: unused (the probe draw reads no state).
    **weak_kwargs: :func:`weak`'s arguments (flip, translate, ...).

  Returns:
    (``[H, W, C]`` float32 image, the draws: the policy's aux pytree).
  """
  del state
  out = weak(jax.random.fold_in(key, 0), img, **weak_kwargs)
  return STATEFUL_POLICIES[policy].probe(jax.random.fold_in(key, 1), out,
                                         num_ops=num_ops, ops=ops)


# --------------------------------------------------------------------------
# Views
# --------------------------------------------------------------------------


def no_augment(key: Array, img: Array) -> Array:
  """No augmentation: the image as float32 (``key`` is ignored)."""
  del key
  return _as_float(img)


_KINDS: dict[str, Callable[..., Array]] = {
    "none": no_augment, "weak": weak, "strong": strong,
    "rand_augment": rand_augment, "probe": probe,
}


def view_fn(spec: Mapping[str, Any], state: Any = None) -> AugmentFn:
  """Turns a view description into a per-image ``fn(key, img) -> img``.

  A strong or RandAugment view's policy, magnitude, ops and options are
  checked here (a ValueError lists the valid choices), not at the first
  traced step.

  Args:
    spec: a dict / ``ConfigDict`` with ``kind`` in {'none', 'weak',
      'strong', 'rand_augment', 'probe'} and that function's keyword
      arguments,
      e.g. ``dict(kind='strong', flip=True, translate=4, policy='mpl',
      num_ops=2, magnitude=16, cutout=16)``.
    state: optional augmentation state (a pytree, may be traced) handed to
      the policy of a strong / RandAugment view; ignored by the others.

  Returns:
    The per-image augmentation with the hyper-parameters bound (static);
    a 'probe' view's returns ``(image, aux)``.
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
  policy = spec.get("policy", DEFAULT_POLICY)
  if kind == "probe":
    if policy not in STATEFUL_POLICIES:
      raise ValueError(f"a probe view needs a stateful policy "
                       f"{tuple(STATEFUL_POLICIES)}, got {policy!r}")
    spec["state"] = state
  elif kind == "strong" and policy in STATEFUL_POLICIES:
    # Handled before randaugment.check, which knows the stateless policies.
    STATEFUL_POLICIES[policy].hparams_from(spec)
    spec["state"] = state
  elif kind in ("strong", "rand_augment"):
    not_options = ("flip", "translate", "pad_mode", "cutout", "weak_after",
                   "num_ops", "fill", "policy", "magnitude", "ops")
    randaugment.check(policy,
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
    ``{name: [B, H, W, C] float32}`` with the same keys as ``views``, and
    ``'<name>_aux'``: the side information (a pytree of ``[B, ...]``
    arrays) of each view whose fn returns ``(image, aux)`` (a probe view's
    draws).
  """
  base = example_keys(key, step, indices)
  out = {}
  for name, spec in views.items():
    fn = view_fn(spec, state)
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(base, view_id(name))
    result = jax.vmap(fn)(keys, images)
    if isinstance(result, tuple):
      out[name], out[f"{name}_aux"] = result
    else:
      out[name] = result
  return out
