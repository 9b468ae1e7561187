"""ViT image encoder (pre-LN, [CLS] token, learned position embeddings resizable to another resolution)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from xmodal.models import layers


def resize_pos_embedding(posemb: jax.Array, grid: tuple[int, int], method: str = 'bicubic') -> jax.Array:
  """Resizes (1, 1 + h*w, D) position embeddings to a new patch grid; the [CLS] entry is kept as is.

  Used when the model sees another resolution than it was built for, and when loading a checkpoint trained at
  another resolution. Interpolation is `jax.image.resize` over the (h, w) grid.
  """
  cls, patches = posemb[:, :1], posemb[:, 1:]
  old = int(round(np.sqrt(patches.shape[1])))
  if old * old != patches.shape[1]:
    raise ValueError(f'position embeddings of {patches.shape[1]} patches are not a square grid')
  if (old, old) == tuple(grid):
    return posemb
  width = patches.shape[-1]
  patches = patches.reshape(1, old, old, width)
  patches = jax.image.resize(patches, (1, *grid, width), method=method, antialias=False)
  return jnp.concatenate([cls, patches.reshape(1, grid[0] * grid[1], width).astype(posemb.dtype)], axis=1)


class VisionEncoder(nn.Module):
  """images (B, H, W, 3) float -> tokens (B, 1 + N, D): [CLS] then one token per patch, final LayerNorm applied."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  patch_size: int
  image_size: int
  layer_norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  attention: str = 'xla'
  scan_layers: bool = True
  remat: str = 'none'

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    p = self.patch_size
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=layers.with_names(layers.default_kernel_init, None, None, None, 'embed'),
                bias_init=layers.with_names(nn.initializers.zeros, 'embed'), name='patch_embed')(
                    images.astype(self.dtype))
    batch, gh, gw, _ = x.shape
    x = x.reshape(batch, gh * gw, self.width)
    cls = self.param('cls', layers.with_names(nn.initializers.zeros, None, None, 'embed'), (1, 1, self.width))
    grid = self.image_size // p
    posemb = self.param('pos_embedding', layers.with_names(layers.default_kernel_init, None, None, 'embed'),
                        (1, 1 + grid * grid, self.width))
    posemb = resize_pos_embedding(posemb, (gh, gw))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
    x = layers.constrain(x + posemb.astype(x.dtype), 'batch', 'length', 'embed')
    x = layers.stack(layers.PreLNBlock, self.depth, scan=self.scan_layers, remat=self.remat,
                     heads=self.heads, mlp_dim=self.mlp_dim, eps=self.layer_norm_eps, dtype=self.dtype,
                     impl=self.attention)(x, None)
    return layers.LayerNorm(self.layer_norm_eps, self.dtype, name='ln_final')(x)
