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


def view_specs(views: dict[str, tuple[str, ...]],
               augment_config: ml_collections.ConfigDict,
               info: sources.DatasetInfo) -> dict[str, dict[str, dict]]:
  """Turns a method's view names into augmentation specs.

  A view called 'weak', 'weak_1', ... is a weak view; 'strong', 'strong_1', ...
  strong; 'plain' is unaugmented. Their hyper-parameters come from
  `config.data.augment.{weak,strong}`; `flip` defaults to whether the dataset
  allows flips. Each spec is checked here (an unknown RandAugment policy, op
  or out-of-range magnitude raises, listing the valid ones), not at the first
  traced step.
  """
  out = {}
  for stream, names in views.items():
    out[stream] = {}
    for name in names:
      kind = name.split("_")[0]
      if kind == "plain":
        out[stream][name] = {"kind": "none"}
        continue
      if kind not in ("weak", "strong"):
        raise R2D2Error(f"Unknown view {name!r}: views are weak[_k], "
                        "strong[_k] or plain.")
      spec = dict(augment_config.get("weak", {}))
      if kind == "strong":
        spec.update(dict(augment_config.get("strong", {})))
      if spec.get("flip") is None:
        spec["flip"] = info.flip
      out[stream][name] = {"kind": kind, **spec}
      try:
        augment.view_fn(out[stream][name])
      except (ValueError, TypeError) as e:
        raise R2D2Error(f"config.data.augment, view {name!r}: {e}") from e
  return out


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
  policy; None for the current policies, which read none.
  """
  out = {}
  for i, (stream, views) in enumerate(specs.items()):
    b = batch[stream]
    imgs = augment.make_views(jax.random.fold_in(key, i), step, b["image"],
                              b["index"], views, state=augment_state)
    out[stream] = {k: normalize(v, info) for k, v in imgs.items()}
    out[stream].update(label=b["label"], index=b["index"])
  return out


