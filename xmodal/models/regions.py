"""Regions of an image as sets of patch tokens: which cells of the patch grid a box covers, and the pooled feature
of the tokens under it (what `XModal.embed_regions` projects for the region-phrase loss); where each token lies and
where a box's centre is (what the fusion encoder's locator reads and is trained towards)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def region_cells(boxes: jax.Array, grid: int) -> jax.Array:
  """(..., 4) boxes (ymin, xmin, ymax, xmax as fractions of the image side) -> (..., grid * grid) bool: the cells of
  the row-major patch grid that each box overlaps by any area. A zero box (padding) overlaps none."""
  edges = jnp.arange(grid, dtype=jnp.float32) / grid
  ymin, xmin, ymax, xmax = (boxes[..., k, None] for k in range(4))
  rows = (ymin < edges + 1 / grid) & (ymax > edges)  # (..., grid)
  cols = (xmin < edges + 1 / grid) & (xmax > edges)
  return (rows[..., :, None] & cols[..., None, :]).reshape(*boxes.shape[:-1], grid * grid)


def pool_regions(patch_tokens: jax.Array, cells: jax.Array) -> jax.Array:
  """Patch tokens (B, N, D) and each region's cells (B, R, N) bool -> (B, R, D) float32: the channel-wise max over
  the region's patches (0 for a region without any).

  A max, not a mean: a mean over an object's cells trains no shape features in 800 steps, a max does (the supervised
  and region probes of docs/shapes_recipe.md).
  """
  tokens = patch_tokens.astype(jnp.float32)[:, None]  # (B, 1, N, D)
  inside = cells[..., None]
  pooled = jnp.max(jnp.where(inside, tokens, -jnp.inf), axis=2)
  return jnp.where(jnp.any(cells, axis=-1, keepdims=True), pooled, 0.0)


def token_positions(num_tokens: int) -> jax.Array:
  """(num_tokens, 2) float32: where each image token lies, as (x, y) from the image centre in fractions of its side
  (-0.5 left/top edge, +0.5 right/bottom): token 0 is [CLS], at the centre; then a row-major square patch grid at
  its cells' centres."""
  grid = math.isqrt(num_tokens - 1)
  if grid * grid != num_tokens - 1:
    raise ValueError(f'{num_tokens} image tokens are not [CLS] + a square patch grid')
  centres = (jnp.arange(grid, dtype=jnp.float32) + 0.5) / grid - 0.5
  ys, xs = jnp.meshgrid(centres, centres, indexing='ij')
  return jnp.concatenate([jnp.zeros((1, 2), jnp.float32), jnp.stack([xs.ravel(), ys.ravel()], axis=-1)])


def box_centres(boxes: jax.Array) -> jax.Array:
  """(..., 4) boxes (ymin, xmin, ymax, xmax as fractions of the side) -> (..., 2) their centres as `token_positions`
  writes positions: (x, y) from the image centre."""
  return jnp.stack([(boxes[..., 1] + boxes[..., 3]) / 2 - 0.5, (boxes[..., 0] + boxes[..., 2]) / 2 - 0.5], axis=-1)
