"""Tests for the model zoo (`r2d2_jax.models`).

Heavy models (WRN-28-8, Shake-Shake 2x96d, ResNet-50, ...) are only traced with
`jax.eval_shape`; real forward passes run on small configurations so that the
file stays fast on a 2-core CPU.
"""

import functools
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from r2d2_jax import models
from r2d2_jax.models import shake_shake

EXPECTED_NAMES = (
    'cnn13', 'cnn_small', 'convlarge', 'lenet_2d', 'mlp_mnist', 'resnet18',
    'resnet50', 'shake_shake', 'shake_shake26_2x96d', 'wide_resnet', 'wrn28_2', 'wrn28_8',
    'vit', 'vit_digits', 'vit_digits_distilled', 'vit_mnist',
    'vit_mnist_distilled', 'vit_cifar', 'vit_cifar_distilled', 'deit_tiny',
    'deit_tiny_distilled', 'deit_small', 'deit_small_distilled')

# ViTs (tests/test_vit.py checks them in detail): LayerNorm, no batch_stats.
VIT_NAMES = {n for n in EXPECTED_NAMES if n.startswith(('vit', 'deit'))}

# Aliases and generic constructors whose defaults equal a named model; the
# shape checks below cover the latter.
ALIASES = {'convlarge': 'cnn13', 'wide_resnet': 'wrn28_2',
           'shake_shake': 'shake_shake26_2x96d', 'vit': 'deit_tiny'}

# (name, input shape) for the shape checks of every other registered model.
SHAPE_CASES = [
    ('lenet_2d', (2, 28, 28, 1)),
    ('cnn_small', (2, 8, 8, 1)),
    ('cnn_small', (2, 28, 28, 1)),
    ('mlp_mnist', (2, 28, 28, 1)),
    ('cnn13', (2, 32, 32, 3)),
    ('wrn28_2', (2, 32, 32, 3)),
    ('wrn28_8', (2, 32, 32, 3)),
    ('shake_shake26_2x96d', (2, 32, 32, 3)),
    ('resnet18', (2, 32, 32, 3)),
    ('resnet18', (2, 64, 64, 3)),
    ('resnet50', (2, 32, 32, 3)),
    ('resnet50', (2, 64, 64, 3)),
    ('vit_digits', (2, 8, 8, 1)),
    ('vit_mnist_distilled', (2, 28, 28, 1)),
    ('vit_cifar', (2, 32, 32, 3)),
]

# Penultimate feature width per registry name (default kwargs).
FEATURE_DIM = {
    'lenet_2d': 2, 'cnn_small': 128, 'mlp_mnist': 150, 'cnn13': 128, 'wrn28_2': 128,
    'wrn28_8': 512, 'shake_shake26_2x96d': 384, 'resnet18': 512,
    'resnet50': 2048, 'vit_digits': 64, 'vit_mnist_distilled': 128,
    'vit_cifar': 192,
}

# Models with BatchNorm (so a `batch_stats` collection).
BN_MODELS = set(EXPECTED_NAMES) - {'lenet_2d'} - VIT_NAMES

NUM_CLASSES = 10

# Tiny inputs run in microseconds; compilation dominates. Cheap XLA CPU
# optimisation settings cut it several-fold (initialisers' RNG code especially).
FAST_COMPILE = {'xla_backend_optimization_level': 0,
                'xla_llvm_disable_expensive_passes': True}


def _rngs(model: Any, seed: int) -> dict[str, jax.Array]:
  """One key per rng name the model declares."""
  names = model.rng_names
  if not names:
    return {}
  return dict(zip(names, jax.random.split(jax.random.key(seed), len(names))))


def _abstract_variables(model: Any, shape: tuple[int, ...]):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False),
                        jax.random.key(0), x)


def _num_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_registry_names():
  assert sorted(models.MODELS) == sorted(EXPECTED_NAMES)


def test_unknown_name_lists_valid_names():
  with pytest.raises(ValueError) as excinfo:
    models.get_model('foo', NUM_CLASSES)
  message = str(excinfo.value)
  assert "'foo'" in message
  assert ', '.join(sorted(EXPECTED_NAMES)) in message


@pytest.mark.parametrize('alias,name', sorted(ALIASES.items()))
def test_aliases_default_to_named_model(alias, name):
  assert models.get_model(alias, NUM_CLASSES) == models.get_model(
      name, NUM_CLASSES)


def test_generic_constructors_take_depth_and_width():
  wrn = models.get_model('wide_resnet', NUM_CLASSES, depth=16, width=4)
  assert (wrn.depth, wrn.width) == (16, 4)
  assert models.get_model('wrn28_8', NUM_CLASSES).width == 8
  assert models.get_model('shake_shake', NUM_CLASSES, width=32).width == 32


