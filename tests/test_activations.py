"""The exact GELU with its hand-written backward pass, against float64 references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal.models.activations import gelu


def _reference_slope(x):
  """d/dx [x Φ(x)] = Φ(x) + x φ(x), in float64 from math.erf."""
  cdf = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
  pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
  return cdf + x * pdf


def _points(seed=0):
  rng = np.random.default_rng(seed)
  # Both tails and the region around 0, where the slope changes fastest.
  return np.concatenate([rng.normal(scale=3.0, size=997), [-8.0, 0.0, 8.0]]).astype(np.float32)


def _reference_gelu(x):
  return np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])


@pytest.mark.parametrize('dtype, tolerance', [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_forward_matches_the_float64_gelu(dtype, tolerance):
  x = jnp.asarray(_points(), dtype)
  reference = _reference_gelu(np.asarray(x, np.float64))
  np.testing.assert_allclose(np.asarray(gelu(x), np.float64), reference, rtol=10 * tolerance, atol=tolerance)


def test_forward_agrees_with_the_library_exact_gelu_to_rounding():
  x = jnp.asarray(_points(3))
  np.testing.assert_allclose(np.asarray(gelu(x)), np.asarray(jax.nn.gelu(x, approximate=False)),
                             rtol=1e-5, atol=1e-6)


def test_gradient_matches_the_float64_derivative():
  x = _points(1)
  grad = jax.grad(lambda v: jnp.sum(gelu(v) * 1.5))(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(grad), 1.5 * _reference_slope(x.astype(np.float64)), rtol=1e-5, atol=1e-6)


def test_gradient_matches_autodiff_of_the_library_gelu_inside_jit_and_vmap():
  x = jnp.asarray(_points(2).reshape(10, 100))
  ours = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(jnp.sin(gelu(v))))))(x)
  library = jax.jit(jax.vmap(jax.grad(lambda v: jnp.sum(jnp.sin(jax.nn.gelu(v, approximate=False))))))(x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(library), rtol=1e-5, atol=1e-6)
