"""Scaled dot-product attention behind one function, with an implementation switch.

Both implementations read the same mask: a boolean key mask `(B, Lk)`, True where a key is real. The `cudnn` path
hands `jax.nn.dot_product_attention` per-example key lengths, which is the form its flash kernel takes; that is exact
for the masks xmodal makes (padding at the end: tokenizers pad on the right, image tokens are never padded in front).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Finite, so that a fully masked row gives a uniform distribution instead of NaN.
_MASK_VALUE = -1e30


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None,
                          impl: str = 'xla') -> jax.Array:
  """Attention of queries over keys.

  Args:
    q: (B, Lq, H, Dh) queries.
    k: (B, Lk, H, Dh) keys.
    v: (B, Lk, H, Dh) values.
    mask: (B, Lk) bool, True for keys that may be attended to; None attends to all.
    impl: 'xla' (einsum + softmax, any backend) or 'cudnn' (fused flash attention on NVIDIA GPUs).

  Returns:
    (B, Lq, H, Dh) in the dtype of `v`.
  """
  if impl == 'xla':
    return _xla_attention(q, k, v, mask)
  if impl == 'cudnn':
    return _library_attention(q, k, v, mask, implementation='cudnn')
  raise ValueError(f'attention implementation {impl!r} is not one of (\'xla\', \'cudnn\')')


def _xla_attention(q, k, v, mask):
  scale = q.shape[-1] ** -0.5
  # Logits and softmax in float32: bfloat16 loses the small differences between large logits.
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def _library_attention(q, k, v, mask, implementation):
  """`jax.nn.dot_product_attention` with the key mask turned into per-example key lengths."""
  lengths = None
  if mask is not None:
    lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=implementation)
