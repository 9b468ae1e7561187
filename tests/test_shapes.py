"""The embedded shapes dataset: deterministic, sized as asked, captions true of their pixels, hard negatives false.

Captions are checked with a parser written here from the grammar's documented form (`det [size] colour shape`),
against the stored object metadata and the image's pixels, not with the generator's own helpers.
"""

import collections
import dataclasses
import re

import numpy as np
import pytest

import tensorflow_datasets as tfds  # noqa: E402

from xmodal.data.shapes import builder as shapes  # pylint: disable=g-import-not-at-top
from xmodal.data.shapes import render as shapes_render

SIZES = {'train_size': 40, 'validation_size': 10, 'test_size': 10, 'test_hard_size': 12, 'validation_hard_size': 6}
SPLITS = {'train': 40, 'validation': 10, 'test': 10, 'test_hard': 12, 'validation_hard': 6}

COLOR = {'red': 'red', 'green': 'green', 'blue': 'blue', 'yellow': 'yellow', 'purple': 'purple', 'pink': 'pink',
         'white': 'white', 'gray': 'gray', 'grey': 'gray', 'cyan': 'cyan', 'brown': 'brown'}
SHAPE = {'circle': 'circle', 'disk': 'circle', 'square': 'square', 'box': 'square', 'block': 'square',
         'triangle': 'triangle', 'star': 'star', 'cross': 'cross', 'diamond': 'diamond', 'rhombus': 'diamond'}
SIZE = {'small': 'small', 'little': 'small', 'tiny': 'small', 'large': 'large', 'big': 'large'}
RELATION = {'left': 'left', 'right': 'right', 'above': 'above', 'over': 'above', 'top': 'above',
            'below': 'below', 'under': 'below', 'beneath': 'below', 'underneath': 'below'}
COUNT = {'only': 1, 'just': 1, 'two': 2, 'three': 3}


def _build(tmp_path_factory, seed, num_workers=1):
  builder = shapes.XmodalShapes(data_dir=tmp_path_factory.mktemp(f'shapes{seed}'),
                                config=shapes.shapes_config(seed=seed, **SIZES), num_workers=num_workers)
  builder.download_and_prepare()
  return builder


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  return _build(tmp_path_factory, seed=0)


def _records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def _objects(record):
  """The stored metadata as a list of dicts with names, not label ids."""
  o = record['objects']
  return [{'color': shapes_render.COLORS[c], 'shape': shapes_render.SHAPES[s], 'size': shapes_render.SIZES[z],
           'x': float(x), 'y': float(y), 'r': float(r)}
          for c, s, z, x, y, r in zip(o['color'], o['shape'], o['size'], o['x'], o['y'], o['radius'])]


def _words(caption):
  return re.findall(r'[a-z]+|[,:]', caption)


def _parse(caption):
  """(phrases, relation): phrases = [(position, size or None, colour, shape)], relation = (i, predicate, j) or None."""
  words = _words(caption)
  phrases = []
  for k, w in enumerate(words):
    if w in SHAPE:
      assert words[k - 1] in COLOR, caption
      phrases.append((k, SIZE.get(words[k - 2]) if k >= 2 else None, COLOR[words[k - 1]], SHAPE[w]))
  keys = [k for k, w in enumerate(words) if w in RELATION]
  assert len(keys) <= 1, caption
  relation = None
  if keys:
    k = keys[0]
    before = max(i for i, p in enumerate(phrases) if p[0] < k)
    after = min(i for i, p in enumerate(phrases) if p[0] > k)
    relation = (before, RELATION[words[k]], after)
  return phrases, relation


def _matches(phrase, obj):
  _, size, color, shape = phrase
  return obj['color'] == color and obj['shape'] == shape and size in (None, obj['size'])


def _holds(a, predicate, b, strict):
  """`a` is `predicate` of `b`: strict = dominant axis and apart; loose = any displacement that way."""
  dx, dy = b['x'] - a['x'], b['y'] - a['y']
  along, across = {'left': (dx, dy), 'right': (-dx, dy), 'above': (dy, dx), 'below': (-dy, dx)}[predicate]
  if not strict:
    return along > 0
  return along >= a['r'] + b['r'] and abs(across) <= 0.5 * along


