"""Hard negatives written from training captions (NegCLIP-style): false of the scene, fed through the pipeline, and
used by ITM as the objective says."""

import collections
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_model_config
from xmodal import losses
from xmodal.data.shapes import captions as shapes_captions, render as shapes_render
from xmodal.models import XModal, build, dummy_inputs
from xmodal.train.objective import LossWeights, compute_loss


def _words(text):
  return sorted(re.findall(r'[a-z]+', text))


def _kind(caption, negative):
  changed = [(a, b) for a, b in zip(caption.split(), negative.split()) if a != b]
  if _words(negative) != _words(caption):
    return 'substitution'
  colours = set(shapes_captions.COLOR_WORDS) | {'grey'}
  return 'colours' if all(a.strip(',') in colours for a, _ in changed) else 'relation'


def test_written_negatives_break_one_fact_and_are_false_of_their_scene():
  rng = np.random.default_rng(0)
  kinds = collections.Counter()
  for _ in range(300):
    scene = shapes_render.sample_scene(rng, 64)
    for caption in shapes_captions.captions(scene, rng, 5):
      negative = shapes_captions.negative_caption(caption, rng, scene)
      assert negative is not None and negative != caption  # a colour or shape can always be changed
      assert len(negative.split()) == len(caption.split())
      assert shapes_captions.caption_fits(caption, scene)
      assert not shapes_captions.caption_fits(negative, scene), (caption, negative, scene)
      kinds[_kind(caption, negative)] += 1
  assert min(kinds.values()) > 100 and len(kinds) == 3, kinds


def test_without_the_scene_only_the_swaps_that_are_always_false_are_written():
  rng = np.random.default_rng(1)
  kinds = collections.Counter()
  for _ in range(300):
    scene = shapes_render.sample_scene(rng, 64)
    for caption in shapes_captions.captions(scene, rng, 5):
      negative = shapes_captions.negative_caption(caption, rng)
      if len(scene.objects) == 1 or negative is None:  # nothing to bind, or a swap would say the same
        assert negative is None or len(scene.objects) > 1
        continue
      assert not shapes_captions.caption_fits(negative, scene), (caption, negative, scene)
      kinds[_kind(caption, negative)] += 1
  assert kinds['colours'] > 100 and kinds['relation'] > 100 and not kinds['substitution'], kinds


def test_a_written_negative_depends_only_on_its_caption_and_key():
  caption = 'a red circle is left of a small blue box, and there is also a green star'
  draws = {shapes_captions.negative_caption(caption, np.random.default_rng([7, k])) for k in range(40)}
  assert len(draws) > 1  # several bindings to break, chosen by the key
  assert shapes_captions.negative_caption(caption, np.random.default_rng([7, 3])) == \
      shapes_captions.negative_caption(caption, np.random.default_rng([7, 3]))


@pytest.mark.slow  # builds shapes (session fixture) and reads it through tf.data
def test_the_training_pipeline_yields_each_captions_negative(shapes_dir):
  from xmodal.data import pipeline
  from xmodal.config.data import data_config
  config = data_config(tfds_name=shapes_dir, image_size=32, max_text_len=24, batch_size=16,
                       negatives_key='negative_captions')
  tokenizer = pipeline.load_tokenizer(config)
  first, again = (next(pipeline.train_iterator(config, tokenizer=tokenizer)) for _ in range(2))
  for key in ('negative_ids', 'negative_mask', 'negative_valid'):
    np.testing.assert_array_equal(first[key], again[key])  # a pure function of the data seed
  assert first['negative_ids'].shape == first['text_ids'].shape
  assert first['negative_valid'].all()  # xmodal_shapes writes one for every training caption
  from xmodal.data import sources
  train = sources.tfds_builder(shapes_dir, '').as_data_source('train')
  for row, image_id in enumerate(first['image_ids']):
    own = [n.decode() for n in train[int(image_id)]['negative_captions']]
    ids, _ = tokenizer.encode(own, 24)
    assert any(np.array_equal(first['negative_ids'][row], i) for i in ids)  # one of its own image's negatives
    assert not np.array_equal(first['negative_ids'][row], first['text_ids'][row])


