"""The oracle ceiling of retrieval on the shapes dataset: how well a model that knows every scene can do.

Shapes captions are often true of several images ("a red circle" fits every scene holding one alone), so even a
perfect reader cannot always tell which of them a caption was written for. The oracle ranks first the candidates of
which every fact the caption states holds (`shapes_captions.caption_fits`), in random order among them; its recalls
are the expected ones over that order, so they are deterministic:

  text query, n fitting images, one of them its own:           R@k = min(k, n) / n
  image query, n fitting captions, m of them its own (m >= 1):  R@k = 1 - C(n - m, k) / C(n, k)

TensorFlow-free: the scenes come from `xmodal.data.shapes.builder.load_split` or straight from
`xmodal.data.shapes.render`.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from xmodal.data.shapes import captions as shapes_captions, render as shapes_render
from xmodal.evaluation.metrics import RECALL_AT

_MAX_OBJECTS = 3
_PREDICATES = ('none',) + shapes_render.RELATIONS  # id 0: no relation, always true
# Distinct captions handled at once: bounds the (statements, phrases, scenes, objects) match array to ~10 MB per
# thousand scenes.
_CAPTIONS_PER_STEP = 1024


def _ids(names: tuple[str, ...]) -> dict[str, int]:
  return {name: i for i, name in enumerate(names)}


def _encode_scenes(scenes: Sequence[shapes_render.Scene]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Scenes as arrays.

  Returns:
    attrs: (S, 3 objects, 3) int colour, shape and size ids; -1 past a scene's objects.
    counts: (S,) int, objects per scene.
    loose: (5 predicates of _PREDICATES, S, 3, 3) bool, [p, s, i, j] = object i is p of object j (loosest reading).
  """
  colors, shapes, sizes = (_ids(n) for n in (shapes_render.COLORS, shapes_render.SHAPES, shapes_render.SIZES))
  attrs = np.full((len(scenes), _MAX_OBJECTS, 3), -1, np.int64)
  x, y = np.zeros((2, len(scenes), _MAX_OBJECTS), np.float64)
  for s, scene in enumerate(scenes):
    if not 1 <= len(scene.objects) <= _MAX_OBJECTS:
      raise ValueError(f'scene {s} has {len(scene.objects)} objects; shapes scenes hold 1 to {_MAX_OBJECTS}')
    for i, o in enumerate(scene.objects):
      attrs[s, i] = colors[o.color], shapes[o.shape], sizes[o.size]
      x[s, i], y[s, i] = o.x, o.y
  counts = np.array([len(scene.objects) for scene in scenes], np.int64)
  # The displacements of `relation_holds(a, p, b, strict=False)` with a = object i (axis 1), b = object j (axis 2).
  dx, dy = x[:, None, :] - x[:, :, None], y[:, None, :] - y[:, :, None]  # [s, i, j] = b - a
  along = {'left': dx, 'right': -dx, 'above': dy, 'below': -dy}
  loose = np.stack([np.ones_like(dx, bool)] + [along[p] > 0 for p in _PREDICATES[1:]])
  return attrs, counts, loose


