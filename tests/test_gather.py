"""xmodal.models.gather.take_rows: jnp.take's rows forward; backward sums repeated rows in float32 (numpy loop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal.models import gather
from xmodal.models.gather import take_rows


def test_forward_is_the_rows_and_backward_sums_each_rows_cotangents_as_a_loop_does():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(5, 3, 2)).astype(np.float32)
  index = np.array([4, 0, 4, 2, 4, 0])  # repeats, and rows 1 and 3 never read
  weights = rng.normal(size=(6, 3, 2)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(take_rows(jnp.asarray(x), jnp.asarray(index))), x[index])
  grad = jax.jit(jax.grad(lambda v: jnp.sum(take_rows(v, jnp.asarray(index)) * weights)))(jnp.asarray(x))
  expected = np.zeros_like(x)
  for row, source in enumerate(index):
    expected[source] += weights[row]
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=1e-6, atol=1e-6)


def test_bfloat16_cotangents_are_summed_in_float32_and_rounded_once():
  # 256 rows of 2**-8 onto one row: a running bfloat16 sum stalls at 1 + 2**-8 + ... (8 bits of mantissa), a float32
  # sum reaches 1 + 1 = 2 exactly.
  x = jnp.zeros((2, 1), jnp.bfloat16)
  index = jnp.zeros((257,), jnp.int32)
  cotangent = jnp.concatenate([jnp.ones((1, 1)), jnp.full((256, 1), 2.0 ** -8)]).astype(jnp.bfloat16)
  _, pullback = jax.vjp(lambda v: take_rows(v, index), x)
  (grad,) = pullback(cotangent)
  assert grad.dtype == jnp.bfloat16
  assert float(grad[0, 0]) == 2.0 and float(grad[1, 0]) == 0.0


@pytest.mark.parametrize('sum_rows', [gather.sum_rows_by_scatter, gather.sum_rows_by_matmul])
def test_both_backward_sums_equal_the_loop(sum_rows):
  # The matmul form is what accelerators run (platform_dependent picks the scatter on a CPU): checked here directly.
  rng = np.random.default_rng(1)
  index = np.array([2, 2, 0, 3, 2, 0, 3])
  grad = rng.normal(size=(7, 4, 3)).astype(np.float32)
  expected = np.zeros((5, 4, 3), np.float64)
  for row, target in enumerate(index):
    expected[target] += grad[row]
  summed = jax.jit(sum_rows, static_argnums=0)(5, jnp.asarray(index), jnp.asarray(grad))
  assert summed.dtype == jnp.float32 and summed.shape == (5, 4, 3)
  np.testing.assert_allclose(np.asarray(summed), expected, rtol=1e-6, atol=1e-6)