@pytest.mark.parametrize('name', EXPECTED_NAMES)
def test_rng_names_declared(name):
  model = models.get_model(name, NUM_CLASSES)
  assert isinstance(model.rng_names, tuple)
  assert set(model.rng_names) <= {'dropout', 'shake'}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('name,shape', SHAPE_CASES)
def test_shapes_abstract(name, shape, dtype):
  """Output shapes / dtypes in train and eval mode, traced without running."""
  model = models.get_model(name, NUM_CLASSES, dtype=dtype)
  variables = _abstract_variables(model, shape)
  # Parameters stay float32 whatever the compute dtype.
  for p in jax.tree.leaves(variables['params']):
    assert p.dtype == jnp.float32
  assert ('batch_stats' in variables) == (name in BN_MODELS)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  batch = shape[0]

  for train in (True, False):
    apply = functools.partial(
        model.apply, train=train, return_features=True,
        rngs=_rngs(model, 0) if train else None,
        mutable=['batch_stats'] if train else False)
    out = jax.eval_shape(apply, variables, x)
    logits, features = out[0] if train else out
    assert logits.shape == (batch, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert features.shape == (batch, FEATURE_DIM[name])
    assert features.dtype == jnp.float32
  logits = jax.eval_shape(functools.partial(model.apply, train=False),
                          variables, x)
  assert logits.shape == (batch, NUM_CLASSES)
  assert logits.dtype == jnp.float32


@pytest.mark.parametrize('name,num_classes,shape,expected', [
    ('cnn13', 10, (2, 32, 32, 3), 3.1e6),
    ('wrn28_2', 10, (2, 32, 32, 3), 1.47e6),
    ('wrn28_8', 10, (2, 32, 32, 3), 23.4e6),
    ('shake_shake26_2x96d', 10, (2, 32, 32, 3), 26.2e6),
    ('resnet18', 1000, (2, 224, 224, 3), 11.7e6),
    ('resnet50', 1000, (2, 224, 224, 3), 25.6e6),
])
def test_param_counts(name, num_classes, shape, expected):
  variables = _abstract_variables(models.get_model(name, num_classes), shape)
  n = _num_params(variables['params'])
  assert abs(n - expected) <= 0.05 * expected, (name, n)


@pytest.mark.parametrize('shape,kernel', [((2, 32, 32, 3), (3, 3, 3, 64)),
                                          ((2, 64, 64, 3), (7, 7, 3, 64))])
def test_resnet_stem_follows_input_size(shape, kernel):
  variables = _abstract_variables(models.get_model('resnet18', 10), shape)
  assert variables['params']['conv_init']['kernel'].shape == kernel


def test_shake_mixes_forward_alpha_backward_beta():
  b1, b2 = jnp.array([1.0, 2.0]), jnp.array([3.0, -1.0])
  alpha, beta = jnp.array([0.2, 0.7]), jnp.array([0.9, 0.4])
  out = shake_shake.shake(b1, b2, alpha, beta)
  chex.assert_trees_all_close(out, alpha * b1 + (1 - alpha) * b2)
  g1, g2 = jax.grad(lambda a, b: shake_shake.shake(a, b, alpha, beta).sum(),
                    argnums=(0, 1))(b1, b2)
  chex.assert_trees_all_close(g1, beta)
  chex.assert_trees_all_close(g2, 1 - beta)


# Small configurations that are really run:
# (id, name, kwargs, input shape, feature dim).
FORWARD_CASES = [
    ('lenet_2d', 'lenet_2d', {}, (2, 28, 28, 1), 2),
    ('cnn_small_8px', 'cnn_small', {}, (2, 8, 8, 1), 128),
    ('cnn_small_28px', 'cnn_small', {}, (2, 28, 28, 1), 128),
    ('cnn13', 'cnn13', {}, (2, 32, 32, 3), 128),
    ('wrn10_1_dropout', 'wide_resnet',
     dict(depth=10, width=1, dropout_rate=0.5), (2, 32, 32, 3), 64),
    ('shake_shake8_2x8d', 'shake_shake', dict(depth=8, width=8),
     (2, 32, 32, 3), 32),
    ('resnet18_cifar_stem', 'resnet18', dict(num_filters=8),
     (2, 32, 32, 3), 64),
    ('resnet50_imagenet_stem', 'resnet50',
     dict(num_filters=4, stage_sizes=(1, 1, 1, 1)), (2, 64, 64, 3), 128),
    ('vit_digits_8px', 'vit_digits', {}, (2, 8, 8, 1), 64),
    ('vit_distilled_drop_path', 'vit_digits_distilled',
     dict(drop_path_rate=0.5), (2, 8, 8, 1), 64),
]
STOCHASTIC = {'cnn_small_8px', 'cnn_small_28px', 'cnn13', 'wrn10_1_dropout',
              'shake_shake8_2x8d', 'vit_distilled_drop_path'}
CASES_BY_ID = {case[0]: case[1:] for case in FORWARD_CASES}


@functools.cache
def _built(case_id: str, dtype: Any = jnp.float32):
  """Model, variables, input and jitted train/eval applies, once per case."""
  name, kwargs, shape, feature_dim = CASES_BY_ID[case_id]
  model = models.get_model(name, NUM_CLASSES, dtype=dtype, **kwargs)
  x = jax.random.normal(jax.random.key(1), shape, jnp.float32)
  if dtype == jnp.float32:
    variables = jax.jit(functools.partial(model.init, train=False),
                        compiler_options=FAST_COMPILE)(jax.random.key(0), x)
  else:  # Parameters are float32 whatever the dtype: reuse them.
    variables = _built(case_id)[2]
  train_apply = jax.jit(lambda v, x, rngs: model.apply(
      v, x, train=True, return_features=True, rngs=rngs,
      mutable=['batch_stats']), compiler_options=FAST_COMPILE)
  # Takes rngs too, to check that eval ignores them.
  eval_apply = jax.jit(lambda v, x, rngs: model.apply(
      v, x, train=False, return_features=True, rngs=rngs),
                       compiler_options=FAST_COMPILE)
  return name, model, variables, x, train_apply, eval_apply, feature_dim


@pytest.mark.parametrize('case_id', list(CASES_BY_ID))
def test_forward(case_id):
  name, model, variables, x, train_apply, eval_apply, dim = _built(case_id)
  batch = x.shape[0]

  (logits, features), updates = train_apply(variables, x, _rngs(model, 0))
  chex.assert_shape(logits, (batch, NUM_CLASSES))
  chex.assert_shape(features, (batch, dim))
  chex.assert_type([logits, features], jnp.float32)
  chex.assert_tree_all_finite((logits, features))

  if name in BN_MODELS:
    # Train mode updates the running statistics.
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                           variables['batch_stats'], updates['batch_stats'])
    assert any(jax.tree.leaves(changed))
  else:
    assert 'batch_stats' not in updates

  logits_eval, features_eval = eval_apply(variables, x, _rngs(model, 0))
  chex.assert_shape(logits_eval, (batch, NUM_CLASSES))
  chex.assert_shape(features_eval, (batch, dim))
  chex.assert_tree_all_finite((logits_eval, features_eval))
  # Eval is deterministic: other rngs give the same output.
  chex.assert_trees_all_equal(eval_apply(variables, x, _rngs(model, 1)),
                              (logits_eval, features_eval))


