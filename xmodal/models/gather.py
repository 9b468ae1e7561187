"""Gathering rows, with a backward pass that sums each row's cotangents in float32 and fast on accelerators.

Autodiff of `jnp.take(x, index, axis=0)` scatter-adds the rows' cotangents into x's shape in x's dtype. On an H200 in
bfloat16 that scatter, for ITM's 3B fusion pairs gathering the cross-attention keys and values of the batch's B
images, took 15 ms of the `base` step's 275 ms; a float32 scatter still took 13 (docs/performance.md). There the
backward pass is a matmul with the one-hot of the index instead (tensor cores, float32 accumulation; 2 x B x 3B
FLOPs per gathered element), which removed it from the profile. On a CPU, where the scatter is cheap and the matmul
would not be, it stays a scatter, in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def take_rows(x: jax.Array, index: jax.Array) -> jax.Array:
  """x[index] along axis 0: (M, ...) and (N,) int -> (N, ...); rows may repeat or be left out."""
  return _take_rows(x.shape[0], x, index)


def sum_rows_by_scatter(rows: int, index: jax.Array, grad: jax.Array) -> jax.Array:
  """(N,) int, (N, ...) -> (rows, ...) float32: out[m] = sum of grad[n] over n with index[n] == m."""
  return jnp.zeros((rows, *grad.shape[1:]), jnp.float32).at[index].add(grad.astype(jnp.float32))


def sum_rows_by_matmul(rows: int, index: jax.Array, grad: jax.Array) -> jax.Array:
  """`sum_rows_by_scatter` as one_hot(index)ᵀ @ grad, accumulated in float32."""
  one_hot = jax.nn.one_hot(index, rows, dtype=grad.dtype)
  return jnp.einsum('nm,n...->m...', one_hot, grad, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _take_rows(rows: int, x: jax.Array, index: jax.Array) -> jax.Array:
  del rows  # the backward pass's output shape
  return jnp.take(x, index, axis=0)


def _take_rows_fwd(rows, x, index):
  return _take_rows(rows, x, index), index


def _take_rows_bwd(rows, index, grad):
  summed = lax.platform_dependent(index, grad, cpu=functools.partial(sum_rows_by_scatter, rows),
                                  default=functools.partial(sum_rows_by_matmul, rows))
  return summed.astype(grad.dtype), None


_take_rows.defvjp(_take_rows_fwd, _take_rows_bwd)
