"""Small configs and data shared by the tests."""

import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from r2d2_jax import methods
from r2d2_jax.data import sources
from r2d2_jax.methods import supervised


def tiny_config(method: str = "supervised", **overrides):
  """A digits config that trains in a second."""
  c = common.base_config()
  c.method = method
  c.model.name = "cnn_small"
  c.data.dataset = "digits"
  c.data.num_labels = 50
  c.data.batch_size = 16
  c.data.eval_batch_size = 120
  c.data.augment.weak.translate = 1
  c.total_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 0
  c.checkpoint_every_steps = 2
  c.checkpoint_async = False
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def mpl_blocks(c, mode: str = "first_order", h: str = "difference") -> None:
  """MPL's teacher and UDA settings for tiny runs: μ = 2, the student waits 1 step."""
  c.data.uratio = 2
  c.optimizer.schedule.wait_steps = 1  # the student waits; the teacher not
  c.mpl = ml_collections.ConfigDict(dict(
      mode=mode, h=h, sample_labels=False, temperature=1.0,
      baseline_decay=0.01,
      teacher_optimizer=dict(name="sgd", lr=0.05, momentum=0.9, nesterov=True,
                             weight_decay=5e-4, grad_clip_norm=5.0,
                             schedule=dict(name="cosine", warmup_steps=1,
                                           wait_steps=0, decay_steps=0))))
  c.uda = common.uda_block(weight=2.0, ramp_steps=2, temperature=0.7,
                           threshold=0.6, label_smoothing=0.1)


def tiny_mpl_config(mode: str = "first_order", h: str = "difference",
                    **overrides):
  """A tiny MPL config: first-order (or `mode`) MPL + UDA on a small MLP."""
  c = tiny_config("mpl", **overrides)
  # A one-hidden-layer MLP with BatchNorm: the MPL step holds many forward and
  # backward passes, and this keeps their compile time to seconds.
  c.model.name = "mlp_mnist"
  c.model.kwargs = ml_collections.ConfigDict(dict(widths=(16,)))
  c.label_smoothing = 0.1
  mpl_blocks(c, mode, h)
  return c


def nan_method() -> methods.Method:
  """Supervised, with a NaN loss from step 3 on (registered as 'nan_at_3')."""
  def train_step(state, batch, rng, *, net, hp):
    state, m = supervised.train_step(state, batch, rng, net=net, hp=hp)
    m["losses/total"] = jnp.where(state.step >= 3, jnp.nan, m["losses/total"])
    return state, m
  return methods.Method(name="nan_at_3", hparams=supervised.hparams,
                        views=supervised.views, train_step=train_step)


def run_steps(stage, n, state=None):
  """`n` compiled steps of `stage` from `state` (default: a fresh one), as `run()` feeds them.

  Returns:
    (state, the last step's metrics).
  """
  state = stage.init_state() if state is None else state
  batches = stage.pipeline.iterate(int(state.step))
  for _ in range(n):
    state, metrics = stage.train_step(state, next(batches))
  return state, metrics


class StepContext:
  """What the trainer binds into a method's functions, built by hand for tests.

  `ctx.bind(fn)` is `fn` with the `net`, `task` and `hp` its signature names
  (as `Stage` binds them); `ctx.net`, `ctx.task`, `ctx.hp`, `ctx.tx`,
  `ctx.model`, `ctx.mesh`, `ctx.config` are the parts.

  Args:
    config: the config; `hp` is parsed from it by `config.method`'s (or
      `method`'s) `hparams`.
    model, tx, schedule, image_shape: the `Network`.
    num_classes, num_train, total_steps, steps_per_epoch, mesh, and the
      split arrays (`labeled_index`, ...): the `Task`.
    method: the method whose hyperparameters to parse (default:
      config.method).
  """

  def __init__(self, config, model, tx, schedule, image_shape, num_classes,
               num_train=0, total_steps=100, steps_per_epoch=4, mesh=None,
               method=None, **task_kwargs):
    method = methods.get_method(method or config.method)
    self.config, self.model, self.tx, self.mesh = config, model, tx, mesh
    self.net = methods.Network(
        model=model, tx=tx, schedule=schedule, image_shape=image_shape,
        ema_decay=float(config.get("ema_decay", 0.0) or 0.0))
    self.task = methods.Task(
        num_classes=num_classes, num_train=num_train, total_steps=total_steps,
        steps_per_epoch=steps_per_epoch, mesh=mesh, **task_kwargs)
    self.hp = methods.base.bind(method.hparams, task=self.task)(config)
    self.method = method

  def bind(self, fn):
    return methods.base.bind(fn, net=self.net, task=self.task, hp=self.hp)


def fake_splits(n_train: int = 200, n_test: int = 50, shape=(8, 8, 1),
                num_classes: int = 10, seed: int = 0):
  rng = np.random.default_rng(seed)
  mk = lambda n: sources.ArraySplit(
      rng.integers(0, 256, (n, *shape), dtype=np.uint8),
      (np.arange(n) % num_classes).astype(np.int32))
  return {"train": mk(n_train), "test": mk(n_test)}