@pytest.mark.parametrize('case_id', list(CASES_BY_ID))
def test_train_randomness_follows_rngs(case_id):
  _, model, variables, x, train_apply, _, _ = _built(case_id)
  (out_a, _), _ = train_apply(variables, x, _rngs(model, 0))
  (out_a2, _), _ = train_apply(variables, x, _rngs(model, 0))
  (out_b, _), _ = train_apply(variables, x, _rngs(model, 1))
  chex.assert_trees_all_equal(out_a, out_a2)  # Same rngs, same output.
  if case_id in STOCHASTIC:
    assert not np.allclose(out_a, out_b)
  else:
    chex.assert_trees_all_equal(out_a, out_b)


@pytest.mark.parametrize('case_id', ['lenet_2d', 'cnn_small_8px',
                                     'shake_shake8_2x8d'])
def test_bfloat16_forward_returns_float32(case_id):
  _, model, variables, x, train_apply, eval_apply, _ = _built(
      case_id, jnp.bfloat16)
  (logits, features), updates = train_apply(variables, x, _rngs(model, 0))
  chex.assert_type([logits, features, *eval_apply(variables, x, {})],
                   jnp.float32)
  chex.assert_tree_all_finite(logits)
  # Running statistics stay float32 too, so the train state keeps its dtypes.
  chex.assert_type(jax.tree.leaves(updates), jnp.float32)


def test_lenet_features_are_2d_and_feed_the_classifier():
  _, _, variables, x, _, eval_apply, _ = _built('lenet_2d')
  logits, features = eval_apply(variables, x, {})
  chex.assert_shape(features, (x.shape[0], 2))
  head = variables['params']['classifier']
  chex.assert_trees_all_close(
      logits, features @ head['kernel'] + head['bias'], rtol=1e-5, atol=1e-5)
