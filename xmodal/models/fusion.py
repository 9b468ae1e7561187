"""Fusion encoder: text tokens attend to themselves, then to image tokens (cross-attention), then an MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from xmodal.models import layers


class FusionEncoder(nn.Module):
  """(text tokens (B, L, Dt), text mask (B, L), image tokens (B, N, Dv), image mask (B, N) or None[, image index
  (B,)]) -> (B, L, Dt)."""
  depth: int
  heads: int
  mlp_dim: int
  layer_norm_eps: float = 1e-12
  dtype: jnp.dtype = jnp.float32
  attention: str = 'xla'
  scan_layers: bool = True
  remat: str = 'none'
  init: str = 'bert'  # layers.KERNEL_INITS

  @nn.compact
  def __call__(self, text_tokens: jax.Array, text_mask: jax.Array, image_tokens: jax.Array,
               image_mask: jax.Array | None = None, image_index: jax.Array | None = None) -> jax.Array:
    """`image_index` (B,) int: text row i reads image `image_index[i]` of `image_tokens` (M, N, Dv), whose keys and
    values each layer projects once per image rather than once per row (ITM's negatives reuse the batch's images)."""
    if image_mask is None:
      image_mask = jnp.ones(image_tokens.shape[:2], bool)
    broadcast = [text_mask.astype(bool), image_tokens.astype(self.dtype), image_mask.astype(bool)]
    if image_index is not None:
      broadcast[2] = jnp.take(broadcast[2], image_index, axis=0)  # the mask is per text row
      broadcast.append(image_index)
    apply = layers.stack(layers.FusionBlock, self.depth, scan=self.scan_layers, remat=self.remat,
                         num_broadcast=len(broadcast), heads=self.heads, mlp_dim=self.mlp_dim,
                         eps=self.layer_norm_eps, dtype=self.dtype, impl=self.attention, init=self.init)
    return apply(text_tokens.astype(self.dtype), *broadcast)
