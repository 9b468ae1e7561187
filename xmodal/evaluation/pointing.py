"""The pointing test: does a word's heatmap point at the object the word names?

For every noun phrase of a shapes caption ("a small red circle"), the heatmap of its shape word ("circle") and of its
colour word ("red") over the image's patches (xmodal.models.explain) is read at its hottest patch. A hit is a hottest
patch whose centre lies inside the named object's bounding circle (the scene metadata's x, y and radius). Chance is
what a patch drawn uniformly at random scores: the share of the patch centres that lie inside the circle, averaged
over the targets (close to the share of the image the circle covers: 2 % for a small object, 7 % for a large one at
64 px).

Pure numpy over scenes, captions and maps; the scenes and captions come from `xmodal.data.shapes` (TensorFlow-free
modules), the maps from whoever runs the model.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from xmodal.data.shapes import captions as shapes_captions, render as shapes_render

WORD_KINDS = ('shape', 'colour')


@dataclasses.dataclass(frozen=True)
class Target:
  """One word to point with: pair `row`'s tokens `tokens` (positions in the text, [CLS] at 0), which name the object
  whose bounding circle is (x, y, radius) in pixels."""
  row: int
  kind: str  # WORD_KINDS
  tokens: tuple[int, ...]
  x: float
  y: float
  radius: float


def targets(captions: Sequence[str], scenes: Sequence[shapes_render.Scene],
            offsets: Sequence[Sequence[tuple[int, int]]], max_len: int) -> list[Target]:
  """The targets of pairs (captions[i], scenes[i]); offsets[i] are caption i's token character spans (no [CLS]).

  A word's tokens are those whose characters overlap it, shifted by one for [CLS]; a word cut off by the text length
  is left out, as is a phrase naming no object of the scene (a caption is true of its scene, so none should)."""
  found = []
  for row, (text, scene, spans) in enumerate(zip(captions, scenes, offsets, strict=True)):
    objects = {(o.color, o.shape): o for o in scene.objects}
    for named in shapes_captions.named_objects(text):
      obj = objects.get((named.color, named.shape))
      if obj is None:
        continue
      for kind, (start, end) in zip(WORD_KINDS, (named.shape_span, named.color_span)):
        tokens = tuple(1 + i for i, (a, b) in enumerate(spans) if a < end and b > start and 1 + i < max_len - 1)
        if tokens:
          found.append(Target(row, kind, tokens, obj.x, obj.y, obj.radius))
  return found


def patch_centres(patches: int, image_size: int) -> np.ndarray:
  """(N, 2) pixel (x, y) of the centres of a row-major square grid of N patches."""
  grid = math.isqrt(patches)
  if grid * grid != patches:
    raise ValueError(f'{patches} patches are not a square grid')
  centres = (np.arange(grid) + 0.5) * image_size / grid
  ys, xs = np.meshgrid(centres, centres, indexing='ij')
  return np.stack([xs.ravel(), ys.ravel()], axis=-1)


def _inside(targets_: Sequence[Target], centres: np.ndarray) -> np.ndarray:
  """(T, N) bool: which patch centres lie inside each target's circle."""
  circles = np.array([(t.x, t.y, t.radius) for t in targets_], np.float64).reshape(-1, 3)
  distance = np.hypot(centres[None, :, 0] - circles[:, None, 0], centres[None, :, 1] - circles[:, None, 1])
  return distance <= circles[:, 2:]


def hits(maps: np.ndarray, targets_: Sequence[Target], image_size: int, first_row: int = 0) -> np.ndarray:
  """Whether each target's word map peaks inside its object.

  Args:
    maps: (P, M, K, L, N) maps of P pairs (M methods, K layers, L tokens, N patches), as `models.explain` returns.
    targets_: targets whose `row` - first_row indexes the P pairs.
    image_size: the image side in pixels.
    first_row: the row of the pair maps[0] (a batch of a split's pairs).

  Returns:
    (T, M, K) bool. A word of several tokens is read at the mean of their maps.
  """
  length, patches = maps.shape[-2:]
  weights = np.zeros((len(targets_), length), np.float32)
  for i, t in enumerate(targets_):
    weights[i, list(t.tokens)] = 1.0 / len(t.tokens)
  rows = np.array([t.row for t in targets_], np.int64) - first_row
  heat = np.einsum('tl,tmkln->tmkn', weights, maps[rows])
  hottest = np.argmax(heat, axis=-1)  # (T, M, K)
  inside = _inside(targets_, patch_centres(patches, image_size))
  return np.take_along_axis(inside[:, None, None, :], hottest[..., None], axis=-1)[..., 0]


def chance(targets_: Sequence[Target], patches: int, image_size: int) -> float:
  """The expected hit rate of a uniformly drawn patch: the mean share of patch centres inside the targets' circles."""
  return float(np.mean(_inside(targets_, patch_centres(patches, image_size)))) if targets_ else float('nan')


def summarize(hit: np.ndarray, kinds: Sequence[str], chances: dict[str, float],
              methods: Sequence[str]) -> dict[str, dict[str, object]]:
  """{kind: {'count', 'chance', method: [accuracy (%) per layer]}} from stacked `hits` (T, M, K) and each target's
  kind."""
  kinds = np.asarray(kinds)
  out = {}
  for kind in WORD_KINDS:
    chosen = hit[kinds == kind]
    entry: dict[str, object] = {'count': int(len(chosen)), 'chance': 100.0 * chances[kind]}
    for m, method in enumerate(methods):
      entry[method] = [100.0 * float(np.mean(chosen[:, m, k])) if len(chosen) else float('nan')
                       for k in range(hit.shape[2])]
    out[kind] = entry
  return out
