"""The method side of a learned strong augmentation (docs/algorithms.md, "CTAugment").

A one-network method whose step has a strong view learns CTAugment by keeping
its bin weights in the state and calling these functions (the FixMatch family
and UDA do):

  settings = parse(config)                  None unless the strong policy is
                                            'ctaugment'
  state.augment = init(settings)            {'ctaugment': bin weights} or {}
  views: labeled_views(('weak',), settings) adds the 'probe' view
  Method(augment_state=augment_state)       the views read state.augment
  in the step, after the network update:
    augment, metrics = learn(state, batch['labeled'], net, settings)

`learn` classifies the labeled probe with the EVAL variables of the state
before the update (EMA weights, BatchNorm running statistics in eval mode: the
reference's `classify_op`), without gradient, and applies CTAugment's
sequential update (`r2d2_jax.data.ctaugment.update`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from r2d2_jax.data import ctaugment
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods.base import Network

PyTree = Any


def parse(config) -> ctaugment.CTAugmentHparams | None:
  """CTAugment's settings from `config.data.augment.strong`, or None."""
  strong = config.data.get("augment", {}).get("strong", None) or {}
  if strong.get("policy") != ctaugment.NAME:
    return None
  try:
    return ctaugment.hparams_from(strong)
  except (ValueError, TypeError) as e:
    raise R2D2Error(f"config.data.augment.strong: {e}") from None


def init(settings: ctaugment.CTAugmentHparams | None) -> PyTree:
  """The method's `augment` state: {'ctaugment': bin weights} or {}."""
  return {ctaugment.NAME: ctaugment.init_state()} if settings else {}


def labeled_views(views: tuple[str, ...],
                  settings: ctaugment.CTAugmentHparams | None
                  ) -> tuple[str, ...]:
  """The labeled stream's views, with 'probe' when CTAugment is learned."""
  return tuple(views) + ("probe",) if settings else tuple(views)


def augment_state(state: PyTree) -> PyTree:
  """What the strong views read: `state.augment`, or None when empty/absent."""
  augment = getattr(state, "augment", None)
  return augment if augment else None


def learn(state: PyTree, lab: PyTree, net: Network,
          settings: ctaugment.CTAugmentHparams | None
          ) -> tuple[PyTree, dict[str, jax.Array]]:
  """CTAugment's update from the labeled probe (`state`: before the update).

  Args:
    state: the train state before this step's update, with `augment`.
    lab: the labeled stream, with 'probe', 'probe_aux' and 'label'.
    net: the network.
    settings: CTAugment's settings, or None (nothing to learn).

  Returns:
    (the new `augment` state, {'monitors/ctaugment_proximity'} or {}).
  """
  if settings is None:
    return getattr(state, "augment", {}), {}
  aux = lab["probe_aux"]
  logits = net.apply_eval(state.variables(ema=True), lab["probe"])
  probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32)))
  prox = ctaugment.proximity(probs, lab["label"])
  rates = ctaugment.update(state.augment[ctaugment.NAME]["rates"], aux.op,
                           aux.values, prox, settings.decay)
  return ({**state.augment, ctaugment.NAME: {"rates": rates}},
          {"monitors/ctaugment_proximity": jnp.mean(prox)})
