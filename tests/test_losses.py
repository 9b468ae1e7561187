"""Each loss against an independent numpy implementation; sampling statistics; sharded equals single-device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from helpers import embedding_batch
from xmodal import losses
from xmodal.train.objective import LossWeights


def numpy_contrastive(image, text, temperature, ids):
  """Per-row loops in float64: for each query, cross-entropy against targets spread over its positives."""
  image, text = image.astype(np.float64), text.astype(np.float64)
  size = len(image)
  ids = np.arange(size) if ids is None else ids
  logits = image @ text.T / temperature
  total = 0.0
  for direction in (logits, logits.T):
    for row in range(size):
      pos = [c for c in range(size) if ids[c] == ids[row]]
      log_z = np.log(np.sum(np.exp(direction[row] - direction[row].max()))) + direction[row].max()
      total += -np.mean([direction[row, c] - log_z for c in pos]) / size
  return total / 2


@pytest.mark.parametrize('with_ids', [False, True])
def test_contrastive_loss_matches_numpy(with_ids):
  image, text, ids = embedding_batch(0, ids=with_ids)
  loss, metrics = losses.contrastive_loss(image, text, 0.07, None if ids is None else jnp.asarray(ids))
  np.testing.assert_allclose(float(loss), numpy_contrastive(image, text, 0.07, ids), rtol=1e-5)
  for key in ('itc_i2t_acc', 'itc_t2i_acc'):
    assert 0.0 <= float(metrics[key]) <= 1.0


def numpy_contrastive_with_negative_texts(image, text, negatives, valid, temperature):
  """Image rows see the batch's texts and the existing negative texts; text rows see the images only."""
  image, text, negatives = (x.astype(np.float64) for x in (image, text, negatives))
  size = len(image)
  lse = lambda v: np.log(np.sum(np.exp(v - v.max()))) + v.max()
  total = 0.0
  for row in range(size):
    columns = np.concatenate([image[row] @ text.T, image[row] @ negatives[valid].T]) / temperature
    total += -(columns[row] - lse(columns)) / size
    column = text[row] @ image.T / temperature
    total += -(column[row] - lse(column)) / size
  return total / 2


def test_contrastive_loss_with_negative_texts_matches_numpy():
  image, text, _ = embedding_batch(2, ids=False)
  negatives, _, _ = embedding_batch(3, ids=False)
  valid = np.arange(len(image)) % 3 != 0
  loss, metrics = losses.contrastive_loss(image, text, 0.07, None, jnp.asarray(negatives), jnp.asarray(valid))
  np.testing.assert_allclose(float(loss), numpy_contrastive_with_negative_texts(image, text, negatives, valid, 0.07),
                             rtol=1e-5)
  # A negative text equal to an image's own caption takes the top of that image's row: i2t accuracy falls.
  copies = jnp.asarray(text * 1.0)
  _, fooled = losses.contrastive_loss(text, text, 0.07, None, copies * 1.01, jnp.ones(len(text), bool))
  assert float(fooled['itc_i2t_acc']) < 1.0 and float(fooled['itc_t2i_acc']) == 1.0
  assert np.isfinite(float(loss)) and 0.0 <= float(metrics['itc_i2t_acc']) <= 1.0


def test_contrastive_accuracy_counts_duplicate_ids_as_correct():
  image, _, _ = embedding_batch(1, size=4)
  text = image[[1, 0, 2, 3]]  # text 0 matches image 1 best, but images 0 and 1 share an id
  ids = jnp.array([7, 7, 8, 9])
  _, metrics = losses.contrastive_loss(image, text, 0.05, ids)
  assert float(metrics['itc_i2t_acc']) == 1.0
  _, metrics = losses.contrastive_loss(image, text, 0.05, None)
  assert float(metrics['itc_i2t_acc']) == 0.5


def numpy_sigmoid(image, text, scale, bias, ids):
  size = len(image)
  ids = np.arange(size) if ids is None else ids
  total = 0.0
  for i in range(size):
    for j in range(size):
      z = 1.0 if ids[i] == ids[j] else -1.0
      logit = scale * float(image[i].astype(np.float64) @ text[j]) + bias
      total += np.log1p(np.exp(-z * logit))
  return total / size


@pytest.mark.parametrize('with_ids', [False, True])
def test_sigmoid_loss_matches_numpy(with_ids):
  image, text, ids = embedding_batch(2, ids=with_ids)
  loss, _ = losses.sigmoid_loss(image, text, 10.0, -3.0, None if ids is None else jnp.asarray(ids))
  np.testing.assert_allclose(float(loss), numpy_sigmoid(image, text, 10.0, -3.0, ids), rtol=1e-5)


def test_matching_loss_matches_numpy():
  rng = np.random.default_rng(3)
  pos, neg = rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(8, 2)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 1, 1, 1, 0], bool)
  loss, metrics = losses.matching_loss(pos, neg, jnp.asarray(valid))
  terms, hits = [], []
  for logits, label in [(p, 1) for p in pos] + [(n, 0) for n, v in zip(neg, valid) if v]:
    logits = logits.astype(np.float64)
    terms.append(np.log(np.exp(logits).sum()) - logits[label])
    hits.append(np.argmax(logits) == label)
  np.testing.assert_allclose(float(loss), np.mean(terms), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['itm_acc']), np.mean(hits), rtol=1e-6)


