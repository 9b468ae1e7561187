"""Regions of an image as sets of patch tokens: which cells of the patch grid a box covers, and the pooled feature
of the tokens under it (what `XModal.embed_regions` projects for the region-phrase loss)."""

from __future__ import annotations

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