def _encode_statements(statements: Sequence[shapes_captions.Statement]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Statements as arrays.

  Returns:
    phrases: (T, 3 phrases, 3) int colour, shape and size ids; size -1 = any size; colour -2 = no phrase there.
    relation: (T, 3) int subject phrase, predicate id in _PREDICATES (0 = none), object phrase.
    allowed: (T, 4) bool, [t, n] = the template allows n objects.
  """
  colors, shapes, sizes = (_ids(n) for n in (shapes_render.COLORS, shapes_render.SHAPES, shapes_render.SIZES))
  predicates = _ids(_PREDICATES)
  phrases = np.full((len(statements), _MAX_OBJECTS, 3), -2, np.int64)
  relation = np.zeros((len(statements), 3), np.int64)
  allowed = np.zeros((len(statements), _MAX_OBJECTS + 1), bool)
  for t, statement in enumerate(statements):
    for i, p in enumerate(statement.phrases):
      color, shape, size = p.canonical()
      phrases[t, i] = colors[color], shapes[shape], sizes[size] if size else -1
    if statement.relation is not None:
      subject, predicate, obj = statement.relation
      relation[t] = subject, predicates[predicate], obj
    allowed[t, sorted(statement.counts)] = True
  return phrases, relation, allowed


def _statements_fit(phrases: np.ndarray, relation: np.ndarray, allowed: np.ndarray, attrs: np.ndarray,
                    counts: np.ndarray, loose: np.ndarray) -> np.ndarray:
  """(T, S) bool: whether statement t fits scene s (arrays of `_encode_statements` and `_encode_scenes`)."""
  color, shape, size = (phrases[:, :, None, None, k] for k in range(3))  # (T, 3, 1, 1)
  ocolor, oshape, osize = (attrs[None, None, :, :, k] for k in range(3))  # (1, 1, S, 3)
  absent = color == -2  # a missing phrase fits any object, so every statement can try all 3! assignments
  match = absent | ((color == ocolor) & (shape == oshape) & ((size == -1) | (size == osize)))  # (T, 3, S, 3)
  scenes = np.arange(attrs.shape[0])
  fits = np.zeros((phrases.shape[0], attrs.shape[0]), bool)
  # Slots past a scene's objects never match a present phrase, so the permutations of all 3 slots are exactly the
  # injective assignments of a statement's phrases to a scene's objects (each repeated for the absent phrases).
  for perm in itertools.permutations(range(_MAX_OBJECTS)):
    perm = np.array(perm)
    ok = match[:, 0, :, perm[0]] & match[:, 1, :, perm[1]] & match[:, 2, :, perm[2]]  # (T, S)
    subject, predicate, obj = perm[relation[:, 0]], relation[:, 1], perm[relation[:, 2]]
    ok &= loose[predicate[:, None], scenes[None, :], subject[:, None], obj[:, None]]
    fits |= ok
  return fits & allowed[:, counts]


def fit_matrix(scenes: Sequence[shapes_render.Scene], captions: Sequence[str]) -> np.ndarray:
  """Which captions fit which scenes: (num_captions, num_images) bool, [c, i] = `caption_fits(captions[c], scenes[i])`.

  Each distinct caption is parsed once, and fitted to all scenes at once. ValueError names a caption without a
  reading.
  """
  distinct, inverse = np.unique(np.asarray(captions, dtype=object), return_inverse=True)
  attrs, counts, loose = _encode_scenes(scenes)
  fits = np.zeros((len(distinct), len(scenes)), bool)
  for start in range(0, len(distinct), _CAPTIONS_PER_STEP):
    readings = [shapes_captions.parse_caption(text) for text in distinct[start:start + _CAPTIONS_PER_STEP]]
    block = _statements_fit(*_encode_statements([s for r in readings for s in r]), attrs, counts, loose)
    first = np.cumsum([0] + [len(r) for r in readings[:-1]])  # each caption's first reading
    fits[start:start + len(readings)] = np.logical_or.reduceat(block, first, axis=0)  # any reading fits
  return fits[inverse.reshape(-1)]


def expected_text_recalls(num_fitting: np.ndarray, at: tuple[int, ...] = RECALL_AT) -> dict[int, float]:
  """Text queries: num_fitting (Q,) images fit each, one of them its own -> {K: expected R@K in percent}."""
  n = np.asarray(num_fitting, np.float64)
  return {k: 100.0 * float(np.mean(np.minimum(k, n) / n)) for k in at}


def expected_image_recalls(num_fitting: np.ndarray, num_own: np.ndarray, at: tuple[int, ...] = RECALL_AT
                           ) -> dict[int, float]:
  """Image queries: num_fitting (Q,) captions fit each, num_own (Q,) >= 1 of them its own -> {K: expected R@K in %}.

  R@K = 1 - C(n - m, K) / C(n, K): the chance that the first K of a random order hold an own caption. The ratio is
  the product over j < K of (n - m - j) / (n - j), which reaches 0 (no all-foreign top K) before n - j does.
  """
  n, m = np.asarray(num_fitting, np.float64), np.asarray(num_own, np.float64)
  out = {}
  for k in at:
    none_own = np.ones_like(n)
    for j in range(k):
      none_own *= np.maximum(n - m - j, 0) / np.maximum(n - j, 1)
    out[k] = 100.0 * float(np.mean(1.0 - none_own))
  return out


def oracle_metrics(scenes: Sequence[shapes_render.Scene], captions: Sequence[str], text_to_image: np.ndarray
                   ) -> dict[str, float]:
  """The oracle's expected recalls, keyed like `metrics.retrieval_metrics` (METRIC_KEYS), in percent.

  Args:
    scenes: the scenes of the images, in image order.
    captions: (num_texts,) the true captions of all images.
    text_to_image: (num_texts,) int, the image each caption describes; every image needs at least one.

  Raises ValueError naming a caption that does not parse or does not fit its own image (the grammar and the scene
  are ours, so either is a bug).
  """
  text_to_image = np.asarray(text_to_image)
  if text_to_image.shape != (len(captions),):
    raise ValueError(f'text_to_image has shape {text_to_image.shape}, expected ({len(captions)},)')
  if len(captions) and (text_to_image.min() < 0 or text_to_image.max() >= len(scenes)):
    raise ValueError(f'text_to_image indexes images outside [0, {len(scenes)})')
  fits = fit_matrix(scenes, captions)  # (T, I)
  false = np.flatnonzero(~fits[np.arange(len(captions)), text_to_image])
  if false.size:
    c = int(false[0])
    raise ValueError(f'caption {captions[c]!r} does not fit its own image {int(text_to_image[c])} '
                     f'({scenes[text_to_image[c]]}); {false.size} captions in all')
  num_own = np.bincount(text_to_image, minlength=len(scenes))  # all fit: checked above
  if np.any(num_own == 0):
    raise ValueError(f'{int(np.sum(num_own == 0))} images have no caption; first: {np.flatnonzero(num_own == 0)[:5]}')
  t2i = expected_text_recalls(fits.sum(1))
  i2t = expected_image_recalls(fits.sum(0), num_own)
  metrics = {f'i2t_r{k}': v for k, v in i2t.items()} | {f't2i_r{k}': v for k, v in t2i.items()}
  metrics['r_mean'] = float(np.mean(list(metrics.values())))
  return metrics
