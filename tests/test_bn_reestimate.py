"""r2d2_jax.bn_stats and benchmarks.bn_reestimate: population BatchNorm statistics, by hand in numpy."""

import jax
import numpy as np
import pytest

from benchmarks import bn_reestimate
from r2d2_jax import bn_stats
from r2d2_jax.errors import R2D2Error
from r2d2_jax.models import mlp


def _numpy_stats(variables, x, batch, eps):
  """Both BN layers' pool mean / variance of a 1-hidden-layer top-BN MLP."""
  p = jax.tree.map(np.asarray, variables["params"])
  w1 = p["dense1"]["kernel"].astype(np.float64)
  wc = p["classifier"]["kernel"].astype(np.float64)
  g, b = p["bn1"]["scale"], p["bn1"]["bias"]
  pre1, pre2 = [], []
  for s in range(0, len(x), batch):
    z = x[s:s + batch].reshape(len(x[s:s + batch]), -1) @ w1
    pre1.append(z)
    # Train mode: the hidden layer is normalised by its own batch's statistics.
    h = np.maximum((z - z.mean(0)) / np.sqrt(z.var(0) + eps) * g + b, 0.0)
    pre2.append(h @ wc)
  pre1, pre2 = np.concatenate(pre1), np.concatenate(pre2)
  return dict(bn1=(pre1.mean(0), pre1.var(0)),
              bn_top=(pre2.mean(0), pre2.var(0)))


@pytest.mark.parametrize("noise_std", [0.0, 0.5])
def test_population_stats_are_the_pool_statistics(noise_std):
  model = mlp.MLP(num_classes=3, widths=(4,), bn_momentum=0.99,
                  noise_std=noise_std, top_bn=True)
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (10, 2, 3, 1)))
  variables = model.init({"params": jax.random.PRNGKey(0),
                          "dropout": jax.random.PRNGKey(2)}, x[:1],
                         train=False)
  variables = jax.tree.map(lambda v: v, dict(variables))
  # Non-trivial BN scale / bias so the second layer depends on them.
  variables["params"] = jax.tree.map(lambda v: v, dict(variables["params"]))
  variables["params"]["bn1"] = dict(scale=np.array([1.5, 0.5, 2.0, 1.0],
                                                   np.float32),
                                    bias=np.array([0.1, -0.2, 0.3, 0.0],
                                                  np.float32))
  stats = bn_stats.population_stats(model, variables, x, batch=6)
  want = _numpy_stats(variables, x, 6, eps=1e-5)   # batches of 6 and 4
  for layer, (mean, var) in want.items():
    np.testing.assert_allclose(stats[layer]["mean"], mean, rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(stats[layer]["var"], var, rtol=1e-4, atol=1e-6)


def test_pools_and_errors():
  split = dict(labeled=[0, 3], val=[1, 4])
  rows = bn_reestimate.pools(split, 6)
  assert rows["labeled"].tolist() == [0, 3]
  assert rows["unlabeled"].tolist() == [0, 2, 3, 5]

  class NoBN:
    pass

  with pytest.raises(R2D2Error, match="no `bn_momentum`"):
    bn_stats.stats_model(NoBN())