def _statement_true(objects, first, predicate, second, strict):
  return any(a is not b and _matches(first, a) and _matches(second, b) and _holds(a, predicate, b, strict)
             for a in objects for b in objects)


def test_split_sizes_and_ids(builder):
  for split, n in SPLITS.items():
    assert builder.info.splits[split].num_examples == n
    records = _records(builder, split)
    assert [int(r['image_id']) for r in records] == list(range(n))  # record i is image i
    for r in records:
      assert r['image'].shape == (64, 64, 3) and r['image'].dtype == np.uint8
      assert len(r['captions']) == (1 if split in shapes.HARD_SPLITS else 5)
      assert (r['negative_caption'] != b'') == (split in shapes.HARD_SPLITS)


def test_same_seed_same_dataset_other_seed_different(builder, tmp_path_factory, monkeypatch):
  # The rebuild renders in a pool of worker processes: it must not change a byte.
  monkeypatch.setattr(shapes.XmodalShapes, 'MIN_EXAMPLES_PER_WORKER', 4)
  again = _build(tmp_path_factory, seed=0, num_workers=2)
  other = _build(tmp_path_factory, seed=1)
  for split in SPLITS:
    a, b, c = _records(builder, split), _records(again, split), _records(other, split)
    for ra, rb in zip(a, b):
      np.testing.assert_array_equal(ra['image'], rb['image'])
      assert ra['captions'] == rb['captions'] and ra['negative_caption'] == rb['negative_caption']
    assert any(not np.array_equal(ra['image'], rc['image']) for ra, rc in zip(a, c))
    assert [r['captions'] for r in a] != [r['captions'] for r in c]


def test_captions_describe_their_image(builder):
  for split in SPLITS:
    for record in _records(builder, split):
      objects = _objects(record)
      assert 1 <= len(objects) <= 3
      if len(objects) >= 2:  # the stored relation is a clear one
        rel = record['relation']
        assert _holds(objects[rel['subject']], shapes_render.RELATIONS[rel['predicate'] - 1],
                      objects[rel['object']], strict=True)
      texts = [c.decode() for c in record['captions']]
      assert len(set(texts)) == len(texts), texts
      for caption in texts:
        phrases, relation = _parse(caption)
        assert phrases, caption
        # Each phrase names exactly one object, and no object twice.
        named = [[i for i, o in enumerate(objects) if _matches(p, o)] for p in phrases]
        assert all(len(n) == 1 for n in named), (caption, objects)
        assert len({n[0] for n in named}) == len(named), caption
        if relation is not None:
          i, predicate, j = relation
          assert _holds(objects[named[i][0]], predicate, objects[named[j][0]], strict=True), (caption, objects)
        for word, count in COUNT.items():
          if word in _words(caption):
            assert len(objects) == count, caption


def test_pixels_show_the_objects_and_nothing_else(builder):
  for record in _records(builder, 'train'):
    image, objects = record['image'], _objects(record)
    for o in objects:  # every shape covers its centre pixel in its flat colour (up to JPEG's loss)
      centre = image[int(o['y']), int(o['x'])].astype(int)
      nearest = min(shapes_render.PALETTE, key=lambda c: np.abs(centre - shapes_render.PALETTE[c]).sum())
      assert nearest == o['color'] and np.abs(centre - shapes_render.PALETTE[o['color']]).max() <= 24, (centre, o)
    # Any bright pixel belongs to some object's disc: the background stays dark, nothing undescribed is drawn.
    ys, xs = np.nonzero(image.max(-1) > 100)
    near = np.zeros(len(xs), bool)
    for o in objects:
      near |= np.hypot(xs + 0.5 - o['x'], ys + 0.5 - o['y']) <= 1.2 * o['r'] + 1
    assert near.all()


