"""Small configs and data shared by the tests."""

import os
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import common
from r2d2_jax import methods
from r2d2_jax import optim
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


# USB's classic-CV CIFAR-10 setup, the keys its algorithms' yamls share
# (config/classic_cv/<algorithm>/<algorithm>_cifar10_<labels>_0.yaml).
USB_CIFAR10 = dict(
    num_train_iter=1048576, num_eval_iter=5120, num_log_iter=256,
    batch_size=64, eval_batch_size=256, uratio=7, ema_m=0.999,
    crop_ratio=0.875, img_size=32, optim="SGD", lr=0.03, momentum=0.9,
    weight_decay=0.0005, layer_decay=1.0, amp=False, clip=0.0, use_cat=True,
    net="wrn_28_2")


def check_usb_cifar10_setup(c, usb, labels):
  """The setup USB's classic-CV CIFAR-10 yamls share (and build.py's optimizer)."""
  assert c.method == usb["algorithm"]
  assert usb["net"] == "wrn_28_2" and c.model.name == "wrn28_2"
  # nn.BatchNorm2d(momentum=0.001): running stats keep 0.999 of the old.
  assert c.model.kwargs.bn_momentum == 0.999
  assert c.model.kwargs.dropout_rate == 0.0
  assert (c.data.dataset, c.data.num_labels) == ("cifar10", labels)
  assert c.data.unlabeled == "all" and c.data.num_val == 0  # include_lb_to_ulb
  assert (c.data.batch_size, c.data.uratio) == (usb["batch_size"],
                                                usb["uratio"])
  assert c.data.eval_batch_size == usb["eval_batch_size"]
  weak, strong = c.data.augment.weak, c.data.augment.strong
  # RandomCrop(32, padding=int(32 · (1 − 0.875)) = 4, 'reflect'), flip.
  assert weak.translate == int(usb["img_size"] * (1 - usb["crop_ratio"]))
  assert (weak.flip, weak.pad_mode) == (True, "reflect")
  # RandAugment(3, 5) with its own random cutout.
  assert (strong.policy, strong.num_ops, strong.cutout) == ("usb", 3, 0)
  o = c.optimizer
  assert usb["optim"] == "SGD" and o.name == "sgd"
  assert (o.lr, o.momentum, o.weight_decay) == (usb["lr"], usb["momentum"],
                                                usb["weight_decay"])
  assert o.nesterov is True                 # get_optimizer(nesterov=True)
  assert usb["layer_decay"] == 1.0
  # bn_wd_skip: no decay on ndim ≤ 1 (BatchNorm, biases): the kernels.
  assert o.decay_mask == "kernels"
  assert o.get("weight_decay_mode", "coupled") == "coupled"   # torch SGD
  assert o.grad_clip_norm == usb["clip"]
  assert o.schedule.name == "fixmatch_cosine"       # num_cycles 7/16
  assert (o.schedule.warmup_steps, o.schedule.wait_steps,
          o.schedule.decay_steps) == (0, 0, 0)      # num_warmup_iter 0
  assert c.total_steps == usb["num_train_iter"] == 2 ** 20
  assert c.ema_decay == usb["ema_m"] and c.label_smoothing == 0.0
  assert c.eval_every_steps == usb["num_eval_iter"]
  assert c.log_every_steps == usb["num_log_iter"]
  assert not usb["amp"] and c.model.dtype == ""
  assert usb["use_cat"]          # one forward: the family's step
  # lr · max(0, cos(π · 7/16 · k / K)).
  _, schedule = optim.make_optimizer(o, c.total_steps)
  for k in (0, 2 ** 18, 2 ** 19, 2 ** 20):
    np.testing.assert_allclose(
        float(schedule(k)),
        0.03 * max(0.0, np.cos(np.pi * 7 / 16 * k / 2 ** 20)), rtol=1e-5)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def subprocess_env(cache_dir: str, drop=(), **extra) -> dict:
  """The environment of a test's worker process: 2 fake CPU devices, compile
  fast, a shared compilation cache; `drop` removes inherited variables."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS="--xla_force_host_platform_device_count=2"
             " --xla_backend_optimization_level=0"
             " --xla_llvm_disable_expensive_passes=true",
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for name in drop:
    env.pop(name, None)
  env.update(extra)
  return env


class Background:
  """`python -m MODULE ARGS...` started in the background, output to `log`."""

  def __init__(self, module: str, args, env: dict, log: str,
               timeout: float = 240):
    self.log, self.timeout = str(log), timeout
    with open(self.log, "w") as out:
      self.proc = subprocess.Popen(
          [sys.executable, "-m", module, *map(str, args)], cwd=ROOT, env=env,
          stdout=out, stderr=subprocess.STDOUT)

  def wait(self, timeout: float | None = None):
    try:
      return self.proc.wait(timeout or self.timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      raise

  def output(self) -> str:
    with open(self.log) as f:
      return f.read()
