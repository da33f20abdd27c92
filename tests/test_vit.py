"""The ViT / DeiT model (r2d2_jax/models/vit.py): architecture by hand, heads, sizes, errors.

`test_forward_by_hand` recomputes a tiny ViT (with and without the distillation
token) in numpy float64 from its parameters: patch embedding, tokens, position
embeddings, pre-norm blocks (LN -> MHSA -> residual, LN -> MLP(GELU) ->
residual), final LN, the heads. The parameter counts of DeiT-Ti / DeiT-S are
computed here from the architecture's formula and compared with the model's
and with the DeiT paper's figures.

Break checks (each line was broken in r2d2_jax/models/vit.py, the tests named
failed, the line was restored):
  attention on the un-normalised tokens (`attn(x, x)`: LN1's output unused)
                            test_forward_by_hand[plain], [distilled]
  tanh GELU (`approximate=True`)
                            test_forward_by_hand[plain], [distilled]
  head_dist on the class token (x[:, 0])
                            test_forward_by_hand[distilled]
  the heads' logits averaged instead of their softmaxes
                            test_eval_output_is_the_mean_of_the_two_softmaxes[*]
  the distillation token a copy of the class token (no `dist_token` param)
                            test_param_counts_are_deits[*distilled*]
  `with_head(..., 'class')` returning Z_dist
                            test_with_head_selects_each_head
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from r2d2_jax import models
from r2d2_jax.errors import R2D2Error
from r2d2_jax.models import vit

TINY = dict(patch_size=2, width=8, depth=2, num_heads=2)


def _init(model, shape, seed=0):
  x = jax.random.normal(jax.random.key(seed + 1), shape, jnp.float32)
  variables = model.init(jax.random.key(seed), x, train=False)
  # Nonzero biases and LayerNorm parameters everywhere (init has zeros / ones),
  # and kernels large enough that the GELU's inputs are O(1).
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(
      lambda v: v + 0.4 * jnp.asarray(rng.normal(size=v.shape), v.dtype),
      variables)
  return variables, x


def _num_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


# ---------------------------------------------------------------------------
# The architecture by hand


def _ln(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _attention(x, p, heads):
  q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("btd,dhk->bthk", x, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("btd,dhk->bthk", x, p["value"]["kernel"]) + p["value"]["bias"]
  w = _softmax(np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]))
  o = np.einsum("bhqs,bshk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]


def _gelu(x):
  return 0.5 * x * (1.0 + special.erf(x / np.sqrt(2.0)))


def vit_by_hand(params, x, *, patch, depth, heads, distilled):
  """Returns (Z_cls, Z_dist or None) in float64."""
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, h, w, _ = x.shape
  pe = params["patch_embed"]
  tokens = []
  for i in range(h // patch):
    for j in range(w // patch):
      window = x[:, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch]
      tokens.append(np.einsum("bpqc,pqcd->bd", window, pe["kernel"]) +
                    pe["bias"])
  extra = [params["cls_token"][0]] + (
      [params["dist_token"][0]] if distilled else [])
  z = np.concatenate([np.broadcast_to(t, (b, 1, t.shape[-1])) for t in extra]
                     + [np.stack(tokens, 1)], axis=1)
  z = z + params["pos_embed"]
  for i in range(depth):
    p = params[f"block{i}"]
    z = z + _attention(_ln(z, p["norm1"]), p["attn"], heads)
    y = _ln(z, p["norm2"])
    y = _gelu(y @ p["fc1"]["kernel"] + p["fc1"]["bias"])
    z = z + y @ p["fc2"]["kernel"] + p["fc2"]["bias"]
  z = _ln(z, params["norm"])
  head = lambda name, t: t @ params[name]["kernel"] + params[name]["bias"]
  z_cls = head("head", z[:, 0])
  z_dist = head("head_dist", z[:, 1]) if distilled else None
  return z_cls, z_dist


@pytest.mark.parametrize("distilled", [False, True],
                         ids=["plain", "distilled"])
def test_forward_by_hand(distilled):
  model = models.get_model("vit", 5, distilled=distilled, **TINY)
  variables, x = _init(model, (3, 4, 6, 2))
  z_cls, z_dist = vit_by_hand(variables["params"], x, patch=2, depth=2,
                              heads=2, distilled=distilled)
  if distilled:
    got_cls, got_dist = model.apply(variables, x, train=False, heads=True)
    np.testing.assert_allclose(got_dist, z_dist, rtol=2e-5, atol=2e-5)
  else:
    got_cls = model.apply(variables, x, train=False)
  np.testing.assert_allclose(got_cls, z_cls, rtol=2e-5, atol=2e-5)
  assert got_cls.dtype == jnp.float32
  # Without dropout / drop-path, train mode is the same function.
  out = model.apply(variables, x, train=True, heads=distilled,
                    rngs={"dropout": jax.random.key(3)})
  np.testing.assert_allclose(out[0] if distilled else out, z_cls,
                             rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# The two heads


@functools.cache
def _distilled_case():
  model = models.get_model("vit", 7, distilled=True, **TINY)
  variables, x = _init(model, (4, 4, 4, 1), seed=5)
  return model, variables, x


def test_the_two_heads_are_distinct_outputs():
  model, variables, x = _distilled_case()
  z_cls, z_dist = model.apply(variables, x, train=False, heads=True)
  assert z_cls.shape == z_dist.shape == (4, 7)
  assert float(jnp.max(jnp.abs(z_cls - z_dist))) > 1e-2
  # Each head has its own parameters: moving head_dist moves Z_dist only.
  params = dict(variables["params"])
  params["head_dist"] = jax.tree.map(lambda a: a + 1.0, params["head_dist"])
  c2, d2 = model.apply({"params": params}, x, train=False, heads=True)
  np.testing.assert_array_equal(c2, z_cls)
  assert float(jnp.max(jnp.abs(d2 - z_dist))) > 1e-2


@pytest.mark.parametrize("train", [False, True])
def test_eval_output_is_the_mean_of_the_two_softmaxes(train):
  model, variables, x = _distilled_case()
  z_cls, z_dist = (np.asarray(a, np.float64) for a in model.apply(
      variables, x, train=False, heads=True))
  mean = (_softmax(z_cls) + _softmax(z_dist)) / 2
  out = model.apply(variables, x, train=train,
                    rngs={"dropout": jax.random.key(0)})
  np.testing.assert_allclose(np.exp(np.asarray(out, np.float64)), mean,
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.exp(out).sum(-1), 1.0, rtol=1e-5)
  # Averaging logits (DeiT's rule) is another prediction here.
  by_logits = _softmax((z_cls + z_dist) / 2)
  assert np.max(np.abs(by_logits - mean)) > 1e-4


def test_with_head_selects_each_head():
  model, variables, x = _distilled_case()
  z_cls, z_dist = model.apply(variables, x, train=False, heads=True)
  np.testing.assert_array_equal(
      model.apply(vit.with_head(variables, "class"), x, train=False), z_cls)
  np.testing.assert_array_equal(
      model.apply(vit.with_head(variables, "distill"), x, train=False),
      z_dist)
  np.testing.assert_allclose(
      model.apply(vit.with_head(variables, "average"), x, train=False),
      model.apply(variables, x, train=False), rtol=1e-6, atol=1e-6)
  with pytest.raises(R2D2Error, match="head="):
    vit.with_head(variables, "both")


def test_features_are_the_class_token_and_feed_the_head():
  model = models.get_model("vit", 5, **TINY)
  variables, x = _init(model, (2, 4, 4, 1))
  logits, features = model.apply(variables, x, train=False,
                                 return_features=True)
  assert features.shape == (2, 8) and features.dtype == jnp.float32
  head = variables["params"]["head"]
  np.testing.assert_allclose(logits, features @ head["kernel"] + head["bias"],
                             rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Registered sizes


def deit_param_count(width, depth, patch, image, classes, distilled):
  """Parameters of DeiT's VisionTransformer from its architecture."""
  d = width
  n_patches = (image // patch) ** 2
  tokens = 2 if distilled else 1
  embed = patch * patch * 3 * d + d
  block = (2 * d                       # norm1
           + 3 * (d * d + d)           # q, k, v (qkv_bias=True)
           + d * d + d                 # attention projection
           + 2 * d                     # norm2
           + d * 4 * d + 4 * d         # fc1
           + 4 * d * d + d)            # fc2
  heads = tokens * (d * classes + classes)
  return (embed + tokens * d + (n_patches + tokens) * d + depth * block +
          2 * d + heads)


@pytest.mark.parametrize("name,width,published", [
    ("deit_tiny", 192, 5.7e6), ("deit_tiny_distilled", 192, 5.9e6),
    ("deit_small", 384, 22.1e6), ("deit_small_distilled", 384, 22.4e6)])
def test_param_counts_are_deits(name, width, published):
  model = models.get_model(name, 1000)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                  jnp.float32))
  expected = deit_param_count(width, 12, 16, 224, 1000,
                              name.endswith("distilled"))
  assert _num_params(variables["params"]) == expected
  assert abs(expected - published) <= 0.02 * published, expected
  assert model.num_heads == {192: 3, 384: 6}[width]


