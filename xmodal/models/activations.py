"""The exact (erf) GELU that BERT and ViT use, with a backward pass that keeps only its input.

Autodiff of `jax.nn.gelu(approximate=False)` keeps the erfc and exp terms of the forward pass for the backward; in a
scanned layer stack each of those is an MLP-sized residual per layer, written in the forward pass and read back in
the backward. Recomputing them from the input costs one erf and one exp per element and saves that traffic.

Φ(x) is written 0.5 (1 + erf(x / √2)), as BERT, timm and PyTorch write it, not with erfc as `jax.nn.gelu` does:
XLA's erfc is several times the work of its erf, and on an H200 the `base` step spent 20 ms of 250 more in it
(docs/performance.md). The two differ at rounding level, and only in the far negative tail, where GELU is ~0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """x · Φ(x)."""
  return x * _cdf(x)


def _cdf(x: jax.Array) -> jax.Array:
  """Φ(x), the standard normal distribution function."""
  sqrt_half = np.sqrt(0.5).astype(x.dtype)
  return 0.5 * (1 + lax.erf(x * sqrt_half))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, grad):
  # d/dx [x Φ(x)] = Φ(x) + x φ(x), with φ the standard normal density.
  inv_sqrt_2pi = (1 / np.sqrt(2 * np.pi)).astype(x.dtype)
  slope = _cdf(x) + x * jnp.exp(-0.5 * x * x) * inv_sqrt_2pi
  return (grad * slope,)


gelu.defvjp(_gelu_fwd, _gelu_bwd)