@pytest.fixture(scope='module')
def micro():
  model = build(micro_model_config())
  params = model.init(jax.random.key(0), *dummy_inputs(model.spec))['params']
  rng = np.random.default_rng(0)
  b, length = 6, model.spec.max_text_len
  batch = {'images': jnp.asarray(rng.normal(size=(b, 32, 32, 3)), jnp.float32),
           'text_ids': jnp.asarray(rng.integers(5, 60, size=(b, length)), jnp.int32),
           'text_mask': jnp.ones((b, length), jnp.int32),
           'image_ids': jnp.arange(b),
           'negative_ids': jnp.asarray(rng.integers(5, 60, size=(b, length)), jnp.int32),
           'negative_mask': jnp.ones((b, length), jnp.int32),
           'negative_valid': jnp.asarray([True, False, True, True, False, True])}
  return model, params, batch


def _reference_itm(model, params, batch, rng, mode, subsample=1):
  """ITM written out from the model's public methods: the pairs the objective's docstring promises, for every
  `subsample`-th example, with negatives drawn over the whole batch."""
  variables = {'params': params}
  image_tokens, image_emb = model.apply(variables, batch['images'], method=XModal.encode_image)
  text_tokens, text_emb = model.apply(variables, batch['text_ids'], batch['text_mask'], method=XModal.encode_text)
  written, _ = model.apply(variables, batch['negative_ids'], batch['negative_mask'], method=XModal.encode_text)
  temperature = model.apply(variables, method=XModal.temperature)
  sim = image_emb @ text_emb.T / temperature
  sample_rng, _ = jax.random.split(rng)  # the objective's split: the other half draws which written ones are used
  neg = losses.sample_hard_negatives(sample_rng, sim, batch['image_ids'])
  rows = np.arange(0, len(sim), subsample)
  valid = np.asarray(batch['negative_valid'])[rows]
  match = lambda t, m, i: model.apply(variables, t, m, i, method=XModal.match)
  mask = batch['text_mask']
  positive = match(text_tokens[rows], mask[rows], image_tokens[rows])
  wrong_image = match(text_tokens[rows], mask[rows], image_tokens[neg.image_for_text[rows]])
  other = neg.text_for_image[rows]
  in_batch_text = match(text_tokens[other], mask[other], image_tokens[rows])
  written_text = match(written[rows], batch['negative_mask'][rows], image_tokens[rows])
  if mode == 'replace':
    image_side = jnp.where(valid[:, None], written_text, in_batch_text)
    negatives = jnp.concatenate([wrong_image, image_side])
  else:
    negatives = jnp.concatenate([wrong_image, in_batch_text, written_text])
  flags = [neg.image_for_text_valid[rows], neg.text_for_image_valid[rows] | (valid if mode == 'replace' else False)]
  if mode == 'add':
    flags.append(valid)
  return losses.matching_loss(positive, negatives, jnp.concatenate(flags))[0]


@pytest.mark.slow  # compiles the ITM objective per mode
@pytest.mark.parametrize('mode, subsample', [('replace', 1), ('add', 1), ('add', 2), ('replace', 3)])
def test_itm_uses_written_negatives_as_the_objective_says(micro, mode, subsample):
  model, params, batch = micro
  rng = jax.random.key(3)
  weights = LossWeights(itc=0.0, itm=1.0, itm_written_negatives=mode, itm_subsample=subsample)
  loss, metrics = compute_loss(model, params, batch, rng, weights)
  np.testing.assert_allclose(loss, _reference_itm(model, params, batch, rng, mode, subsample), rtol=1e-5)
  assert 0.0 <= float(metrics['itm_written_acc']) <= 1.0
  off, off_metrics = compute_loss(model, params, batch, rng, LossWeights(itc=0.0, itm=1.0))
  assert not np.isclose(loss, off) and 'itm_written_acc' not in off_metrics