@pytest.mark.parametrize("name,shape", [
    ("vit_digits", (2, 8, 8, 1)), ("vit_digits_distilled", (2, 8, 8, 1)),
    ("vit_mnist", (2, 28, 28, 1)), ("vit_mnist_distilled", (2, 28, 28, 1)),
    ("vit_cifar", (2, 32, 32, 3)), ("vit_cifar_distilled", (2, 32, 32, 3))])
def test_small_sizes_take_their_images(name, shape):
  model = models.get_model(name, 10, dtype="bfloat16")
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False),
                             jax.random.key(0), x)
  for p in jax.tree.leaves(variables["params"]):
    assert p.dtype == jnp.float32
  out = jax.eval_shape(functools.partial(model.apply, train=False),
                       variables, x)
  assert out.shape == (2, 10) and out.dtype == jnp.float32
  assert model.distilled == name.endswith("distilled")


def test_drop_path_follows_the_dropout_rng():
  model = models.get_model("vit", 5, distilled=True, drop_path_rate=0.5,
                           **TINY)
  variables, x = _init(model, (4, 4, 4, 1))
  run = lambda k: model.apply(variables, x, train=True,
                              rngs={"dropout": jax.random.key(k)})
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  np.testing.assert_array_equal(model.apply(variables, x, train=False),
                                model.apply(variables, x, train=False))


# ---------------------------------------------------------------------------
# Errors


def test_a_patch_size_that_does_not_divide_the_image_says_what_to_change():
  model = models.get_model("vit_mnist", 10)
  with pytest.raises(R2D2Error, match=r"patch_size=4 does not divide the "
                     r"30x30.*\[1, 2, 3, 5, 6, 10, 15, 30\]"):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 30, 30, 1), jnp.float32))


def test_width_must_be_a_multiple_of_the_heads():
  model = models.get_model("vit", 10, patch_size=2, width=10, num_heads=3)
  with pytest.raises(R2D2Error, match="num_heads"):
    jax.eval_shape(functools.partial(model.init, train=False),
                   jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 4, 4, 1), jnp.float32))


def test_heads_needs_a_distillation_token():
  model = models.get_model("vit", 5, **TINY)
  variables, x = _init(model, (2, 4, 4, 1))
  with pytest.raises(R2D2Error, match="distillation token"):
    model.apply(variables, x, train=False, heads=True)
