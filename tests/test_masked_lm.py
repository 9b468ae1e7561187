"""MLM: BERT's corruption, the loss against a numpy loop, the tied head, and the gradient reaching the image."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_config
from xmodal import config as config_lib
from xmodal import losses
from xmodal.models import build
from xmodal.train import state as state_lib
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights, compute_loss


def test_word_positions_are_the_tokens_between_cls_and_sep():
  # [CLS] w w w [SEP] pad pad | [CLS] [SEP] pad... | a full row: [CLS] w w w w w [SEP]
  mask = np.array([[1, 1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
  expected = np.array([[0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1, 0]], bool)
  np.testing.assert_array_equal(np.asarray(losses.word_positions(jnp.asarray(mask))), expected)


def test_corruption_follows_bert_proportions_and_touches_only_words():
  rng = np.random.default_rng(0)
  batch, length, vocab, mask_id = 1024, 24, 100, 4
  lengths = rng.integers(3, length + 1, size=batch)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask > 0, rng.integers(5, vocab, size=(batch, length)), 0).astype(np.int32)
  masked = losses.mask_tokens(jax.random.key(0), jnp.asarray(ids), jnp.asarray(mask), mask_id=mask_id,
                              vocab_size=vocab, probability=0.15)
  out, chosen = np.asarray(masked.ids), np.asarray(masked.chosen)
  words = np.asarray(losses.word_positions(jnp.asarray(mask)))
  assert not np.any(chosen & ~words)  # never [CLS], [SEP] or padding
  np.testing.assert_array_equal(out[~chosen], ids[~chosen])  # the rest is untouched
  assert abs(chosen.sum() / words.sum() - 0.15) < 0.015  # ~17k word tokens: 0.015 is over five sigma
  became_mask = np.mean(out[chosen] == mask_id)
  kept = np.mean(out[chosen] == ids[chosen])
  random_other = np.mean((out[chosen] != mask_id) & (out[chosen] != ids[chosen]))
  assert abs(became_mask - 0.8) < 0.04 and abs(kept - 0.1) < 0.03 and abs(random_other - 0.1) < 0.03


def test_masked_lm_loss_matches_a_numpy_loop():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 5, 7)).astype(np.float32) * 3
  targets = rng.integers(0, 7, size=(3, 5))
  chosen = rng.random((3, 5)) < 0.4
  loss, metrics = losses.masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(chosen))
  nll, right = [], []
  for b, l in zip(*np.nonzero(chosen)):
    row = logits[b, l].astype(np.float64)
    nll.append(np.log(np.sum(np.exp(row - row.max()))) + row.max() - row[targets[b, l]])
    right.append(np.argmax(row) == targets[b, l])
  np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['mlm_acc']), np.mean(right))
  nothing, _ = losses.masked_lm_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.zeros((3, 5), bool))
  assert float(nothing) == 0.0


def _mlm_model():
  config = micro_config()
  config.model.mlm_head = True
  model = build(config.model)
  batch = jax.tree.map(jnp.asarray, synthetic_batch(model.spec, 4, np.random.default_rng(0)))
  params = nn.unbox(model.init(jax.random.key(0), batch['images'], batch['text_ids'], batch['text_mask'])['params'])
  return model, params, batch


def test_the_mlm_head_decodes_with_the_word_embeddings():
  model, params, batch = _mlm_model()
  assert set(params) >= {'mlm_transform', 'mlm_norm', 'mlm_bias'} and 'mlm_decoder' not in params

  def logits(p):
    image_tokens, _ = model.apply({'params': p}, batch['images'], method=model.encode_image)
    text_tokens, _ = model.apply({'params': p}, batch['text_ids'], batch['text_mask'], method=model.encode_text)
    return model.apply({'params': p}, text_tokens, batch['text_mask'], image_tokens, method=model.predict_masked)

  before = logits(params)
  assert before.shape == (*batch['text_ids'].shape, model.spec.text.vocab_size)
  # A word that is not in the batch: moving its embedding row changes its logit, and no other.
  unused = int(np.setdiff1d(np.arange(model.spec.text.vocab_size), np.asarray(batch['text_ids']))[0])
  moved = jax.tree.map(lambda x: x, params)
  table = moved['text']['embeddings']['word']['embedding']
  # Not a constant shift: the head's LayerNorm output has zero mean over features, so h . (E[v] + c) = h . E[v].
  shift = jnp.asarray(np.random.default_rng(2).normal(size=table.shape[1]), table.dtype)
  moved['text']['embeddings']['word']['embedding'] = table.at[unused].add(shift)
  change = np.abs(np.asarray(logits(moved) - before)).max(axis=(0, 1))
  assert change[unused] > 1e-3 and np.delete(change, unused).max() == 0.0


def test_mlm_gradients_reach_the_image_tower_through_cross_attention():
  """With ITC and ITM off, MLM alone must train the image tower: the fusion encoder reads the image to fill words."""
  model, params, batch = _mlm_model()
  weights = LossWeights(itc=0.0, itm=0.0, mlm=1.0, mlm_probability=0.5, mlm_mask_id=4,
                        mlm_vocab_size=model.spec.text.vocab_size)
  grads, metrics = jax.grad(lambda p: compute_loss(model, p, batch, jax.random.key(1), weights), has_aux=True)(params)
  norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(tree))))
  assert float(metrics['mlm_loss']) > 0
  assert norm(grads['vision']) > 0 and norm(grads['mlm_transform']) > 0
  assert norm(grads['itm_head']) == 0.0  # ITM is off: its head gets nothing


def test_mlm_needs_the_head_and_a_mask_token():
  with pytest.raises(config_lib.ConfigError, match=r'model\.mlm_head'):
    config_lib.load('configs/shapes.py', ['loss.mlm_weight=1', 'loss.itm_start_step=0'])
  config = config_lib.load('configs/shapes.py', ['loss.mlm_weight=1', 'model.mlm_head=True', 'loss.itm_start_step=0'])
  weights = LossWeights.from_config(config.loss, config.data)
  assert weights.mlm_mask_id == 4 and weights.mlm_vocab_size == 168  # the shipped vocabulary's [MASK] and size