def test_hard_negatives_are_never_positives():
  rng = np.random.default_rng(4)
  size = 16
  ids = jnp.asarray(rng.integers(0, 5, size=size))
  sim = jnp.asarray(rng.normal(size=(size, size)) * 5)
  for seed in range(20):
    neg = losses.sample_hard_negatives(jax.random.key(seed), sim, ids)
    ids_np = np.asarray(ids)
    for j in range(size):
      if neg.image_for_text_valid[j]:
        assert ids_np[int(neg.image_for_text[j])] != ids_np[j]
      if neg.text_for_image_valid[j]:
        assert ids_np[int(neg.text_for_image[j])] != ids_np[j]


def test_hard_negatives_report_rows_without_any_negative():
  neg = losses.sample_hard_negatives(jax.random.key(0), jnp.zeros((3, 3)), jnp.array([1, 1, 1]))
  assert not np.any(np.asarray(neg.image_for_text_valid))
  assert not np.any(np.asarray(neg.text_for_image_valid))


def test_hard_negative_frequencies_follow_softmax_weights():
  """Draw many samples for one text; each non-positive's frequency must sit within 5 sigma of its softmax weight."""
  sim = np.array([[2.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]],
                 np.float32)  # column 0 = text 0: image 0 is its positive
  draws = 20000
  keys = jax.random.split(jax.random.key(5), draws)
  sample = jax.jit(jax.vmap(lambda k: losses.sample_hard_negatives(k, jnp.asarray(sim)).image_for_text[0]))
  counts = np.bincount(np.asarray(sample(keys)), minlength=4)
  assert counts[0] == 0
  weights = np.exp(sim[1:, 0]) / np.exp(sim[1:, 0]).sum()
  freq = counts[1:] / draws
  sigma = np.sqrt(weights * (1 - weights) / draws)
  assert np.all(np.abs(freq - weights) < 5 * sigma), (freq, weights)


@pytest.mark.parametrize('hardness', [0.0, 0.3])
def test_softened_negatives_mix_softmax_and_uniform_weights(hardness):
  """hardness h: each non-positive's frequency sits within 5 sigma of h * softmax + (1 - h) / (non-positives)."""
  sim = np.array([[9.0, 0.0, 0.0], [6.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-3.0, 0.0, 0.0], [5.0, 0.0, 0.0]], np.float32)
  ids = np.array([0, 1, 2, 3, 0])  # text 0's positives: images 0 and 4
  draws = 20000
  keys = jax.random.split(jax.random.key(6), draws)
  sample = jax.jit(jax.vmap(
      lambda k: losses.sample_hard_negatives(k, jnp.asarray(sim[:, :1].repeat(5, 1)), jnp.asarray(ids),
                                             hardness).image_for_text[0]))
  counts = np.bincount(np.asarray(sample(keys)), minlength=5)
  assert counts[0] == 0 and counts[4] == 0
  softmax = np.exp(sim[1:4, 0]) / np.exp(sim[1:4, 0]).sum()
  weights = hardness * softmax + (1 - hardness) / 3
  freq = counts[1:4] / draws
  sigma = np.sqrt(weights * (1 - weights) / draws)
  assert np.all(np.abs(freq - weights) < 5 * sigma), (freq, weights)


def _all_losses(image, text, ids, logits_pos, logits_neg):
  itc, _ = losses.contrastive_loss(image, text, 0.07, ids)
  sig, _ = losses.sigmoid_loss(image, text, 10.0, -5.0, ids)
  itm, _ = losses.matching_loss(logits_pos, logits_neg)
  negs = losses.sample_hard_negatives(jax.random.key(0), image @ text.T / 0.07, ids)
  return itc, sig, itm, negs.image_for_text, negs.text_for_image


def test_losses_on_a_4x2_sharded_batch_equal_single_device():
  image, text, ids = embedding_batch(6, size=32)
  rng = np.random.default_rng(6)
  pos, neg = rng.normal(size=(32, 2)).astype(np.float32), rng.normal(size=(64, 2)).astype(np.float32)
  args = (image, text, ids, pos, neg)
  single = jax.jit(_all_losses)(*jax.device_put(args, jax.devices()[0]))
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ('data', 'fsdp'))
  batch = NamedSharding(mesh, P(('data', 'fsdp')))
  sharded_args = [jax.device_put(a, batch) for a in args]
  assert len(sharded_args[0].sharding.device_set) == 8
  sharded = jax.jit(_all_losses)(*sharded_args)
  for a, b in zip(single, sharded):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_negative_hardness_rises_linearly_to_albef():
  schedule = LossWeights(itm_hard_warmup=100)
  np.testing.assert_allclose([float(schedule.negative_hardness(jnp.asarray(s))) for s in (0, 25, 100, 400)],
                             [0.0, 0.25, 1.0, 1.0])
  assert float(LossWeights().negative_hardness(jnp.asarray(0))) == 1.0
  assert float(schedule.negative_hardness(None)) == 1.0
