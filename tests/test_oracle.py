"""The oracle ceiling: which captions fit which scenes, and the expected recalls of a random order among the fits.

Hand-built scenes pin the rules (binding, relation, count, distinct objects); generated scenes check the vectorised
fit against the per-scene reference; random orders are enumerated to check the recall formulas.
"""

import itertools
import re

import numpy as np
import pytest

from xmodal.data.shapes import builder as shapes, captions as shapes_captions, render as shapes_render
from xmodal.data.shapes.captions import Phrase, Statement, caption_fits, parse_caption
from xmodal.data.shapes.render import Obj, Scene
from xmodal.evaluation import oracle
from xmodal.evaluation.metrics import METRIC_KEYS

SMALL, LARGE = 5.44, 9.28  # radii of a 64 px image


def _obj(color, shape, size, x, y):
  return Obj(color, shape, size, x, y, SMALL if size == 'small' else LARGE)


# Scenes named by what tells them apart; relations are the stored (clear) ones.
GALLERY = {
    'red_circle_left_of_small_blue_square': Scene(
        (_obj('red', 'circle', 'large', 16, 32), _obj('blue', 'square', 'small', 48, 32)), (0, 'left', 1)),
    'small_red_circle': Scene((_obj('red', 'circle', 'small', 32, 32),), None),
    'large_red_circle': Scene((_obj('red', 'circle', 'large', 32, 32),), None),
    'three_red_circle_left_of_large_blue_square': Scene(
        (_obj('red', 'circle', 'large', 16, 16), _obj('blue', 'square', 'large', 48, 16),
         _obj('green', 'star', 'small', 32, 50)), (0, 'left', 1)),
    # Red circle loosely left of the blue square, though the stored relation is another pair's.
    'three_loosely_left': Scene(
        (_obj('blue', 'square', 'small', 50, 14), _obj('red', 'circle', 'small', 20, 36),
         _obj('yellow', 'cross', 'large', 48, 48)), (0, 'above', 2)),
    'blue_circle_left_of_red_square': Scene(
        (_obj('blue', 'circle', 'large', 16, 32), _obj('red', 'square', 'large', 48, 32)), (0, 'left', 1)),
    'blue_square_left_of_red_circle': Scene(
        (_obj('blue', 'square', 'small', 16, 32), _obj('red', 'circle', 'large', 48, 32)), (0, 'left', 1)),
}
NAMES = list(GALLERY)


def _fitting(caption):
  return [name for name, scene in GALLERY.items() if caption_fits(caption, scene)]


def test_gallery_scenes_are_valid():
  for scene in GALLERY.values():
    if scene.relation:
      s, predicate, o = scene.relation
      assert shapes_render.relation_holds(scene.objects[s], predicate, scene.objects[o], strict=True)


def test_parse_caption_reads_phrases_in_slot_order_relation_and_counts():
  text = 'there is a small red circle, and a blue box is to the left of one grey star'
  assert parse_caption(text) == (Statement(
      (Phrase('a', 'small', 'red', 'circle'), Phrase('a', None, 'blue', 'box'), Phrase('one', None, 'grey', 'star')),
      (1, 'left', 2), frozenset({3})),)
  (related,) = parse_caption('a big red disk under a cyan rhombus')
  assert related.relation == (0, 'below', 1) and related.counts == frozenset({2, 3})
  assert parse_caption('only a red circle')[0].counts == frozenset({1})
  assert parse_caption('a red circle and a blue square')[0].counts == frozenset({2})


@pytest.mark.parametrize('text', ['a red circle near a blue box', 'a red circle.', 'a circle', ''])
def test_unparseable_caption_raises_naming_it(text):
  with pytest.raises(ValueError, match=re.escape(repr(text))):
    parse_caption(text)
  with pytest.raises(ValueError, match=re.escape(repr(text))):
    oracle.fit_matrix(list(GALLERY.values()), ['a red circle', text])


