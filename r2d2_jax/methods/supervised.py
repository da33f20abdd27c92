"""Supervised training on the labeled examples only: the baseline, and stage 1 of R2-D2.

Loss: cross-entropy of the weakly augmented labeled batch, with optional label
smoothing (`config.label_smoothing`). `config.supervised.view = 'strong'`
trains on the strong view instead (`config.data.augment.strong`: e.g. Noisy
Student's noised teacher, RandAugment on the labeled images).
"""

from __future__ import annotations

import dataclasses

import jax

from r2d2_jax import losses
from r2d2_jax.methods.base import (Method, Network, check_choice, check_range,
                                   one_network_step, parse_block, register)
from r2d2_jax.state import TrainState


VIEWS = ("weak", "strong")


@dataclasses.dataclass(frozen=True)
class SupervisedHparams:
  """The supervised step's settings.

  Attributes:
    label_smoothing: ε of the labeled cross-entropy, in [0, 1)
      (`config.label_smoothing`).
    view: the labeled view trained on, 'weak' or 'strong'
      (`config.supervised.view`; missing block: 'weak').
  """
  label_smoothing: float = 0.0
  view: str = "weak"

  def __post_init__(self):
    check_range("label_smoothing", self.label_smoothing, 0.0, 1.0,
                hi_open=True)
    check_choice("view", self.view, VIEWS)


@dataclasses.dataclass(frozen=True)
class _Block:
  view: str = "weak"


def hparams(config) -> SupervisedHparams:
  block = parse_block(_Block, config.get("supervised"), "config.supervised")
  return parse_block(SupervisedHparams, None, "config",
                     label_smoothing=config.get("label_smoothing"),
                     view=block.view)


def views(hp: SupervisedHparams) -> dict[str, tuple[str, ...]]:
  return {"labeled": (hp.view,)}


def cross_entropy_step(state: TrainState, x: jax.Array, labels: jax.Array,
                       rng: jax.Array, net: Network,
                       label_smoothing: float = 0.0):
  """One optimizer step on CE(labels, f(x)); shared by every CE-only stage.

  Returns:
    (new state, metrics with losses/xe, losses/total, accuracy/train, lr,
    l2_grads, l2_params, l2_updates).
  """

  def loss_fn(logits, params):
    del params
    xe = losses.cross_entropy(logits[0], labels,
                              label_smoothing=label_smoothing)
    return xe, {"losses/xe": xe}

  return one_network_step(state, [x], loss_fn, rng, net, labels=labels)


def train_step(state: TrainState, batch, rng: jax.Array, *, net: Network,
               hp: SupervisedHparams):
  """One SGD step on CE(labels, f(view(x_l))), view = hp.view ('weak')."""
  return cross_entropy_step(state, batch["labeled"][hp.view],
                            batch["labeled"]["label"], rng, net,
                            hp.label_smoothing)


METHOD = register(Method(name="supervised", hparams=hparams, views=views,
                         train_step=train_step))