def test_hard_negative_breaks_exactly_one_binding(builder):
  kinds = collections.Counter()
  for record in _records(builder, 'test_hard') + _records(builder, 'validation_hard'):
    objects = _objects(record)
    positive, negative = record['captions'][0].decode(), record['negative_caption'].decode()
    pw, nw = _words(positive), _words(negative)
    assert sorted(pw) == sorted(nw) and pw != nw  # same multiset of words
    (pp, prel), (nph, nrel) = _parse(positive), _parse(negative)
    assert prel is not None and nrel is not None and len(pp) == len(nph) == 2
    diff = [k for k in range(len(pw)) if pw[k] != nw[k]]
    if len(diff) == 2 and all(pw[k] in COLOR for k in diff):  # the two colour words swapped
      kinds['colors'] += 1
    else:  # the two phrases swapped (determiners aside): the relation reversed
      assert [p[1:] for p in nph] == [p[1:] for p in pp[::-1]] and nrel[1] == prel[1], (positive, negative)
      kinds['relation'] += 1
    assert _statement_true(objects, pp[prel[0]], prel[1], pp[prel[2]], strict=True), (positive, objects)
    assert not _statement_true(objects, nph[nrel[0]], nrel[1], nph[nrel[2]], strict=False), (negative, objects)
  assert kinds['colors'] and kinds['relation'], kinds


def test_binding_kind_says_whether_only_the_relation_is_false():
  from xmodal.data.shapes import captions as shapes_captions
  from xmodal.data.shapes.render import Obj, Scene
  kind = shapes_captions.binding_kind

  def scene(*objects):  # the first object left of the second (x 16 and 48)
    return Scene(tuple(Obj(c, s, z, x, 32.0, 6.0) for (c, s, z), x in zip(objects, (16.0, 48.0, 32.0))), (0, 'left', 1))

  red_circle_blue_box = scene(('red', 'circle', 'small'), ('blue', 'square', 'large'))
  assert kind(red_circle_blue_box, 'a blue circle left of a red box') == 'colours'  # no blue circle, no red box
  assert kind(red_circle_blue_box, 'a blue box left of a red circle') == 'relation'  # phrases swapped
  assert kind(red_circle_blue_box, 'a large blue block is to the left of one small red disk') == 'relation'
  # Objects that differ only in colour: swapping their colours is swapping them.
  two_circles = scene(('red', 'circle', 'small'), ('blue', 'circle', 'small'))
  assert kind(two_circles, 'a blue circle left of a red circle') == 'relation'
  assert kind(two_circles, 'a small blue circle left of a red disk') == 'relation'
  # ... unless their sizes tell them apart, and a phrase says so.
  two_sizes = scene(('red', 'circle', 'small'), ('blue', 'circle', 'large'))
  assert kind(two_sizes, 'a small blue circle left of a large red circle') == 'colours'
  assert kind(two_sizes, 'a small blue circle left of a red circle') == 'colours'  # no small blue circle
  assert kind(two_sizes, 'a blue circle left of a red circle') == 'relation'
  # A third object can make a swapped phrase true.
  with_third = scene(('red', 'circle', 'small'), ('blue', 'square', 'small'), ('blue', 'circle', 'small'))
  assert kind(with_third, 'a blue circle left of a red square') == 'colours'
  assert kind(with_third, 'a blue circle left of a red circle') == 'relation'  # the third is a blue circle
  with pytest.raises(ValueError, match='states no relation'):
    kind(red_circle_blue_box, 'a red circle and a blue box')
  # Against the kind `hard_pair` drew, on generated scenes: a drawn relation reversal always reads as one; a drawn
  # colour swap reads as a relation reversal exactly when the swapped objects have the same shape and size.
  rng = np.random.default_rng(3)
  counts = collections.Counter()
  for _ in range(400):
    generated = shapes_render.sample_scene(rng, 64, min_objects=2)
    pair = shapes_captions.hard_pair(generated, rng)
    if pair is None:
      continue
    positive, negative, drawn = pair
    read = kind(generated, negative)
    counts[drawn, read] += 1
    if drawn == 'relation':
      assert read == 'relation', (positive, negative, generated)
    elif len(generated.objects) == 2:  # no third object that a swapped phrase could name
      a, b = generated.objects
      (statement,) = shapes_captions.parse_caption(positive)
      no_sizes = all(phrase.size is None for phrase in statement.phrases)
      assert (read == 'relation') == (a.shape == b.shape and (a.size == b.size or no_sizes)), (positive, negative)
  assert counts['relation', 'relation'] > 50 and counts['colors', 'colours'] > 50, counts
  assert counts['colors', 'relation'] > 5, counts  # same-shape colour swaps occur


