"""Scaled dot-product attention behind one function, with an implementation switch.

Both implementations read the same mask: a boolean key mask `(B, Lk)`, True where a key is real. The `cudnn` path
hands `jax.nn.dot_product_attention` per-example key lengths, which is the form its flash kernel takes; that is exact
for the masks xmodal makes (padding at the end: tokenizers pad on the right, image tokens are never padded in front).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ('xla', 'cudnn')  # the values of `model.attention`

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
  raise ValueError(f'attention implementation {impl!r} is not one of {IMPLEMENTATIONS}')


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """(B, Lq, H, Dh) queries, (B, Lk, H, Dh) keys, (B, Lk) bool key mask -> (B, H, Lq, Lk) float32: each query's
  distribution over the keys (what the 'xla' path attends with, and what explanations read)."""
  scale = q.shape[-1] ** -0.5
  # Logits and softmax in float32: bfloat16 loses the small differences between large logits.
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * jnp.asarray(scale, q.dtype), k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, _MASK_VALUE)
  return jax.nn.softmax(logits, axis=-1)


def attend(weights: jax.Array, v: jax.Array) -> jax.Array:
  """(B, H, Lq, Lk) weights, (B, Lk, H, Dh) values -> (B, Lq, H, Dh) in the dtype of `v`."""
  return jnp.einsum('bhqk,bkhd->bqhd', weights.astype(v.dtype), v)


def _xla_attention(q, k, v, mask):
  return attend(attention_weights(q, k, mask), v)


# cuDNN's training kernels take only even sequence lengths (jax 0.11 on an H100: "Unsupported sequence length Q 257,
# KV 257" for ViT-B/16 at 256 px, 256 patches + CLS). The library path pads both lengths to a multiple of this.
_LIBRARY_LENGTH_MULTIPLE = 8


def _library_attention(q, k, v, mask, implementation):
  """`jax.nn.dot_product_attention` with the key mask turned into per-example key lengths.

  Queries and keys are zero-padded at the end to a multiple of `_LIBRARY_LENGTH_MULTIPLE`; padded keys are excluded
  through the key lengths and padded query rows are dropped from the output, so the result is exact.
  """
  batch, lq = q.shape[:2]
  lk = k.shape[1]
  pad_q, pad_k = -lq % _LIBRARY_LENGTH_MULTIPLE, -lk % _LIBRARY_LENGTH_MULTIPLE
  lengths = None
  if mask is not None:
    lengths = jnp.sum(mask, axis=-1, dtype=jnp.int32)
  elif pad_k:
    lengths = jnp.full((batch,), lk, jnp.int32)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0))) if n else x
  out = jax.nn.dot_product_attention(pad(q, pad_q), pad(k, pad_k), pad(v, pad_k), key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :lq]


def attended_positions(q: jax.Array, k: jax.Array, positions: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Where each query looks: (B, Lq, H, Dh) queries, (B, Lk, H, Dh) keys and (Lk, P) key positions -> (B, Lq, H, P)
  float32, the attention-weighted mean of the key positions per head (the same weights as `dot_product_attention`'s
  'xla' path, whichever path produced the values)."""
  return weighted_positions(attention_weights(q.astype(jnp.float32), k.astype(jnp.float32), mask), positions)


def weighted_positions(weights: jax.Array, positions: jax.Array) -> jax.Array:
  """(B, H, Lq, Lk) attention weights and (Lk, P) key positions -> (B, Lq, H, P) float32: the weighted mean."""
  # The positions as values of every head, attended like any values: the same operations, in the same order, as
  # before explanations shared this function (a contraction over 'kp' directly rounds differently, and a trained
  # run's numbers move with it).
  batch, heads, _, length = weights.shape
  values = jnp.broadcast_to(positions.astype(jnp.float32)[None, :, None, :],
                            (batch, length, heads, positions.shape[-1]))
  return attend(weights.astype(jnp.float32), values)
