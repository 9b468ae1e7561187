"""Why an image matched a query: per-word heatmaps over its patches, and overlays that show them.

`Retriever.explain(query, image)` runs the bundle's `explain` function (xmodal.models.explain: the fusion encoder's
cross-attention, as its weights or as ALBEF's Grad-CAM on the ITM score) and returns an `Explanation`: one map per
query token, on the image's patch grid. `Explanation.words()` merges word pieces into words and drops function
words, which is what a person asks about ("red", "circle", "left"); `overlay` draws one map over the image.

Numpy and PIL only: no model code (the program comes from the bundle).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

# The values of `method`, in the order of the bundle function's method axis (xmodal.models.explain.METHODS).
METHODS = ('attention', 'gradcam')
# What `Retriever.explain` shows unless asked otherwise: the first cross-attention layer's weights. On the default
# shapes model that is the Locator's, which the locate loss teaches where each phrase's object is; its maps peak on
# the named shape for 81 % of shape words on validation, against 30 % for the next layer's (either method) and 4 %
# for chance (docs/search.md, "Explanations").
DEFAULT_METHOD = 'attention'
DEFAULT_LAYER = 0
# Words that name nothing in an image; they get no overlay.
STOP_WORDS = frozenset(
    'a an the one of is are and or there in on at to with by it its this that also only just plus where two three'
    ' shapes objects picture image drawing background'.split())


@dataclasses.dataclass(frozen=True)
class Explanation:
  """Heatmaps of one (query, image) pair.

  tokens: the query's tokens as written (its text at each token's characters), without [CLS] and [SEP].
  spans: each token's (start, end) characters in `query`.
  maps: (T, G, G) float32, each token's map over the G x G patch grid, scaled to a maximum of 1 (all zero stays 0).
  itm: the ITM logit of "match" for the pair.
  method, layer: which map (METHODS) of which cross-attention layer (0 = the first; the Locator's where it has one).
  """
  query: str
  tokens: list[str]
  spans: list[tuple[int, int]]
  maps: np.ndarray
  itm: float
  method: str
  layer: int

  def words(self, content_only: bool = True) -> list[tuple[str, np.ndarray]]:
    """(word, (G, G) map) per word: pieces that touch (no space between) are one word, their maps averaged and
    rescaled to a maximum of 1, except punctuation, which is its own word ("box," is "box" and ","); with
    `content_only`, STOP_WORDS and punctuation are left out."""
    wordy = [any(c.isalnum() for c in token) for token in self.tokens]
    groups: list[list[int]] = []
    for i, (start, _) in enumerate(self.spans):
      if groups and self.spans[groups[-1][-1]][1] == start and wordy[i] and wordy[groups[-1][-1]]:
        groups[-1].append(i)
      else:
        groups.append([i])
    words = []
    for group in groups:
      word = self.query[self.spans[group[0]][0]:self.spans[group[-1]][1]]
      if content_only and (word.lower() in STOP_WORDS or not any(c.isalnum() for c in word)):
        continue
      words.append((word, _unit_max(self.maps[group].mean(axis=0))))
    return words


def _unit_max(x: np.ndarray) -> np.ndarray:
  """Scaled so that its largest entry is 1 (a map with nothing positive is left as zeros)."""
  peak = float(np.max(x)) if x.size else 0.0
  return (x / peak).astype(np.float32) if peak > 0 else np.zeros_like(x, np.float32)


def grid_maps(patch_maps: np.ndarray) -> np.ndarray:
  """(T, N) maps over a row-major square patch grid -> (T, G, G), each scaled to a maximum of 1."""
  count, patches = patch_maps.shape
  side = math.isqrt(patches)
  if side * side != patches:
    raise ValueError(f'{patches} patches are not a square grid')
  return np.stack([_unit_max(m) for m in patch_maps.reshape(count, side, side)]) if count else np.zeros(
      (0, side, side), np.float32)


def overlay(rgb: np.ndarray, heat: np.ndarray, floor: float = 0.2) -> np.ndarray:
  """The image (H, W, 3) uint8 lit by a (G, G) map in [0, 1]: each pixel's brightness scaled between `floor` (map
  0) and 1 (map 1), the map upsampled bilinearly. A spotlight, not a colour map: the words are often colours, and a
  tint would hide the colour the word names."""
  height, width = rgb.shape[:2]
  light = np.asarray(Image.fromarray(np.asarray(heat, np.float32)).resize((width, height),
                                                                                   Image.Resampling.BILINEAR))
  light = floor + (1.0 - floor) * np.clip(light, 0.0, 1.0)
  return np.clip(rgb.astype(np.float32) * light[..., None], 0, 255).astype(np.uint8)