def test_training_images_carry_a_false_negative_per_caption(builder):
  from xmodal.data.shapes import captions as shapes_captions
  for record in _records(builder, 'train'):
    scene = shapes.record_scene(record)
    negatives = [n.decode() for n in record['negative_captions']]
    assert len(negatives) == len(record['captions'])
    for caption, negative in zip(record['captions'], negatives):
      assert negative and negative != caption.decode()
      assert not shapes_captions.caption_fits(negative, scene), (caption, negative)
  for split in SPLITS:
    if split != 'train':
      assert all(len(r['negative_captions']) == 0 for r in _records(builder, split))


def test_training_images_come_in_minimal_pairs(builder):
  from xmodal.data.shapes import captions as shapes_captions
  records = _records(builder, 'train')
  paired = 0
  for first, second in zip(records[::2], records[1::2]):
    a, b = shapes.record_scene(first), shapes.record_scene(second)
    # Every caption of one image is false of the other: in one batch, each is the other's hard negative.
    assert not any(shapes_captions.caption_fits(c.decode(), b) for c in first['captions'])
    assert not any(shapes_captions.caption_fits(c.decode(), a) for c in second['captions'])
    # One fact apart: same object count, and at most two objects differ.
    if len(a.objects) == len(b.objects):
      differ = sum((o.color, o.shape, o.x, o.y) != (p.color, p.shape, p.x, p.y) for o, p in zip(a.objects, b.objects))
      paired += 1 <= differ <= 2
  assert paired >= len(records) // 2 - 2  # an image without a minimal pair gets an independent neighbour


def test_perturbations_change_one_fact():
  rng = np.random.default_rng(0)
  kinds = collections.Counter()
  for _ in range(100):
    scene = shapes_render.sample_scene(rng, 64)
    for kind, other in shapes_render.perturbations(scene, 64):
      kinds[kind] += 1
      assert len({(o.color, o.shape) for o in other.objects}) == len(other.objects)
      pairs = [(o, p) for o, p in zip(scene.objects, other.objects) if o != p]
      if kind in ('shape', 'colour'):
        assert len(pairs) == 1
        (o, p), = pairs
        field = 'shape' if kind == 'shape' else 'color'
        assert getattr(o, field) != getattr(p, field) and dataclasses.replace(o, **{field: getattr(p, field)}) == p
      elif kind == 'colours':
        (o1, p1), (o2, p2) = pairs
        assert (p1.color, p2.color) == (o2.color, o1.color) and (p1.shape, p2.shape) == (o1.shape, o2.shape)
      else:  # the related pair swapped places: the stated relation now holds the other way round
        s, predicate, t = scene.relation
        assert other.relation == (t, predicate, s)
        assert shapes_render.relation_holds(other.objects[t], predicate, other.objects[s])
        assert not shapes_render.relation_holds(other.objects[s], predicate, other.objects[t], strict=False)
  assert all(kinds[k] for k in shapes_render.PERTURBATIONS), kinds


def test_example_is_independent_of_split_size():
  small = shapes.shapes_config(train_size=5)
  large = shapes.shapes_config(train_size=50)
  for i in range(5):
    a, b = shapes.make_example(small, 'train', i), shapes.make_example(large, 'train', i)
    assert a['image'] == b['image'] and a['captions'] == b['captions']
