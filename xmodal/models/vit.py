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


def sincos2d_init(key, shape, dtype=jnp.float32):
  """Position embeddings (1, 1 + g*g, D) set to a 2D sine-cosine code of each patch's (row, column), [CLS] zero.

  An initial value, still learned: the model knows from step 0 which patches are near and which is left of which,
  instead of discovering the grid (from scratch on little data, that is what spatial relations wait on). D/4
  frequencies per axis, as in MAE and big_vision's `posemb_sincos_2d`.
  """
  del key
  _, length, width = shape
  grid = int(round(np.sqrt(length - 1)))
  if grid * grid != length - 1 or width % 4:
    raise ValueError(f'sincos2d position embeddings need 1 + a square number of tokens and a width divisible by 4, '
                     f'got {shape}')
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')
  omega = 1.0 / 10_000 ** (np.arange(width // 4) / (width // 4))
  angles = [np.outer(axis.ravel(), omega) for axis in (rows, cols)]
  code = np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1)
  return jnp.asarray(np.concatenate([np.zeros((1, width)), code])[None], dtype)


POSEMB_INITS = {'normal': layers.default_kernel_init, 'sincos2d': sincos2d_init}
STEMS = ('patch', 'conv')  # the values of `model.vision.stem`


def conv_stem_channels(patch_size: int, width: int) -> tuple[int, ...]:
  """Output channels of the conv stem's stride-2 layers: log2(patch) of them, doubling up to the width."""
  steps = int(round(np.log2(patch_size)))
  if 2 ** steps != patch_size:
    raise ValueError(f'a conv stem needs a power-of-two patch size, got {patch_size}')
  return tuple(max(width // 2 ** (steps - 1 - i), 8) for i in range(steps))


class StridedConv(nn.Module):
  """(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), features): a 3x3 stride-2 'SAME' convolution (nn.Conv's parameters
  and initial values), computed as a matmul of each output pixel's 3x3 input patch.

  Why not nn.Conv: on XLA:CPU its backward (the kernel's gradient above all) ran at a tenth of the matmul peak; the
  patches and one matmul take the stem's three layers from 114 to 77 ms a step, forward and backward, on the shapes
  batch (docs/performance.md). The same sums in another order.
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels = x.shape[-1]
    kernel = self.param('kernel', layers.with_names(nn.initializers.lecun_normal(), None, None, None, None),
                        (3, 3, channels, self.features), jnp.float32)
    bias = self.param('bias', layers.with_names(nn.initializers.zeros, None), (self.features,), jnp.float32)
    height, width = x.shape[1:3]
    # 'SAME' at stride 2: out = ceil(in / 2); the padding a 3-wide window needs, the odd one after (as XLA's).
    pads = [((total := max((-(-n // 2) - 1) * 2 + 3 - n, 0)) // 2, total - total // 2) for n in (height, width)]
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    rows, cols = -(-height // 2), -(-width // 2)
    patches = jnp.concatenate([x[:, dy:dy + 2 * rows - 1:2, dx:dx + 2 * cols - 1:2]
                               for dy in range(3) for dx in range(3)], axis=-1)  # (B, rows, cols, 9 C): dy, dx, C
    return patches @ kernel.reshape(9 * channels, self.features).astype(self.dtype) + bias.astype(self.dtype)


class ConvStem(nn.Module):
  """images (B, H, W, 3) -> (B, H/p, W/p, D): log2(p) 3x3 stride-2 convolutions with ReLU, channels doubling up to
  D, then a 1x1 projection: the token grid of a p x p patchify (the hybrid ViT of Dosovitskiy et al.; Xiao et al.
  2021).

  A patchify is linear in each patch's pixels, so a shape seen at another offset inside the patch is another input:
  from scratch, the tiny ViT did not learn to tell six shapes apart in 400 supervised steps, while three
  convolutions learned it in 200 (docs/shapes_recipe.md).
  """
  patch_size: int
  width: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    for i, channels in enumerate(conv_stem_channels(self.patch_size, self.width)):
      x = nn.relu(StridedConv(channels, self.dtype, name=f'conv_{i}')(x))
    return nn.Conv(self.width, (1, 1), dtype=self.dtype, param_dtype=jnp.float32, name='proj',
                   kernel_init=layers.with_names(nn.initializers.lecun_normal(), None, None, None, 'embed'),
                   bias_init=layers.with_names(nn.initializers.zeros, 'embed'))(x)


class VisionEncoder(nn.Module):
  """images (B, H, W, 3) float -> (tokens (B, 1 + N, D): [CLS] then one token per patch, final LayerNorm applied;
  pooled (B, D) with `fc_norm`, else None)."""
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
  posemb_init: str = 'normal'  # a key of POSEMB_INITS
  stem: str = 'patch'  # 'patch': ViT's linear patchify (what checkpoints hold); 'conv': ConvStem
  layer_scale_init: float = 0.0  # LayerScale of each block's branches (CaiT); 0 = none (ViT/DeiT checkpoints)
  # Also return the mean of the patch tokens taken before the final LayerNorm, through a LayerNorm of its own (timm's
  # average pool with `fc_norm`). The mean of normalised tokens weighs every patch alike, so a scene's many background
  # patches drown its few object patches; before the norm, flat background has small activations.
  fc_norm: bool = False

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    p = self.patch_size
    if self.stem == 'conv':
      x = ConvStem(p, self.width, self.dtype, name='conv_stem')(images)
    else:
      x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype, param_dtype=jnp.float32,
                  kernel_init=layers.with_names(layers.default_kernel_init, None, None, None, 'embed'),
                  bias_init=layers.with_names(nn.initializers.zeros, 'embed'), name='patch_embed')(
                      images.astype(self.dtype))
    batch, gh, gw, _ = x.shape
    x = x.reshape(batch, gh * gw, self.width)
    cls = self.param('cls', layers.with_names(nn.initializers.zeros, None, None, 'embed'), (1, 1, self.width))
    grid = self.image_size // p
    posemb = self.param('pos_embedding', layers.with_names(POSEMB_INITS[self.posemb_init], None, None, 'embed'),
                        (1, 1 + grid * grid, self.width))
    posemb = resize_pos_embedding(posemb, (gh, gw))
    x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)).astype(x.dtype), x], axis=1)
    x = layers.constrain(x + posemb.astype(x.dtype), 'batch', 'length', 'embed')
    x = layers.stack(layers.PreLNBlock, self.depth, scan=self.scan_layers, remat=self.remat,
                     heads=self.heads, mlp_dim=self.mlp_dim, eps=self.layer_norm_eps, dtype=self.dtype,
                     impl=self.attention, layer_scale_init=self.layer_scale_init)(x, None)
    tokens = layers.LayerNorm(self.layer_norm_eps, self.dtype, name='ln_final')(x)
    if not self.fc_norm:
      return tokens, None
    pooled = jnp.mean(x[:, 1:].astype(jnp.float32), axis=1)
    return tokens, layers.LayerNorm(self.layer_norm_eps, jnp.float32, name='fc_norm')(pooled)
