"""Mixed precision: `config.model.dtype = 'bfloat16'` with float32 parameters.

The network computes in bfloat16; parameters, optimizer state, BatchNorm
statistics, logits, losses, softmaxes, R2-D2's table and the meta-gradients of
MPL / SemiMeta stay float32. Checked here:

* the bf16 train step of every method really runs its convolutions in bf16,
  while every `exp` / `log` (softmax, log-softmax, entropies, KL) sees float32;
* supervised, R2-D2 and MPL trained for `STEPS` steps in bf16 and in fp32 from
  the same initialisation and batches: the state stays float32 leaf by leaf,
  the losses are finite, and the bf16 loss tracks the fp32 one (bounds below);
* an unknown dtype string is an `R2D2Error`.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from r2d2_jax import models
from r2d2_jax import sharding
from r2d2_jax import train
from r2d2_jax.errors import R2D2Error
from r2d2_jax.methods import semimeta
from tests import helpers

STEPS = 10
LAST = 5
# |mean bf16 loss − mean fp32 loss| / mean fp32 loss over the last LAST steps.
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ≈ 0.2 % per op). Measured
# on CPU (print with -s): single steps differ by up to ~1 %, the means of the
# last 5 steps by 0.01-0.2 % (supervised 0.19 %, R2-D2 0.01 %, MPL 0.16 %).
# The bound of 5 % leaves a 25x margin for other backends and seeds, and is
# still well below what a dtype bug gives (a loss computed in bf16 is off by
# percents; a broken cast gives NaNs or a run that does not train).
REL_TOL_LAST = 0.05
# The very first step sees identical parameters and batches: only the forward
# pass rounds differently.
REL_TOL_FIRST = 0.02

# R2-D2: max |Y_bf16 − Y_fp32| over the table, relative to how far the fp32
# run moved it (max |Y_fp32 − Y_0|).
TABLE_REL_TOL = 0.05

FLOAT_OPS = ("exp", "log", "log1p", "expm1", "logistic")


def _config(method: str, dtype: str, model: str) -> ml_collections.ConfigDict:
  """A tiny config of `method` ('mpl' or e.g. 'mpl:exact') in `dtype`.

  Args:
    method: registry name, optionally ':mode'.
    dtype: `config.model.dtype`.
    model: 'cnn_small' (narrowed: fast on CPU) or 'mlp' (one hidden layer of
      16 with BatchNorm: MPL's many passes compile in seconds, as in
      tests/test_mpl.py).
  """
  method, _, mode = method.partition(":")
  c = helpers.tiny_config(method)
  c.model.dtype = dtype
  if model == "mlp":
    c.model.name = "mlp_mnist"
    c.model.kwargs = ml_collections.ConfigDict(dict(widths=(16,)))
  else:
    c.model.kwargs = ml_collections.ConfigDict(dict(widths=(8, 16, 32)))
  c.total_steps = STEPS
  c.ema_decay = 0.0
  if method == "supervised":
    c.data.num_labels = -1
  if method == "r2d2":
    common.r2d2_block(c)
    c.data.uratio = 3
  if method in ("mpl", "uda"):
    helpers.mpl_blocks(c, mode or "first_order")
  if method == "semimeta":
    c.data.uratio = 1
    c.semimeta = semimeta.default_block()
    c.semimeta.mode = mode or "first_order"
  return c


@pytest.fixture(scope="module")
def make_stage(tmp_path_factory):
  """`make_stage(method, dtype, model='cnn_small')`: a Stage, built once."""
  root = tmp_path_factory.mktemp("mixed_precision")

  @functools.cache
  def make(method: str, dtype: str, model: str = "cnn_small") -> train.Stage:
    workdir = root / f"{method.replace(':', '_')}_{model}_{dtype}"
    # One device: the programs are small; sharding is tested elsewhere.
    return train.Stage(_config(method, dtype, model), str(workdir),
                       mesh=sharding.make_mesh(jax.devices()[:1]))
  return make


def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (jit, custom_jvp, cond...) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for v in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(v, "jaxpr", v)
        if hasattr(sub, "eqns"):
          yield from _eqns(sub)


def _float_leaves(tree):
  return [x for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.mark.parametrize("method", ["supervised", "r2d2", "uda",
                                    "mpl:first_order", "mpl:exact",
                                    "semimeta:first_order", "semimeta:exact"])
def test_bf16_step_computes_network_in_bf16_and_losses_in_fp32(make_stage,
                                                                method):
  stage = make_stage(method, "bfloat16")
  assert stage.net.model.dtype == jnp.bfloat16
  batch = stage.pipeline.global_batch(0, stage.streams)
  closed = jax.make_jaxpr(stage.train_step)(stage.abstract_state, batch)
  eqns = list(_eqns(closed.jaxpr))
  convs = [e for e in eqns if e.primitive.name == "conv_general_dilated"]
  assert convs and all(v.aval.dtype == jnp.bfloat16
                       for e in convs for v in e.invars)
  transcendental = [e for e in eqns if e.primitive.name in FLOAT_OPS]
  assert transcendental  # softmax / log-softmax are in there
  bad = {(e.primitive.name, str(v.aval.dtype), v.aval.shape)
         for e in transcendental for v in e.invars
         if v.aval.dtype != jnp.float32}
  assert not bad, f"transcendentals below float32: {sorted(bad)}"
  # The state the step returns has the dtypes it was given: float32 throughout.
  out_state, metrics = jax.eval_shape(stage.train_step, stage.abstract_state,
                                      batch)
  assert {x.dtype for x in _float_leaves(stage.abstract_state)} == {
      jnp.dtype(jnp.float32)}
  assert jax.tree.map(lambda x: x.dtype, out_state) == jax.tree.map(
      lambda x: x.dtype, stage.abstract_state)
  assert all(m.dtype == jnp.float32 for m in _float_leaves(metrics))


def _train(stage: train.Stage, init):
  state = jax.device_put(init, stage.state_shardings)
  batches = stage.pipeline.iterate(0, stage.streams)
  losses = []
  for _ in range(STEPS):
    state, metrics = stage.train_step(state, next(batches))
    losses.append(float(metrics["losses/total"]))
  return state, np.asarray(losses)


@pytest.mark.parametrize("method,model", [("supervised", "cnn_small"),
                                          ("r2d2", "cnn_small"),
                                          ("mpl", "mlp")])
def test_bf16_tracks_fp32_from_the_same_init(make_stage, method, model):
  stage32 = make_stage(method, "float32", model)
  stage16 = make_stage(method, "bfloat16", model)
  # The compute dtype does not change the initialisation (same abstract
  # state, same values: checked on host copies, then both runs start there).
  init32 = jax.device_get(stage32.init_state())
  assert jax.tree.map(lambda x: (x.shape, x.dtype), stage16.abstract_state) == (
      jax.tree.map(lambda x: (x.shape, x.dtype), stage32.abstract_state))
  if method == "supervised":
    for a, b in zip(jax.tree.leaves(init32),
                    jax.tree.leaves(jax.device_get(stage16.init_state()))):
      np.testing.assert_array_equal(a, b)

  state32, loss32 = _train(stage32, init32)
  state16, loss16 = _train(stage16, init32)
  for x in _float_leaves(state16):
    assert x.dtype == jnp.float32
  assert jax.tree.map(lambda x: x.dtype, state16) == jax.tree.map(
      lambda x: x.dtype, state32)
  assert np.all(np.isfinite(loss16)) and np.all(np.isfinite(loss32))

  first = abs(loss16[0] - loss32[0]) / abs(loss32[0])
  last = abs(loss16[-LAST:].mean() - loss32[-LAST:].mean()) / abs(
      loss32[-LAST:].mean())
  print(f"{method}: fp32 {np.round(loss32, 4)}\n{method}: bf16 "
        f"{np.round(loss16, 4)}\n{method}: relative difference first step "
        f"{first:.4f}, mean of last {LAST} steps {last:.4f}")
  assert first < REL_TOL_FIRST
  assert last < REL_TOL_LAST
  if method == "r2d2":
    # The table is float32 and its label step is computed from float32
    # softmaxes: the bf16 run moves the same rows by nearly the same amounts.
    moved = np.abs(state32.table - init32.table).max()
    apart = np.abs(state16.table - state32.table).max()
    print(f"r2d2: table moved by up to {moved:.4f}, bf16 vs fp32 differ by up "
          f"to {apart:.5f}")
    assert state16.table.dtype == jnp.float32 and moved > 0.1
    assert apart < TABLE_REL_TOL * moved
  # Training moved the network in both runs (not a trivially equal pair).
  p32 = jax.tree.leaves(getattr(state32, "student", state32).params)
  p0 = jax.tree.leaves(getattr(init32, "student", init32).params)
  assert any(not np.allclose(a, b) for a, b in zip(p32, p0))


@pytest.mark.parametrize("dtype", ["float16", "bf16", "int32", "float64"])
def test_unknown_dtype_is_a_readable_error(tmp_path, dtype):
  c = helpers.tiny_config(**{"model.dtype": dtype})
  with pytest.raises(R2D2Error, match="dtype"):
    train.Stage(c, str(tmp_path))


def test_compute_dtype_names():
  assert models.compute_dtype("") == jnp.float32
  assert models.compute_dtype(None) == jnp.float32
  assert models.compute_dtype("float32") == jnp.float32
  assert models.compute_dtype("bfloat16") == jnp.bfloat16
  assert models.compute_dtype(jnp.bfloat16) == jnp.bfloat16
  assert models.get_model("cnn_small", 10, dtype="bfloat16").dtype == (
      jnp.bfloat16)
  with pytest.raises(models.UnknownDtypeError, match="Valid dtypes"):
    models.get_model("cnn_small", 10, dtype="half")