def test_caption_fits_exactly_one_scene():
  assert _fitting('a large red circle to the left of a small blue square') == ['red_circle_left_of_small_blue_square']


def test_caption_fits_three_scenes_in_the_loosest_relation_reading():
  assert _fitting('a red circle left of a blue square') == [
      'red_circle_left_of_small_blue_square', 'three_red_circle_left_of_large_blue_square', 'three_loosely_left']


def test_colour_swapped_caption_fits_no_scene_with_the_colours_bound_the_other_way():
  assert _fitting('a blue circle left of a red square') == ['blue_circle_left_of_red_square']
  assert _fitting('a blue circle and a red square') == ['blue_circle_left_of_red_square']


def test_reversed_relation_fits_only_where_it_holds():
  assert _fitting('a blue square is left of a red circle') == ['blue_square_left_of_red_circle']


def test_count_implied_by_the_template():
  assert _fitting('only a red circle') == ['small_red_circle', 'large_red_circle']
  assert _fitting('a small red circle') == ['small_red_circle']
  assert _fitting('a red circle and a blue square') == [  # '{A} and {B}' is a two-object template
      'red_circle_left_of_small_blue_square', 'blue_square_left_of_red_circle']
  assert _fitting('three shapes, a red circle, a blue square and a green star') == [
      'three_red_circle_left_of_large_blue_square']


def test_relation_needs_a_displacement_along_its_axis():
  stacked = Scene((_obj('red', 'circle', 'large', 32, 16), _obj('blue', 'square', 'large', 32, 48)), (0, 'above', 1))
  texts = ['a red circle left of a blue square', 'a red circle right of a blue square',
           'a red circle above a blue square', 'a blue square under a red circle', 'a red circle below a blue square']
  want = [False, False, True, True, False]
  assert [caption_fits(t, stacked) for t in texts] == want
  assert oracle.fit_matrix([stacked], texts)[:, 0].tolist() == want


def test_phrases_name_distinct_objects():
  # One red circle cannot be both phrases.
  assert _fitting('a red circle and a red circle') == []
  assert _fitting('a red circle above a red circle') == []


def _enumerated_recall(n, m, k):
  """Fraction of all orders of n candidates (the first m one's own) that put an own one in the top k."""
  orders = list(itertools.permutations(range(n)))
  return 100.0 * sum(any(c < m for c in order[:k]) for order in orders) / len(orders)


@pytest.mark.parametrize('n', range(1, 8))
def test_expected_recalls_equal_enumerated_random_orders(n):
  for m in range(1, n + 1):
    for k in (1, 2, 5, 10):
      got = oracle.expected_image_recalls(np.array([n]), np.array([m]), at=(k,))[k]
      assert got == pytest.approx(_enumerated_recall(n, m, k)), (n, m, k)
  text = oracle.expected_text_recalls(np.array([n]))
  for k in (1, 5, 10):
    assert text[k] == pytest.approx(_enumerated_recall(n, 1, k))


def test_oracle_metrics_equal_enumerated_random_orders_on_the_gallery():
  captions = ['a red circle left of a blue square', 'only a red circle', 'a small red circle',
              'a large red circle is right of a small blue box', 'just a big red disk',
              'a blue square is left of a red circle', 'a red circle and a blue square',
              'a picture of a blue circle left of a red square', 'a red circle left of a blue block, and a green star',
              'a small red circle is above a large yellow cross']
  text_to_image = np.array([0, 1, 1, 6, 2, 6, 6, 5, 3, 4])
  scenes = list(GALLERY.values())
  fits = np.array([[caption_fits(c, s) for s in scenes] for c in captions])
  assert fits[np.arange(len(captions)), text_to_image].all()
  want = {}
  for k in (1, 5, 10):
    want[f't2i_r{k}'] = np.mean([_enumerated_recall(n, 1, k) for n in fits.sum(1)])
    want[f'i2t_r{k}'] = np.mean([
        _enumerated_recall(int(fits[:, i].sum()), int(np.sum(text_to_image == i)), k) for i in range(len(scenes))])
  want['r_mean'] = np.mean(list(want.values()))
  got = oracle.oracle_metrics(scenes, captions, text_to_image)
  assert tuple(got) == METRIC_KEYS
  assert got == pytest.approx(want)
  assert got['t2i_r1'] < 100.0  # the gallery is ambiguous by design


