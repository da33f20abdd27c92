"""The views a method's step reads, and normalisation: batch → step inputs, in jit.

`view_specs` turns a method's view names into augmentation specs (checked when
the stage is built); `prepare_batch` augments (on device, from (seed, step,
index)) and normalises each stream's views; `normalize` maps uint8 images to the
network's inputs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from r2d2_jax.data import augment
from r2d2_jax.data import sources
from r2d2_jax.errors import R2D2Error

PyTree = Any


_UNCHECKED = object()


def view_specs(views: dict[str, tuple[str, ...]],
               augment_config: ml_collections.ConfigDict,
               info: sources.DatasetInfo, *,
               augment_state: Any = _UNCHECKED,
               method: str | None = None) -> dict[str, dict[str, dict]]:
  """Turns a method's view names into augmentation specs.

  A view called 'weak', 'weak_1', ... is a weak view; 'strong', 'strong_1', ...
  strong; 'plain' is unaugmented; 'probe' is the probe draw of a stateful
  strong policy (CTAugment: weak, then ops at uniformly drawn values; its
  fn returns (image, draws), the draws reach the step as
  `batch[stream]['probe_aux']`). Their hyper-parameters come from
  `config.data.augment.{weak,strong}` (a probe: the weak block, and the
  strong block's policy, num_ops and ops); `flip` defaults to whether the
  dataset allows flips. Each spec is checked here (an unknown RandAugment
  policy, op or out-of-range magnitude raises, listing the valid ones), not
  at the first traced step.

  Args:
    views: `Method.views(hp)`.
    augment_config: `config.data.augment`.
    info: the dataset's facts.
    augment_state: `Method.augment_state` of the (abstract) initial state;
      when given, a stateful strong policy (`augment.STATEFUL_POLICIES`,
      e.g. 'ctaugment') is refused unless it has its entry there and the
      method has a strong view.
    method: the method's name, for that error.
  """
  strong_block = dict(augment_config.get("strong", {}))
  policy = strong_block.get("policy", augment.DEFAULT_POLICY)
  out = {}
  for stream, names in views.items():
    out[stream] = {}
    for name in names:
      kind = name.split("_")[0]
      if kind == "plain":
        out[stream][name] = {"kind": "none"}
        continue
      if kind not in ("weak", "strong", "probe"):
        raise R2D2Error(f"Unknown view {name!r}: views are weak[_k], "
                        "strong[_k], probe or plain.")
      spec = dict(augment_config.get("weak", {}))
      if kind == "strong":
        spec.update(strong_block)
      elif kind == "probe":
        spec.update({k: strong_block[k] for k in ("num_ops", "ops")
                     if strong_block.get(k) is not None}, policy=policy)
      if spec.get("flip") is None:
        spec["flip"] = info.flip
      out[stream][name] = {"kind": kind, **spec}
      try:
        augment.view_fn(out[stream][name])
      except (ValueError, TypeError) as e:
        raise R2D2Error(f"config.data.augment, view {name!r}: {e}") from e
  if augment_state is not _UNCHECKED and policy in augment.STATEFUL_POLICIES:
    _check_stateful(policy, out, augment_state, method)
  return out


def _check_stateful(policy: str, specs: dict[str, dict[str, dict]],
                    augment_state: Any, method: str | None) -> None:
  """A stateful policy needs its state from the method, and a strong view."""
  who = f"method {method!r}" if method else "this method"
  has_strong = any(spec.get("kind") == "strong"
                   for views in specs.values() for spec in views.values())
  if not has_strong:
    raise R2D2Error(
        f"config.data.augment.strong.policy={policy!r}, but {who} has no "
        "strong view: nothing would use it. Remove the setting (or use a "
        "method with a strong view).")
  name = augment.STATEFUL_POLICIES[policy].NAME
  if not isinstance(augment_state, dict) or name not in augment_state:
    stateless = tuple(augment.POLICIES)
    raise R2D2Error(
        f"config.data.augment.strong.policy={policy!r} learns its state "
        f"during training, but {who} does not learn an augmentation state "
        f"(its Method.augment_state has no {name!r} entry; "
        "docs/algorithms.md, 'Stateful augmentations'). Use a stateless "
        f"policy {stateless} or a FixMatch-family method.")


def normalize(images: jax.Array, info: sources.DatasetInfo) -> jax.Array:
  """0..255 images to zero-mean unit-variance per channel, float32."""
  mean = jnp.asarray(info.mean, jnp.float32)
  std = jnp.asarray(info.std, jnp.float32)
  return (images.astype(jnp.float32) - mean) / std


def prepare_batch(batch: PyTree, key: jax.Array, step: jax.Array,
                  specs: dict[str, dict[str, dict]],
                  info: sources.DatasetInfo,
                  augment_state: PyTree | None = None) -> PyTree:
  """Augments and normalises each stream's views; keeps labels and indices.

  `augment_state` is the augmentation's own state, if any (e.g. CTAugment's
  bin weights, kept in the train state), handed to every strong view's
  policy; None for the stateless policies. A view's side information (a
  probe's draws) is passed through unnormalised as `'<view>_aux'`.
  """
  out = {}
  for i, (stream, views) in enumerate(specs.items()):
    b = batch[stream]
    imgs = augment.make_views(jax.random.fold_in(key, i), step, b["image"],
                              b["index"], views, state=augment_state)
    out[stream] = {k: normalize(v, info) if k in views else v
                   for k, v in imgs.items()}
    out[stream].update(label=b["label"], index=b["index"])
  return out


