"""The fusion encoder's Locator: where cross-attention looked against a numpy reference, box centres and token
places by hand, the locate loss against a loop, and that the Locator learns from the locate loss only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config, micro_model_config
from xmodal import config as config_lib
from xmodal import losses
from xmodal.models import XModal, build, dummy_inputs, regions
from xmodal.models.attention import attended_positions
from xmodal.train.objective import LossWeights, compute_loss


def test_token_places_and_box_centres_by_hand():
  np.testing.assert_allclose(regions.token_positions(5), [[0, 0], [-0.25, -0.25], [0.25, -0.25], [-0.25, 0.25],
                                                          [0.25, 0.25]])
  boxes = np.array([[0.1, 0.2, 0.3, 0.6], [0.0, 0.0, 1.0, 1.0]], np.float32)  # (ymin, xmin, ymax, xmax)
  np.testing.assert_allclose(regions.box_centres(jnp.asarray(boxes)), [[-0.1, -0.3], [0.0, 0.0]], atol=1e-6)
  with pytest.raises(ValueError, match='6 image tokens'):
    regions.token_positions(6)


def test_where_attention_looked_is_the_attention_weighted_mean_of_key_places():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 3, 2, 4)), rng.normal(size=(2, 5, 2, 4))
  places = rng.uniform(-0.5, 0.5, size=(5, 2))
  mask = np.array([[True] * 5, [True, True, True, False, False]])
  want = np.zeros((2, 3, 2, 2))
  for b in range(2):
    for h in range(2):
      for i in range(3):
        scores = np.array([q[b, i, h] @ k[b, j, h] / 2.0 for j in range(5) if mask[b, j]])  # sqrt(head width 4)
        weights = np.exp(scores - scores.max()) / np.exp(scores - scores.max()).sum()
        want[b, i, h] = weights @ places[mask[b]]
  got = attended_positions(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(places), mask)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # A head that puts all its weight on one key reads that key's place.
  sharp = np.zeros((1, 1, 1, 4)); sharp[..., 0] = 50.0
  keys = np.zeros((1, 5, 1, 4)); keys[0, 3, 0, 0] = 1.0
  np.testing.assert_allclose(attended_positions(jnp.asarray(sharp), jnp.asarray(keys), regions.token_positions(5)),
                             [[[regions.token_positions(5)[3]]]], atol=1e-6)


def test_locate_loss_matches_a_loop():
  rng = np.random.default_rng(1)
  positions, centres = rng.normal(size=(3, 4, 2)), rng.normal(size=(3, 4, 2))
  weight = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
  squares = [np.sum((positions[m, l] - centres[m, l]) ** 2) for m in range(3) for l in range(4) if weight[m, l]]
  loss, metrics = losses.locate_loss(jnp.asarray(positions), jnp.asarray(centres), jnp.asarray(weight))
  np.testing.assert_allclose(loss, np.mean(squares), rtol=1e-5)
  np.testing.assert_allclose(metrics['locate_error'], np.sqrt(np.mean(squares)), rtol=1e-5)


def _model_with_locator():
  config = micro_model_config()
  config.fusion_locator = True
  model = build(config)
  return model, nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])


def _locator_model():
  model, params = _model_with_locator()
  rng = np.random.default_rng(2)
  images = jnp.asarray(rng.normal(size=(2, 17, model.spec.vision.width)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 6, model.spec.text.width)), jnp.float32)
  return model, params, images, text, jnp.ones((2, 6), bool)


def test_the_locator_learns_from_the_locate_loss_only_and_its_places_reach_the_match():
  model, params, images, text, mask = _locator_model()
  variables = lambda p: {'params': p}
  match = lambda p: jnp.sum(model.apply(variables(p), text, mask, images, method=XModal.match))
  locate = lambda p: jnp.sum(model.apply(variables(p), text, mask, images, method=XModal.locate) ** 2)
  norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree))))
  assert norm(jax.grad(match)(params)['fusion']['locator']) == 0.0  # the place enters behind a stop-gradient
  assert norm(jax.grad(locate)(params)['fusion']['locator']) > 0.0
  # ... and it trains the Locator alone: nothing flows back into the words or the image tokens it reads (the towers,
  # and the word window ITM shares), where ITM's gradient does.
  on_inputs = lambda f: jax.grad(f, argnums=(1, 2))
  locate_in = lambda p, t, i: jnp.sum(model.apply(variables(p), t, mask, i, method=XModal.locate) ** 2)
  match_in = lambda p, t, i: jnp.sum(model.apply(variables(p), t, mask, i, method=XModal.match))
  assert norm(on_inputs(locate_in)(params, text, images)) == 0.0
  assert min(map(norm, on_inputs(match_in)(params, text, images))) > 0.0
  assert model.apply(variables(params), text, mask, images, method=XModal.locate).shape == (2, 6, 2)
  fusion = params['fusion']
  unplaced = {**params, 'fusion': {**fusion, 'place': jax.tree.map(jnp.zeros_like, fusion['place'])}}
  assert not np.allclose(model.apply(variables(params), text, mask, images, method=XModal.match),
                         model.apply(variables(unplaced), text, mask, images, method=XModal.match), atol=1e-5)


def test_locate_needs_the_locator_and_regions():
  config = micro_config()
  config.loss.locate_weight = 1.0
  with pytest.raises(ValueError, match='loss.locate_weight: needs regions from the data'):
    config_lib.validate(config)
  config.data.update(region_boxes_key='regions/bbox', region_phrases_key='regions/phrase')
  with pytest.raises(ValueError, match='loss.locate_weight: .*model.fusion_locator=True'):
    config_lib.validate(config)
  config.model.fusion_locator = True
  config_lib.validate(config)
  model = build(micro_model_config())
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  with pytest.raises(ValueError, match='locator'):
    model.apply({'params': params}, jnp.zeros((1, 4, 32)), jnp.ones((1, 4), bool), jnp.zeros((1, 17, 32)),
                method=XModal.locate)


@pytest.mark.slow  # compiles the objective three times
def test_the_objective_locates_each_phrase_and_each_grounded_word_against_its_own_image():
  model, params = _model_with_locator()
  rng = np.random.default_rng(3)
  b, r, length, text_len = 3, 2, 5, model.spec.max_text_len
  boxes = np.sort(rng.uniform(size=(b, r, 4)), axis=-1)[..., [0, 1, 2, 3]].astype(np.float32)
  batch = {'images': jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32),
           'text_ids': jnp.asarray(rng.integers(5, 60, size=(b, text_len)), jnp.int32),
           'text_mask': jnp.asarray(np.arange(text_len)[None] < [[text_len], [text_len - 2], [4]], jnp.int32),
           'image_ids': jnp.arange(b), 'region_boxes': jnp.asarray(boxes),
           'region_ids': jnp.asarray(rng.integers(5, 60, size=(b, r, length)), jnp.int32),
           'region_mask': jnp.asarray(np.arange(length)[None, None] < rng.integers(2, length + 1, (b, r, 1)),
                                      jnp.int32),
           'region_valid': jnp.asarray([[True, True], [True, False], [False, False]])}
  key = jax.random.key(0)
  weights = LossWeights(itm=0.0, locate=0.5, regions_per_example=r, phrase_len=length)
  base, _ = compute_loss(model, params, batch, key, LossWeights(itm=0.0))
  total, metrics = compute_loss(model, params, batch, key, weights)
  # The reference, one phrase at a time against its own image, from the model's public methods.
  variables = {'params': params}
  image_tokens, _ = model.apply(variables, batch['images'], method=XModal.encode_image)
  squares = []
  for i in range(b):
    for j in range(r):
      ids, mask = batch['region_ids'][i, j][None], batch['region_mask'][i, j][None]
      tokens, _ = model.apply(variables, ids, mask, method=XModal.encode_text)
      places = model.apply(variables, tokens, mask, image_tokens[i][None], method=XModal.locate)[0]
      centre = regions.box_centres(batch['region_boxes'][i, j])
      if batch['region_valid'][i, j]:
        squares += [float(jnp.sum((places[l] - centre) ** 2)) for l in range(length) if mask[0, l]]
  np.testing.assert_allclose(metrics['locate_loss'], np.mean(squares), rtol=1e-4)
  np.testing.assert_allclose(total, base + 0.5 * np.mean(squares), rtol=1e-4)
  # Grounded captions (data.caption_grounding): each word that names a region, against that region's centre; words
  # past the caption's end count for nothing even where labelled.
  named = rng.integers(-1, r, size=(b, text_len)).astype(np.int32)
  grounded, grounded_metrics = compute_loss(model, params, {**batch, 'text_regions': jnp.asarray(named)}, key,
                                            weights)
  word_squares = []
  for i in range(b):
    ids, mask = batch['text_ids'][i][None], batch['text_mask'][i][None]
    tokens, _ = model.apply(variables, ids, mask, method=XModal.encode_text)
    places = model.apply(variables, tokens, mask, image_tokens[i][None], method=XModal.locate)[0]
    word_squares += [float(jnp.sum((places[l] - regions.box_centres(batch['region_boxes'][i, named[i, l]])) ** 2))
                     for l in range(text_len) if named[i, l] >= 0 and mask[0, l]]
  np.testing.assert_allclose(grounded_metrics['caption_locate_loss'], np.mean(word_squares), rtol=1e-4)
  np.testing.assert_allclose(grounded, total + 0.5 * np.mean(word_squares), rtol=1e-4)
