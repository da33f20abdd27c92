"""Stochastic depth (`drop_path_rate`) in the ResNets and the Wide ResNet.

Block l of the L residual blocks of a network drops its residual branch per
example with rate ``drop_path_rate * l / L`` in training (kept branches scaled
by 1 / keep), and is unchanged in eval mode and with rate 0. The train-mode
test records every block's input and output and every `DropPath`'s input and
output with `nn.intercept_methods`, and checks them against values computed
here: each row of a branch is either exactly zero or the branch / keep, the
identity-shortcut blocks output (relu of) input + that, the per-block rates
are ``rate * l / L`` and the fraction of dropped rows per block matches its
rate within 4 binomial standard deviations.

Break checks (each made in the source, seen to fail here, then restored):
- DropPath returns ``jnp.where(mask, branch, 0)`` (no 1 / keep scale):
  test_train_drops_rows_at_linear_rates fails (kept rows != branch / keep).
- `linear_drop_rates` returns ``[rate] * num_blocks`` (rate instead of
  rate * l / L): test_train_drops_rows_at_linear_rates fails (block rates).
- `linear_drop_rates` counts l from 0 (``range(num_blocks)``):
  test_train_drops_rows_at_linear_rates fails (the first block gets rate 0,
  so one DropPath fewer than blocks).
- DropPath ignores `train` (``if self.rate == 0.0: return branch``):
  test_eval_mode_is_identity fails (the eval outputs differ).
- WRNBlock applies DropPath to the sum (``DropPath(...)(shortcut + y)``):
  test_train_drops_rows_at_linear_rates fails (block output != input + branch
  for the identity blocks).
- BasicBlock / BottleneckBlock apply DropPath to the shortcut instead of the
  branch: test_train_drops_rows_at_linear_rates fails (block outputs).
- Both rate-0 guards removed (block ``if self.drop_path_rate:`` and DropPath's
  ``self.rate == 0.0``): test_default_is_off fails (rate 0 draws from the
  'dropout' rng, so train mode without rngs raises).
- `check_drop_path_rate` accepts rate 1 (``<= 1.0``): test_rate_validation
  fails.
- ResNet's `rng_names` back to ``()``: test_registry_passes_rate_and_rng_names
  fails.
- The mask drawn per element instead of per row (shape ``branch.shape``):
  test_train_drops_rows_at_linear_rates fails (rows neither zero nor scaled).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r2d2_jax import models
from r2d2_jax.models import resnet
from r2d2_jax.models import wide_resnet

NUM_CLASSES = 3

# name -> (constructor of the tiny network, L, 0-based indices of the blocks
# whose shortcut is the identity, whether the block ends in a ReLU).
_basic = functools.partial(
    resnet.ResNet, num_classes=NUM_CLASSES, stage_sizes=(2, 2),
    block_cls=resnet.BasicBlock, num_filters=4, stem='cifar')
_bottleneck = functools.partial(
    resnet.ResNet, num_classes=NUM_CLASSES, stage_sizes=(2, 1),
    block_cls=resnet.BottleneckBlock, num_filters=2, stem='cifar')
_wrn = functools.partial(wide_resnet.WideResNet, num_classes=NUM_CLASSES,
                         depth=16, width=1)
NETS = {
    'resnet_basic': (_basic, 4, (1, 3), True),
    'resnet_bottleneck': (_bottleneck, 3, (1,), True),
    'wrn16_1': (_wrn, 6, (1, 3, 5), False),
}
BLOCKS = (resnet.BasicBlock, resnet.BottleneckBlock, wide_resnet.WRNBlock)


def _images(n: int, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), (n, 8, 8, 3), jnp.float32)


def _variables(model: nn.Module, x: jax.Array):
  """Initial variables with every leaf perturbed, so no branch is zero.

  (The ResNets zero-initialise the last BatchNorm scale of each block, which
  makes every branch zero at initialisation.)
  """
  v = model.init(jax.random.key(0), x[:2], train=False)
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  leaves = [a + 0.3 * jax.random.normal(k, a.shape, a.dtype)
            for a, k in zip(leaves, keys)]
  v = jax.tree.unflatten(tree, leaves)
  # Keep the running variances positive.
  return jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.abs(a) + 0.5 if p[-1].key == 'var' else a, v)


def _train(model, v, x, seed=0, rngs=None):
  if rngs is None:
    rngs = {'dropout': jax.random.key(seed)}
  out, _ = model.apply(v, x, train=True, rngs=rngs, mutable=['batch_stats'])
  return out


def _record(model, v, x, seed):
  """Runs in train mode; the blocks' and DropPaths' (in, out, module)."""
  blocks, drops = [], []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      if isinstance(context.module, BLOCKS):
        blocks.append((np.asarray(args[0]), np.asarray(out), context.module))
      elif isinstance(context.module, resnet.DropPath):
        drops.append((np.asarray(args[0]), np.asarray(out), context.module))
    return out

  with nn.intercept_methods(interceptor):
    _train(model, v, x, seed)
  return blocks, drops


@pytest.mark.parametrize('name', sorted(NETS))
def test_default_is_off(name):
  """Rate 0 (default or explicit): same output, same params, no rng drawn."""
  make, _, _, _ = NETS[name]
  x = _images(4)
  default, zero, on = make(), make(drop_path_rate=0.0), make(
      drop_path_rate=0.5)
  assert default.drop_path_rate == 0.0
  v = _variables(default, x)
  # No new parameters or state with the rate on.
  abstract = jax.eval_shape(functools.partial(on.init, train=False),
                            jax.random.key(0), x)
  assert jax.tree.structure(abstract) == jax.tree.structure(v)
  for train in (True, False):
    kw = dict(rngs={'dropout': jax.random.key(0)},
              mutable=['batch_stats']) if train else {}
    a = default.apply(v, x, train=train, **kw)
    b = zero.apply(v, x, train=train, **kw)
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(u, w)
  # No rng use at rate 0: train mode runs without any rngs, bitwise the same.
  np.testing.assert_array_equal(
      _train(zero, v, x, rngs={}), _train(default, v, x, seed=7))


@pytest.mark.parametrize('name', sorted(NETS))
def test_eval_mode_is_identity(name):
  make, _, _, _ = NETS[name]
  x = _images(4)
  v = _variables(make(), x)
  # (Passing rngs in eval mode is harmless; they must not be used.)
  np.testing.assert_array_equal(
      make(drop_path_rate=0.5).apply(v, x, train=False,
                                     rngs={'dropout': jax.random.key(0)}),
      make().apply(v, x, train=False))


@pytest.mark.parametrize('name', sorted(NETS))
def test_train_drops_rows_at_linear_rates(name):
  make, num_blocks, identity, relu = NETS[name]
  rate, n = 0.6, 768
  x = _images(n)
  model = make(drop_path_rate=rate)
  v = _variables(model, x)
  blocks, drops = _record(model, v, x, seed=3)
  assert len(blocks) == len(drops) == num_blocks
  # Block l (1-based, forward order) has rate `rate * l / L`.
  expected_rates = [rate * l / num_blocks for l in range(1, num_blocks + 1)]
  np.testing.assert_allclose([m.rate for _, _, m in drops], expected_rates,
                             rtol=1e-12)
  for l, ((b_in, b_out, _), (d_in, d_out, d_mod)) in enumerate(
      zip(blocks, drops)):
    keep = 1.0 - expected_rates[l]
    assert d_in.shape[0] == n
    flat_in = d_in.reshape(n, -1)
    flat_out = d_out.reshape(n, -1)
    assert np.all(np.abs(flat_in).max(axis=1) > 0)  # every branch observable
    dropped = np.all(flat_out == 0, axis=1)
    # Kept rows: the branch scaled by exactly 1 / keep.
    np.testing.assert_allclose(flat_out[~dropped],
                               flat_in[~dropped] / np.float32(keep),
                               rtol=1e-6, atol=0)
    # Per-example Bernoulli(rate): the fraction dropped within 4 sigma.
    r = expected_rates[l]
    tol = 4 * np.sqrt(r * (1 - r) / n)
    assert abs(dropped.mean() - r) < tol, (l, dropped.mean(), r, tol)
    # The shortcut is kept: identity blocks output (relu of) input + branch.
    if l in identity:
      pre = b_in + d_out
      np.testing.assert_allclose(b_out, np.maximum(pre, 0) if relu else pre,
                                 rtol=1e-6, atol=1e-6)
  assert {m.name for _, _, m in drops} == {'drop_path'}


@pytest.mark.parametrize('name', sorted(NETS))
def test_grad_finite_and_rng_changes_output(name):
  make, _, _, _ = NETS[name]
  x = _images(8)
  model = make(drop_path_rate=0.5)
  v = _variables(model, x)

  def loss(params, seed):
    out = _train(model, {**v, 'params': params}, x, seed)
    return jnp.mean(out ** 2)

  grads = jax.grad(loss)(v['params'], 0)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves)
  assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
  a, b = _train(model, v, x, 0), _train(model, v, x, 1)
  np.testing.assert_array_equal(a, _train(model, v, x, 0))
  assert not np.array_equal(a, b)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'wrn28_2',
                                  'wide_resnet'])
@pytest.mark.parametrize('rate', [1.0, -0.1, 1.5, float('nan'), '0.2', True])
def test_rate_validation(name, rate):
  with pytest.raises(ValueError, match='drop_path_rate') as excinfo:
    models.get_model(name, NUM_CLASSES, drop_path_rate=rate)
  assert 'config.model.kwargs.drop_path_rate' in str(excinfo.value)


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'wrn28_2',
                                  'wrn28_8', 'wide_resnet'])
def test_registry_passes_rate_and_rng_names(name):
  assert models.get_model(name, NUM_CLASSES).drop_path_rate == 0.0
  model = models.get_model(name, NUM_CLASSES, drop_path_rate=0.2)
  assert model.drop_path_rate == 0.2
  assert 'dropout' in model.rng_names
  for ok in (0, 0.0, 0.999):
    models.get_model(name, NUM_CLASSES, drop_path_rate=ok)


def test_resnet_dropout_before_the_classifier():
  """ResNet `dropout_rate`: off by default; eval mode unchanged; in training
  the classifier reads the pooled features f with each element either 0 or
  f / keep (rate of zeros ≈ the rate), and logits = W · that + b."""
  x = _images(64)
  plain = _basic()
  v = _variables(plain, x)
  dropped = _basic(dropout_rate=0.5)
  np.testing.assert_array_equal(dropped.apply(v, x, train=False),
                                plain.apply(v, x, train=False))
  (_, f), _ = plain.apply(v, x, train=True, return_features=True,
                          mutable=['batch_stats'])
  seen = []

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout):
      seen.append((args[0], out))
    return out

  with nn.intercept_methods(spy):
    z = _train(dropped, v, x, seed=3)
  assert len(seen) == 1
  given, out = (np.asarray(a) for a in seen[0])
  np.testing.assert_allclose(given, f, rtol=1e-6, atol=1e-6)
  zero = out == 0
  np.testing.assert_allclose(out[~zero], given[~zero] / 0.5, rtol=1e-6)
  n = zero.size
  assert abs(zero.mean() - 0.5) < 4 * np.sqrt(0.25 / n)
  w = v['params']['classifier']
  np.testing.assert_allclose(z, out @ np.asarray(w['kernel']) + w['bias'],
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='dropout_rate=1.0'):
    _basic(dropout_rate=1.0)
