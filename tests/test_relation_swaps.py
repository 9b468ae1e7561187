"""Relation swaps (data.relation_swaps, loss.relation_weight): a caption with its related phrases exchanged, from the
caption grammar to the training batch, and ITM's balanced loss over each caption and its swap."""

import collections
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config
from xmodal import config as config_lib
from xmodal.config.data import RELATION_SWAPS, validate_data_config
from xmodal.data.shapes import captions as shapes_captions
from xmodal.data.shapes import render as shapes_render
from xmodal.models import build
from xmodal.train import state as state_lib
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights, compute_loss


def test_the_related_phrases_change_places_and_their_determiners_stay():
  assert shapes_captions.relation_swap('a red circle left of a blue box') == 'a blue box left of a red circle'
  assert (shapes_captions.relation_swap('there is a small grey box, and one red disk is left of a blue star')
          == 'there is a small grey box, and one blue star is left of a red disk')
  # No relation stated: nothing to swap.
  assert shapes_captions.relation_swap('two objects: a red circle and a blue box') == ''
  with pytest.raises(ValueError, match='no reading'):
    shapes_captions.relation_swap('a circle somewhere near a box')


def test_a_swap_keeps_every_word_and_is_false_of_each_scene_its_caption_is_true_of():
  rng = np.random.default_rng(0)
  swapped = 0
  for _ in range(150):
    scene = shapes_render.sample_scene(rng, 64)
    for text in shapes_captions.captions(scene, rng, 3):
      swap = shapes_captions.relation_swap(text)
      if not swap:
        continue
      swapped += 1
      words = lambda caption: collections.Counter(re.findall(r'\w+', caption))
      assert words(swap) == words(text) and swap != text
      assert shapes_captions.caption_fits(text, scene) and not shapes_captions.caption_fits(swap, scene), (text, swap)
      assert shapes_captions.relation_swap(swap) == text  # swapping back restores the caption
  assert swapped > 100


def test_every_swap_name_has_a_writer():
  from xmodal.data import pipeline
  assert set(pipeline.RELATION_SWAPPERS) == set(RELATION_SWAPS) - {''}


def test_the_training_pipeline_carries_each_captions_swap(shapes_dir):
  from xmodal.config.data import data_config
  from xmodal.data import pipeline
  config = data_config(tfds_name=shapes_dir, image_size=32, max_text_len=24, batch_size=16, relation_swaps='shapes')
  tokenizer = pipeline.load_tokenizer(config)
  batch = next(pipeline.train_iterator(config, tokenizer=tokenizer))
  assert batch['relation_ids'].shape == batch['text_ids'].shape == (16, 24)
  for ids, mask, swap_ids, swap_mask, valid in zip(batch['text_ids'], batch['text_mask'], batch['relation_ids'],
                                                   batch['relation_mask'], batch['relation_valid']):
    if valid:  # the caption's own tokens, in another order
      assert sorted(swap_ids[swap_mask > 0]) == sorted(ids[mask > 0]) and (swap_ids != ids).any()
    else:  # '' encodes as [CLS] [SEP] at most
      assert swap_mask.sum() <= 2
  assert 0 < batch['relation_valid'].sum() < 16


def test_a_relation_weight_needs_the_datas_swaps_and_swaps_need_colour_words():
  config = micro_config()
  config.loss.relation_weight = 1.0
  check = lambda: (validate_data_config(config.data), config_lib.validate(config))
  with pytest.raises(ValueError, match='loss.relation_weight.*data.relation_swaps'):
    check()
  config.data.relation_swaps = 'shapes'
  check()
  config.data.grayscale_prob = 0.5
  with pytest.raises(ValueError, match='data.relation_swaps.*grayscale_prob'):
    check()
  config.data.update(grayscale_prob=0.0, relation_swaps='relations')
  with pytest.raises(ValueError, match="data.relation_swaps: 'relations'"):
    check()


def test_the_relation_loss_is_itms_cross_entropy_over_each_caption_and_its_swap():
  config = micro_config()
  model = build(config.model)
  params = nn.unbox(model.init(jax.random.key(0), *state_lib.dummy_inputs(model.spec))['params'])
  batch = jax.tree.map(jnp.asarray, synthetic_batch(model.spec, 8, np.random.default_rng(0), negatives=True,
                                                    relations=True))
  batch['relation_valid'] = jnp.asarray([True, False] * 4)
  rng = jax.random.key(1)
  plain = LossWeights(itm_written_negatives='add')
  weighted = LossWeights(itm_written_negatives='add', relation=2.0)
  total, metrics = compute_loss(model, params, batch, rng, plain)
  with_swaps, swap_metrics = compute_loss(model, params, batch, rng, weighted)
  # The ITM pairs are those without the swaps; the swaps' loss adds with its weight.
  np.testing.assert_allclose(swap_metrics['itm_loss'], metrics['itm_loss'], rtol=1e-5)
  np.testing.assert_allclose(with_swaps, total + 2.0 * swap_metrics['relation_loss'], rtol=1e-5)

  def logits(module, ids, mask):
    image_tokens = module.encode_image(batch['images'])[0]
    return module.match(module.encode_text(ids, mask)[0], mask, image_tokens)
  apply = lambda ids, mask: np.asarray(model.apply({'params': params}, ids, mask, method=logits), np.float64)
  own, swap = apply(batch['text_ids'], batch['text_mask']), apply(batch['relation_ids'], batch['relation_mask'])
  log_softmax = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))
  valid = np.asarray(batch['relation_valid'])
  # By hand: each valid pair's caption is a match (class 1), its swap is not (class 0); a mean over the 2 x 4 rows.
  expected = -(log_softmax(own)[valid, 1].sum() + log_softmax(swap)[valid, 0].sum()) / (2 * valid.sum())
  np.testing.assert_allclose(swap_metrics['relation_loss'], expected, rtol=1e-4)
  ahead = (own[:, 1] - own[:, 0]) > (swap[:, 1] - swap[:, 0])
  np.testing.assert_allclose(swap_metrics['relation_pair_acc'], ahead[valid].mean(), rtol=1e-6)