def test_oracle_metrics_raise_for_a_caption_false_of_its_own_image():
  scenes = list(GALLERY.values())
  with pytest.raises(ValueError, match='only a red circle'):
    oracle.oracle_metrics(scenes, ['only a red circle'] + ['a red circle'] * (len(scenes) - 1),
                          np.arange(len(scenes)))


def _generated(num_scenes, seed):
  """(scenes, captions, text_to_image, hard negatives) from the dataset's own generator."""
  rng = np.random.default_rng(seed)
  scenes, texts, text_to_image, negatives = [], [], [], []
  for i in range(num_scenes):
    scene = shapes_render.sample_scene(rng)
    scenes.append(scene)
    for text in shapes_captions.captions(scene, rng):
      texts.append(text)
      text_to_image.append(i)
    pair = shapes_captions.hard_pair(scene, rng)
    if pair is not None:
      negatives.append((i, pair))
  return scenes, texts, np.array(text_to_image), negatives


def test_fit_matrix_equals_per_scene_caption_fits_on_generated_scenes():
  scenes, texts, _, negatives = _generated(150, seed=0)
  texts = texts + [text for _, pair in negatives for text in pair[:2]]
  fits = oracle.fit_matrix(scenes, texts)
  readings = {text: parse_caption(text) for text in set(texts)}
  want = np.array([[caption_fits(readings[text], scene) for scene in scenes] for text in texts])
  np.testing.assert_array_equal(fits, want)
  # A gallery where the check has teeth: captions that fit one scene, several, and none.
  per_caption = fits.sum(1)
  assert (per_caption == 1).any() and (per_caption > 1).any() and (per_caption == 0).any()


def test_generated_captions_fit_their_scene_and_hard_negatives_do_not():
  scenes, texts, text_to_image, negatives = _generated(400, seed=1)
  for text, i in zip(texts, text_to_image):
    assert caption_fits(text, scenes[i]), (text, scenes[i])
  assert len(negatives) > 100
  for i, (positive, negative, _) in negatives:
    assert caption_fits(positive, scenes[i]), (positive, scenes[i])
    assert not caption_fits(negative, scenes[i]), (negative, scenes[i])


def test_load_split_rebuilds_scenes_that_their_captions_fit(tmp_path):
  config = shapes.shapes_config(seed=0, train_size=40, validation_size=10, test_size=10, test_hard_size=12,
                                validation_hard_size=6)
  shapes.XmodalShapes(data_dir=tmp_path, config=config, num_workers=1).download_and_prepare()
  for split, size, per_image in (('test', 10, 5), ('validation', 10, 5), ('test_hard', 12, 1)):
    scenes, captions = shapes.load_split(split, data_dir=tmp_path, config=config)
    assert len(scenes) == len(captions) == size
    for i, (scene, texts) in enumerate(zip(scenes, captions)):
      assert len(texts) == per_image and all(isinstance(t, str) for t in texts)
      assert all(caption_fits(t, scene) for t in texts), (texts, scene)
      if scene.relation:  # the stored relation is the clear one it was built with
        s, predicate, o = scene.relation
        assert shapes_render.relation_holds(scene.objects[s], predicate, scene.objects[o], strict=True)
      else:
        assert len(scene.objects) == 1, i
  scenes, captions = shapes.load_split('test', data_dir=tmp_path, config=config)
  flat = [t for texts in captions for t in texts]
  metrics = oracle.oracle_metrics(scenes, flat, np.repeat(np.arange(len(scenes)), 5))
  assert tuple(metrics) == METRIC_KEYS and all(0 < v <= 100 for v in metrics.values())
