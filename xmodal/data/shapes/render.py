"""Scenes of the embedded shapes dataset: what objects are where, and their pixels.

A scene is 1-3 flat-coloured objects on a dark, lightly textured background. When it holds two or more objects, one
pair stands in a clear spatial relation (left of, right of, above, below): the pair is placed so that the relation's
axis dominates (|off-axis offset| <= half the on-axis offset) and their extents do not overlap along that axis, so no
reader could call it anything else. No two objects overlap, and no two share both colour and shape, so a phrase like
"red circle" names exactly one object.

Pure numpy: no TensorFlow, so the tokenizer and tests can use it on a host without TF.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np

# Colour names and their RGB. Every colour has a channel >= 140, far from the background (<= 80), and no name starts
# with a vowel, so the article is always "a" and a hard negative keeps the same multiset of words.
PALETTE: dict[str, tuple[int, int, int]] = {
    'red': (220, 30, 30),
    'green': (40, 180, 60),
    'blue': (40, 80, 235),
    'yellow': (240, 220, 40),
    'purple': (150, 60, 210),
    'pink': (250, 140, 200),
    'white': (245, 245, 245),
    'gray': (150, 150, 150),
    'cyan': (40, 220, 230),
    'brown': (150, 90, 40),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ('circle', 'square', 'triangle', 'star', 'cross', 'diamond')
SIZES: tuple[str, ...] = ('small', 'large')
# Predicate p means "subject is p of object", e.g. 'left' = subject to the left of object.
RELATIONS: tuple[str, ...] = ('left', 'right', 'above', 'below')
INVERSE: dict[str, str] = {'left': 'right', 'right': 'left', 'above': 'below', 'below': 'above'}

# Bounding radius of an object as a fraction of the image side.
_RADIUS = {'small': 0.085, 'large': 0.145}
_MARGIN = 1.5  # pixels kept free between any two objects and between an object and the border


@dataclasses.dataclass(frozen=True)
class Obj:
  """One object; x, y, radius in pixels (x to the right, y down, pixel centres at +0.5)."""
  color: str
  shape: str
  size: str
  x: float
  y: float
  radius: float


@dataclasses.dataclass(frozen=True)
class Scene:
  """Objects of one image; `relation` = (subject index, predicate, object index) or None for one object."""
  objects: tuple[Obj, ...]
  relation: tuple[int, str, int] | None


def relation_holds(a: Obj, predicate: str, b: Obj, *, strict: bool = True) -> bool:
  """Whether `a` is `predicate` of `b`.

  strict: the unambiguous form scenes are built with (dominant axis, extents apart along it). Otherwise the loosest
  reading (any displacement that way at all): a hard negative must fail even this one.
  """
  # Displacement of b from a along the predicate's axis (positive when the predicate holds) and across it.
  along, across = {'left': (b.x - a.x, b.y - a.y), 'right': (a.x - b.x, b.y - a.y),
                   'above': (b.y - a.y, b.x - a.x), 'below': (a.y - b.y, b.x - a.x)}[predicate]
  if not strict:
    return along > 0
  return along >= a.radius + b.radius + _MARGIN and abs(across) <= 0.5 * along


def _free(xs: np.ndarray, ys: np.ndarray, r: float, placed: list[Obj]) -> np.ndarray:
  """Which candidate centres xs, ys (K,) keep a new object of radius r clear of every placed object."""
  ok = np.ones(xs.shape, bool)
  for o in placed:  # bounding circles apart, with slack: a square's corner pokes 13 % past its radius
    ok &= np.hypot(xs - o.x, ys - o.y) >= 1.15 * (r + o.radius) + _MARGIN
  return ok


def _clear_of(xs: np.ndarray, ys: np.ndarray, r: float, a: Obj, predicate: str) -> np.ndarray:
  """Which candidate centres put an object of radius r so that `a` is clearly `predicate` of it (vectorised form
  of `relation_holds(a, predicate, candidate)`)."""
  along, across = {'left': (xs - a.x, ys - a.y), 'right': (a.x - xs, ys - a.y),
                   'above': (ys - a.y, xs - a.x), 'below': (a.y - ys, xs - a.x)}[predicate]
  return (along >= a.radius + r + _MARGIN) & (np.abs(across) <= 0.5 * along)


def sample_scene(rng: np.random.Generator, image_size: int = 64, min_objects: int = 1, max_objects: int = 3) -> Scene:
  """Draws a scene: object count, attributes, non-overlapping positions, one clear relation when >= 2 objects.

  Positions come from batches of uniform candidates (the first that fits wins): one rng call per object instead of a
  Python rejection loop.
  """
  n = int(rng.integers(min_objects, max_objects + 1))
  kinds = rng.choice(len(COLORS) * len(SHAPES), size=n, replace=False)  # distinct (colour, shape) pairs
  attrs = [(COLORS[k // len(SHAPES)], SHAPES[k % len(SHAPES)], SIZES[rng.integers(len(SIZES))]) for k in kinds]
  predicate = RELATIONS[rng.integers(len(RELATIONS))] if n >= 2 else None
  for _ in range(100):  # a restart is rare; the bound only guards against an impossible request (a tiny image)
    placed: list[Obj] = []
    for i, (color, shape, size) in enumerate(attrs):
      r = _RADIUS[size] * image_size
      lo, hi = r + _MARGIN, image_size - r - _MARGIN
      xs, ys = rng.uniform(lo, hi, size=(2, 64))
      ok = _free(xs, ys, r, placed)
      if i == 1:
        ok &= _clear_of(xs, ys, r, placed[0], predicate)
      if not ok.any():
        break
      k = int(np.argmax(ok))
      placed.append(Obj(color, shape, size, float(xs[k]), float(ys[k]), r))
    if len(placed) == n:
      return Scene(tuple(placed), (0, predicate, 1) if predicate else None)
  raise ValueError(f'cannot place {n} objects in a {image_size}px image')


PERTURBATIONS = ('shape', 'colour', 'colours', 'relation')


def perturbations(scene: Scene, image_size: int) -> list[tuple[str, Scene]]:
  """Every scene one fact away from `scene`: its minimal pairs, as (kind, scene), kinds as PERTURBATIONS:

  - 'shape' / 'colour': one object's shape (colour) changed, where and as big as it was;
  - 'colours': the colours of two objects that differ in colour and shape exchanged (a binding changed);
  - 'relation': the related pair's places exchanged (the relation reversed), when both still fit there.
  Colour-shape pairs stay distinct, so a phrase still names at most one object.
  """
  out = []
  pairs = {(o.color, o.shape) for o in scene.objects}

  def with_objects(objects, relation=scene.relation):
    return Scene(tuple(objects), relation)

  for j, o in enumerate(scene.objects):
    for kind, field, options in (('shape', 'shape', SHAPES), ('colour', 'color', COLORS)):
      for value in options:
        changed = dataclasses.replace(o, **{field: value})
        if value != getattr(o, field) and (changed.color, changed.shape) not in pairs:
          out.append((kind, with_objects(scene.objects[:j] + (changed,) + scene.objects[j + 1:])))
  for a, b in itertools.combinations(range(len(scene.objects)), 2):
    oa, ob = scene.objects[a], scene.objects[b]
    if oa.color != ob.color and oa.shape != ob.shape:
      swapped = list(scene.objects)
      swapped[a], swapped[b] = dataclasses.replace(oa, color=ob.color), dataclasses.replace(ob, color=oa.color)
      if len({(o.color, o.shape) for o in swapped}) == len(swapped):
        out.append(('colours', with_objects(swapped)))
  if scene.relation is not None:
    s, predicate, t = scene.relation
    moved = list(scene.objects)
    moved[s] = dataclasses.replace(scene.objects[s], x=scene.objects[t].x, y=scene.objects[t].y)
    moved[t] = dataclasses.replace(scene.objects[t], x=scene.objects[s].x, y=scene.objects[s].y)
    if _fits(moved, image_size) and relation_holds(moved[t], predicate, moved[s]):
      out.append(('relation', with_objects(moved, (t, predicate, s))))
  return out


def _fits(objects: list[Obj], image_size: int) -> bool:
  """Whether every object lies inside the image, clear of the border and of each other (as sample_scene places)."""
  for i, o in enumerate(objects):
    if not (o.radius + _MARGIN <= o.x <= image_size - o.radius - _MARGIN
            and o.radius + _MARGIN <= o.y <= image_size - o.radius - _MARGIN):
      return False
    if not _free(np.array([o.x]), np.array([o.y]), o.radius, objects[:i])[0]:
      return False
  return True


def _polygon_mask(px: np.ndarray, py: np.ndarray, vx: np.ndarray, vy: np.ndarray) -> np.ndarray:
  """Even-odd point-in-polygon for pixel centres px, py (H, W) against vertices vx, vy (K,)."""
  inside = np.zeros(px.shape, bool)
  for i in range(len(vx)):
    x0, y0, x1, y1 = vx[i - 1], vy[i - 1], vx[i], vy[i]
    crosses = (y0 > py) != (y1 > py)
    with np.errstate(divide='ignore', invalid='ignore'):
      x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
    inside ^= crosses & (px < x_at)
  return inside


def shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
  """Pixels covered by `shape` of bounding radius r, given offsets dx, dy (H, W) of pixel centres from its centre.

  Every shape covers its centre pixel, so the object's colour is always found at (x, y).
  """
  if shape == 'circle':
    return dx * dx + dy * dy <= r * r
  if shape == 'square':
    h = 0.8 * r
    return (np.abs(dx) <= h) & (np.abs(dy) <= h)
  if shape == 'diamond':
    return np.abs(dx) + np.abs(dy) <= r
  if shape == 'cross':
    arm, t = 0.95 * r, 0.33 * r
    return ((np.abs(dx) <= arm) & (np.abs(dy) <= t)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= t))
  if shape == 'triangle':  # apex up, base below the centre
    angles = np.deg2rad([-90, 30, 150])
    return _polygon_mask(dx, dy, r * np.cos(angles), r * np.sin(angles))
  if shape == 'star':  # five points, inner radius 0.45 r
    angles = np.deg2rad(-90 + 36 * np.arange(10))
    radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    return _polygon_mask(dx, dy, radii * np.cos(angles), radii * np.sin(angles))
  raise ValueError(f'unknown shape {shape!r}; valid: {SHAPES}')


def render_scene(scene: Scene, rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
  """Rasterises a scene: uint8 (S, S, 3), flat-coloured objects on a dark, lightly textured background."""
  # A smooth texture (tint, gradient, faint ripple) rather than per-pixel noise: it keeps encoded images small and fast to decode.
  t = np.arange(image_size) / image_size
  u, v = np.cos(rng.uniform(0, 2 * np.pi, size=2)), np.sin(rng.uniform(0, 2 * np.pi, size=2))
  base = rng.uniform(15, 55) + rng.uniform(-8, 8, size=3)
  gradient = 8 * rng.uniform(-1, 1) * (u[0] * t[None, :] + v[0] * t[:, None])
  ripple = 3 * np.sin(2 * np.pi * rng.uniform(2, 6) * (u[1] * t[None, :] + v[1] * t[:, None]) + rng.uniform(0, 6.3))
  image = np.clip(base + (gradient + ripple)[..., None], 0, 80).astype(np.uint8)
  centres = np.arange(image_size) + 0.5
  for o in scene.objects:
    # Only the object's bounding box is rasterised: cheap at any image size.
    x0, x1 = max(int(o.x - o.radius) - 1, 0), min(int(o.x + o.radius) + 2, image_size)
    y0, y1 = max(int(o.y - o.radius) - 1, 0), min(int(o.y + o.radius) + 2, image_size)
    dx = centres[None, x0:x1] - o.x
    dy = centres[y0:y1, None] - o.y
    dx, dy = np.broadcast_arrays(dx, dy)
    image[y0:y1, x0:x1][shape_mask(o.shape, dx, dy, o.radius)] = PALETTE[o.color]
  return image