@pytest.mark.slow  # the micro fixture initialises the model eagerly; compiles the ITM objective
def test_written_negatives_come_in_with_the_hardness_schedule(micro):
  model, params, batch = micro
  weights = LossWeights(itc=0.0, itm=1.0, itm_written_negatives='replace', itm_hard_warmup=100)
  rng = jax.random.key(4)
  # At step 0 (hardness 0) no image gets its written negative: the loss is ALBEF's with uniform negatives.
  at_start, _ = compute_loss(model, params, batch, rng, weights, step=jnp.asarray(0))
  none = dict(batch, negative_valid=jnp.zeros_like(batch['negative_valid']))
  albef, _ = compute_loss(model, params, none, rng, weights, step=jnp.asarray(0))
  np.testing.assert_allclose(at_start, albef, rtol=1e-6)
  # From the end of the warmup on, every image that has one does: the reference with all written negatives.
  after, _ = compute_loss(model, params, batch, rng, weights, step=jnp.asarray(100))
  reference = _reference_itm(model, params, batch, rng, 'replace')
  np.testing.assert_allclose(after, reference, rtol=1e-5)


@pytest.mark.slow  # the micro fixture initialises the model eagerly
def test_replace_without_any_written_negative_is_albef(micro):
  model, params, batch = micro
  none = dict(batch, negative_valid=jnp.zeros_like(batch['negative_valid']))
  rng = jax.random.key(5)
  replaced, _ = compute_loss(model, params, none, rng, LossWeights(itm_written_negatives='replace'))
  albef, _ = compute_loss(model, params, none, rng, LossWeights())
  np.testing.assert_allclose(replaced, albef, rtol=1e-6)


def test_grey_examples_lose_their_colour_words_and_the_negatives_that_only_colours_made(shapes_dir):
  from xmodal.data import pipeline
  from xmodal.config.data import data_config
  colours = tuple(set(shapes_captions.COLOR_WORDS) | {'grey'})
  config = data_config(tfds_name=shapes_dir, image_size=32, max_text_len=24, batch_size=32, mean=(0, 0, 0),
                       std=(1, 1, 1), negatives_key='negative_captions', grayscale_prob=0.5,
                       grayscale_drop_words=colours)
  tokenizer = pipeline.load_tokenizer(config)
  batch = next(pipeline.train_iterator(config, tokenizer=tokenizer))
  colour_ids = set(tokenizer.encode(list(colours), 3)[0][:, 1].tolist())  # each colour word's own token

  def has_colour(ids):
    return bool(colour_ids & set(ids.tolist()))

  images = batch['images']
  grey = (np.abs(images - images.mean(-1, keepdims=True)).max(axis=(1, 2, 3)) < 1.0)
  assert 0 < grey.sum() < len(grey)  # both kinds in one batch of 32 at p = 0.5
  for row in range(len(grey)):
    # Grey image <=> no colour word in its caption (every shapes caption names its colours).
    assert has_colour(batch['text_ids'][row]) != grey[row]
    if batch['negative_valid'][row]:
      assert has_colour(batch['negative_ids'][row]) != grey[row]
      assert not np.array_equal(batch['negative_ids'][row], batch['text_ids'][row])
  # Colour swaps and colour changes say nothing once the colours are gone: some grey rows lose their negative.
  assert not batch['negative_valid'][grey].all() or grey.sum() < 4


def test_grey_images_need_the_words_their_captions_lose():
  from xmodal.config.data import data_config, validate_data_config
  with pytest.raises(ValueError, match='grayscale_drop_words'):
    validate_data_config(data_config(grayscale_prob=0.25))
  with pytest.raises(ValueError, match='grayscale_prob'):
    validate_data_config(data_config(grayscale_prob=1.5, grayscale_drop_words=('red',)))
