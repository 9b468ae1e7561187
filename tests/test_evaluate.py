"""Retrieval metrics, ITM re-ranking, embedding, binding and zero-shot accuracy against independent references."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from xmodal import evaluation
from xmodal.models import XModal

TEXT_LEN = 8  # captions shorter than the preset's 32 keep the tiny model's tests fast


# ---------------------------------------------------------------------------------------------------------------
# Brute-force references: sort candidates in Python, ties broken against the query (negatives first).
# ---------------------------------------------------------------------------------------------------------------

def brute_force_metrics(sim_i2t, text_to_image, sim_t2i=None):
  sim_t2i = sim_i2t if sim_t2i is None else sim_t2i
  num_images, num_texts = sim_i2t.shape
  i2t_ranks = []
  for i in range(num_images):
    order = sorted(range(num_texts), key=lambda j: (-float(sim_i2t[i, j]), text_to_image[j] == i))
    i2t_ranks.append(next(r for r, j in enumerate(order) if text_to_image[j] == i))
  t2i_ranks = []
  for j in range(num_texts):
    order = sorted(range(num_images), key=lambda i: (-float(sim_t2i[i, j]), i == text_to_image[j]))
    t2i_ranks.append(order.index(text_to_image[j]))
  out = {}
  for name, ranks in (('i2t', i2t_ranks), ('t2i', t2i_ranks)):
    for k in (1, 5, 10):
      out[f'{name}_r{k}'] = 100.0 * np.mean(np.asarray(ranks) < k)
  out['r_mean'] = np.mean(list(out.values()))
  return out


def random_captions(rng, num_images):
  """1-5 captions per image, shuffled: (T,) text_to_image."""
  t2i = np.repeat(np.arange(num_images), rng.integers(1, 6, num_images))
  return rng.permutation(t2i)


def assert_metrics_close(got, want):
  assert set(got) == set(evaluation.METRIC_KEYS)
  for key in evaluation.METRIC_KEYS:
    assert got[key] == pytest.approx(want[key], abs=1e-9), key


def test_retrieval_metrics_match_brute_force_with_ties():
  rng = np.random.default_rng(0)
  for trial in range(4):
    num_images = 25
    t2i = random_captions(rng, num_images)
    sim = rng.normal(size=(num_images, t2i.size)).astype(np.float32)
    sim[t2i, np.arange(t2i.size)] += 1.0  # some signal, so that recalls are neither 0 nor 100
    sim = np.round(sim, 0 if trial % 2 else 1)  # coarse rounding: many ties, including ties with positives
    assert_metrics_close(evaluation.retrieval_metrics(sim, t2i), brute_force_metrics(sim, t2i))


def test_retrieval_metrics_count_ties_against_the_model():
  t2i = np.repeat(np.arange(12), 2)
  collapsed = evaluation.retrieval_metrics(np.zeros((12, 24), np.float32), t2i)
  assert all(v == 0.0 for v in collapsed.values())
  perfect = evaluation.retrieval_metrics((np.arange(12)[:, None] == t2i[None]).astype(np.float32), t2i)
  assert all(v == 100.0 for v in perfect.values())


# ---------------------------------------------------------------------------------------------------------------
# Re-ranking.
# ---------------------------------------------------------------------------------------------------------------

def synthetic_match(text_tokens, text_mask, image_tokens, image_index):
  """A pair-dependent score: masked mean text token . mean image token."""
  m = text_mask[..., None].astype(jnp.float32)
  text = jnp.sum(text_tokens * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)
  s = jnp.sum(text * jnp.mean(image_tokens[image_index], 1), -1)
  return jnp.stack([-s, s], axis=-1)


def pairwise_rerank(match_one, image_tokens, text_tokens, text_mask, sim, k, score, temperature):
  """One (text, image) pair per match call, top-k by full sort of each query's similarities."""
  num_images, num_texts = sim.shape
  i2t = np.full(sim.shape, -np.inf)
  t2i = np.full(sim.shape, -np.inf)

  def pair_score(i, j):
    pair = (text_tokens[j:j + 1], text_mask[j:j + 1], image_tokens[i:i + 1], np.zeros(1, np.int32))
    logit = float(match_one(*pair)[0, 1])
    itc = {'itm': 0.0, 'itm+itc': float(sim[i, j]), 'itm+itc_logit': float(sim[i, j]) / temperature}[score]
    return logit + itc

  for i in range(num_images):
    for j in np.argsort(-sim[i])[:k]:
      i2t[i, j] = pair_score(i, j)
  for j in range(num_texts):
    for i in np.argsort(-sim[:, j])[:k]:
      t2i[i, j] = pair_score(i, j)
  return i2t, t2i


def check_rerank(match_fn, match_one, image_tokens, text_tokens, text_mask, sim, t2i, k, chunk_size, score, atol,
                 temperature=0.05):
  got_i2t, got_t2i = evaluation.rerank.rerank(match_fn, image_tokens, text_tokens, text_mask, sim, k, chunk_size,
                                                score, temperature=temperature)
  want_i2t, want_t2i = pairwise_rerank(match_one, image_tokens, text_tokens, text_mask, sim, k, score, temperature)
  for got, want in ((got_i2t, want_i2t), (got_t2i, want_t2i)):
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))  # the same top-k candidates
    np.testing.assert_allclose(got[np.isfinite(want)], want[np.isfinite(want)], atol=atol, rtol=1e-4)
  assert_metrics_close(evaluation.retrieval_metrics(got_i2t, t2i, sim_t2i=got_t2i),
                       brute_force_metrics(want_i2t, t2i, want_t2i))


def test_the_logit_score_needs_a_temperature():
  args = (jax.jit(synthetic_match), np.zeros((2, 5, 4), np.float32), np.zeros((2, 6, 4), np.float32),
          np.ones((2, 6), np.int32), np.eye(2, dtype=np.float32), 1)
  with pytest.raises(ValueError, match='temperature'):
    evaluation.rerank.rerank(*args, score='itm+itc_logit')


@pytest.mark.parametrize('score', evaluation.ITM_SCORES)
def test_rerank_matches_pairwise_loop_with_synthetic_match(score):
  rng = np.random.default_rng(1)
  num_images = 9
  t2i = random_captions(rng, num_images)
  image_tokens = rng.normal(size=(num_images, 5, 4)).astype(np.float32)
  text_tokens = rng.normal(size=(t2i.size, 6, 4)).astype(np.float32)
  text_mask = (rng.random((t2i.size, 6)) < 0.7).astype(np.int32)
  text_mask[:, 0] = 1
  sim = rng.normal(size=(num_images, t2i.size)).astype(np.float32)  # continuous: no ties at the k-th place
  check_rerank(jax.jit(synthetic_match), synthetic_match, image_tokens, text_tokens, text_mask, sim, t2i, k=4,
               chunk_size=7, score=score, atol=1e-5)


def random_batch(rng, spec, batch, captions, valid=None, text_valid=None):
  ids = rng.integers(1, spec.text.vocab_size, (batch, captions, TEXT_LEN)).astype(np.int32)
  mask = np.ones((batch, captions, TEXT_LEN), np.int32)
  mask[..., TEXT_LEN // 2:] = rng.random((batch, captions, TEXT_LEN - TEXT_LEN // 2)) < 0.5
  return {
      'images': rng.normal(size=(batch, spec.image_size, spec.image_size, 3)).astype(np.float32),
      'text_ids': ids, 'text_mask': mask,
      'text_valid': np.ones((batch, captions), bool) if text_valid is None else text_valid,
      'valid': np.ones(batch, bool) if valid is None else valid,
      'image_ids': rng.integers(0, 10_000, batch),
  }


@pytest.mark.slow  # initialises the tiny model (session fixture) and compiles its towers
def test_rerank_matches_pairwise_loop_with_tiny_xmodal(tiny_model):
  model, variables = tiny_model
  rng = np.random.default_rng(2)
  embedded = evaluation.embed_dataset(model, variables, [random_batch(rng, model.spec, batch=6, captions=2)])
  sim = embedded.image_emb @ embedded.text_emb.T
  # The reference: every pair alone, at full text length, its image's keys and values its own.
  match_one = jax.jit(lambda t, m, i, _: model.apply(variables, t, m, i, method=XModal.match))
  check_rerank(evaluation.match_fn_for(model, variables), match_one, embedded.image_tokens, embedded.text_tokens,
               embedded.text_mask, sim, embedded.text_to_image, k=3, chunk_size=8, score='itm', atol=1e-4)


@pytest.mark.slow  # initialises the tiny model (session fixture) and compiles its towers
def test_pairs_at_their_text_length_with_shared_images_equal_full_length_pairs_with_tiny_xmodal(tiny_model):
  model, variables = tiny_model
  rng = np.random.default_rng(6)
  num_images, num_texts, length = 5, 12, 24
  text_mask = (np.arange(length) < rng.integers(2, length + 1, num_texts)[:, None]).astype(np.int32)
  ids = rng.integers(1, model.spec.text.vocab_size, (num_texts, length)).astype(np.int32) * text_mask
  text_tokens, _ = model.apply(variables, ids, text_mask, method=XModal.encode_text)
  images = rng.normal(size=(num_images, model.spec.image_size, model.spec.image_size, 3)).astype(np.float32)
  image_tokens, _ = model.apply(variables, images, method=XModal.encode_image)
  text_idx, image_idx = rng.integers(0, num_texts, 40), rng.integers(0, num_images, 40)
  got = evaluation.score_pairs(evaluation.match_fn_for(model, variables), text_tokens, text_mask, image_tokens,
                               text_idx, image_idx, chunk_size=8)
  # The reference: every pair alone, at full length, its image's keys and values its own.
  match_one = jax.jit(lambda t, m, i: model.apply(variables, t, m, i, method=XModal.match))
  want = [match_one(text_tokens[t:t + 1], text_mask[t:t + 1], image_tokens[i:i + 1])[0, 1]
          for t, i in zip(text_idx, image_idx)]
  assert len(set(evaluation.rerank.text_lengths(text_mask).tolist())) == 3  # three lengths: 8, 16 and 24
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def perfect_itm_gallery(rng, num_images):
  """Tokens that carry their image's index, a match_fn that recognises true pairs, and uninformative ITC sims."""
  t2i = random_captions(rng, num_images)
  image_tokens = np.broadcast_to(np.arange(num_images, dtype=np.float32)[:, None, None], (num_images, 3, 2))
  text_tokens = np.broadcast_to(t2i.astype(np.float32)[:, None, None], (t2i.size, 4, 2))
  text_mask = np.ones((t2i.size, 4), np.int32)
  sim = rng.normal(size=(num_images, t2i.size)).astype(np.float32)
  return t2i, image_tokens, text_tokens, text_mask, sim


def perfect_match(text_tokens, text_mask, image_tokens, image_index):
  s = jnp.where(text_tokens[:, 0, 0] == image_tokens[image_index, 0, 0], 10.0, -10.0)
  return jnp.stack([-s, s], axis=-1)


def test_rerank_with_perfect_itm_over_all_candidates_ranks_perfectly():
  rng = np.random.default_rng(3)
  t2i, image_tokens, text_tokens, text_mask, sim = perfect_itm_gallery(rng, 15)
  assert evaluation.retrieval_metrics(sim, t2i)['r_mean'] < 90  # ITC alone is far from perfect
  for score in evaluation.ITM_SCORES:
    i2t, t2i_scores = evaluation.rerank.rerank(jax.jit(perfect_match), image_tokens, text_tokens, text_mask, sim,
                                      k=t2i.size, chunk_size=16, score=score, temperature=1.0)
    metrics = evaluation.retrieval_metrics(i2t, t2i, sim_t2i=t2i_scores)
    assert all(v == 100.0 for v in metrics.values()), (score, metrics)


def test_fusion_chunks_compile_per_chunk_shape_not_per_gallery():
  traces = []

  @jax.jit
  def counting_match(text_tokens, text_mask, image_tokens, image_index):
    traces.append((text_tokens.shape, image_tokens.shape))  # runs only when jit traces, i.e. compiles
    return perfect_match(text_tokens, text_mask, image_tokens, image_index)

  rng = np.random.default_rng(4)
  for num_images in (7, 19, 23, 31):
    t2i, image_tokens, text_tokens, text_mask, sim = perfect_itm_gallery(rng, num_images)
    evaluation.rerank.rerank(counting_match, image_tokens, text_tokens, text_mask, sim, k=5, chunk_size=16)
  # 16 pairs of texts at their length (4), and image slots that round up to a power of two: a handful of programs
  # for any number of galleries.
  assert {text for text, _ in traces} == {(16, 4, 2)}
  slots = [images[0] for _, images in traces]
  assert all(m in (1, 2, 4, 8, 16) for m in slots) and len(traces) < 4, traces


def test_chunks_hold_one_text_length_and_few_images_and_every_pair_once():
  rng = np.random.default_rng(5)
  mask = np.zeros((40, 24), np.int32)
  for row, length in enumerate(rng.integers(1, 25, 40)):
    mask[row, :length] = 1
  mask[3, :20], mask[3, 5] = 1, 0  # a hole: the length is where the mask ends (20 tokens -> 24)
  lengths = evaluation.rerank.text_lengths(mask)
  np.testing.assert_array_equal(lengths, [min(24, -(-(np.flatnonzero(r).max() + 1) // 8) * 8) for r in mask])
  assert set(lengths.tolist()) == {8, 16, 24}
  text_idx = rng.integers(0, 40, 300)
  image_idx = rng.integers(0, 30, 300)  # ten pairs per image, as a top-k has several, in no order
  chunks = evaluation.rerank._plan_chunks(text_idx, image_idx, lengths, chunk_size=32)
  np.testing.assert_array_equal(np.sort(np.concatenate([c.pairs for c in chunks])), np.arange(300))
  for c in chunks:
    assert c.text_rows.shape == c.image_index.shape == (32,) and c.images.shape == chunks[0].images.shape
    np.testing.assert_array_equal(c.text_rows[:c.pairs.size], text_idx[c.pairs])
    np.testing.assert_array_equal(c.images[c.image_index[:c.pairs.size]], image_idx[c.pairs])
    assert set(lengths[c.text_rows].tolist()) == {c.length}
  assert lengths[3] == 24 and chunks[0].images.shape[0] < 32  # pairs sorted by image share slots


def test_top_k_is_best_first_with_ties_by_index_along_either_axis_and_across_row_blocks():
  """The one top-k of search and evaluation (inference.ranking.top_k) against a full sort: the k best scores, best
  first, equal scores lower index first; columns give the transpose's rows; more rows than one block of 1024."""
  from xmodal.inference import ranking
  rng = np.random.default_rng(0)
  scores = rng.integers(0, 6, size=(2100, 30)).astype(np.float32)  # many ties, at the k-th place too
  for k in (1, 7, 30, 45):
    for axis, rows in ((1, scores), (0, scores.T)):
      got = ranking.top_k(scores, k, axis=axis)
      assert got.shape == (rows.shape[0], min(k, rows.shape[1]))
      picked = np.take_along_axis(rows, got, axis=1)
      np.testing.assert_array_equal(picked, -np.sort(-rows, axis=1)[:, :got.shape[1]])  # the k best, best first
      assert all(len(set(row)) == len(row) for row in got)
      ties = picked[:, 1:] == picked[:, :-1]
      assert np.all(got[:, 1:][ties] > got[:, :-1][ties])  # equal scores: lower index first


# ---------------------------------------------------------------------------------------------------------------
# Embedding, binding, zero-shot, the whole evaluation.
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.slow  # initialises the tiny model (session fixture) and compiles its towers
def test_embed_dataset_on_8_devices_matches_single_device_and_drops_padding(tiny_model):
  model, variables = tiny_model
  rng = np.random.default_rng(5)
  text_valid = np.ones((8, 3), bool)
  text_valid[1, 2] = text_valid[4, 1:] = False
  valid = np.arange(8) < 5  # the last batch's padding examples
  batches = [random_batch(rng, model.spec, 8, 3),
             random_batch(rng, model.spec, 8, 3, valid=valid, text_valid=text_valid)]
  single = evaluation.embed_dataset(model, variables, batches)
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2, 1), ('data', 'fsdp', 'tensor'))
  sharded = evaluation.embed_dataset(model, variables, batches, mesh=mesh)

  assert single.image_emb.shape[0] == 13 and single.text_emb.shape[0] == 24 + 15 - 3
  np.testing.assert_array_equal(single.image_ids, np.concatenate([batches[0]['image_ids'],
                                                                  batches[1]['image_ids'][:5]]))
  want_t2i = np.concatenate([np.repeat(np.arange(8), 3),
                             [8 + b for b in range(5) for c in range(3) if text_valid[b, c]]])
  np.testing.assert_array_equal(single.text_to_image, want_t2i)
  np.testing.assert_array_equal(single.text_mask[-1], batches[1]['text_mask'][4, 0])
  for field in ('image_emb', 'image_tokens', 'text_emb', 'text_tokens', 'text_mask', 'text_to_image', 'image_ids'):
    np.testing.assert_allclose(getattr(sharded, field), getattr(single, field), atol=2e-5, rtol=1e-5, err_msg=field)


def test_binding_accuracy_matches_hand_computation():
  # ITC: image b's embedding is axis b, so a caption's similarity is its own entry on the diagonal.
  image_emb = np.eye(4, dtype=np.float32)
  true_emb = np.diag([0.9, 0.5, 0.1, 0.6]).astype(np.float32)
  neg_emb = np.diag([0.2, 0.7, 0.1, 0.3]).astype(np.float32)
  # True vs negative: 0.9 > 0.2 yes, 0.5 < 0.7 no, 0.1 = 0.1 a tie: no, 0.6 > 0.3 yes -> 50 %.
  # ITM (perfect_match): +10 when a caption's value equals its image's index, -10 otherwise.
  image_tokens = np.broadcast_to(np.arange(4, dtype=np.float32)[:, None, None], (4, 2, 3))
  true_values = np.array([0, 1, 9, 3], np.float32)
  neg_values = np.array([5, 5, 2, 3], np.float32)
  # True vs negative: 10 > -10 yes, 10 > -10 yes, -10 < 10 no, 10 = 10 a tie: no -> 50 %.
  texts = lambda emb, values: evaluation.Texts(np.broadcast_to(values[:, None, None], (4, 2, 3)),
                                             np.ones((4, 2), np.int32), emb)
  binding = evaluation.BindingSet(image_emb, image_tokens, texts(true_emb, true_values), texts(neg_emb, neg_values))
  # ITM's eight scores are five +10s and three -10s: standard deviation sqrt(93.75).
  assert evaluation.binding_accuracy(jax.jit(perfect_match), binding, chunk_size=3) == pytest.approx({
      'itc': 50.0, 'itm': 50.0, 'count': 4, 'itm_spread': np.sqrt(93.75)})
  # Swapping the captions flips every strict win and keeps the ties failing: ITC 25 %, ITM 25 %.
  swapped = evaluation.BindingSet(image_emb, image_tokens, binding.negative, binding.true)
  assert evaluation.binding_accuracy(jax.jit(perfect_match), swapped, chunk_size=3) == pytest.approx({
      'itc': 25.0, 'itm': 25.0, 'count': 4, 'itm_spread': np.sqrt(93.75)})
  # By kind: images 0 and 1 win ITM, 2 and 3 do not; ITC wins 0 and 3.
  labelled = dataclasses.replace(binding, kinds=np.array(['colours', 'colours', 'relation', 'relation']))
  assert evaluation.binding_accuracy(jax.jit(perfect_match), labelled, chunk_size=3)['kinds'] == {
      'colours': {'itc': 50.0, 'itm': 100.0, 'count': 2}, 'relation': {'itc': 50.0, 'itm': 0.0, 'count': 2}}
  with pytest.raises(ValueError, match='3 binding kinds for 4 images'):
    evaluation.binding_accuracy(jax.jit(perfect_match), dataclasses.replace(binding, kinds=np.array(['a'] * 3)))
  # An ITM that answers the same for every pair: spread 0, and every pair a tie, so accuracy 0, not 50.
  constant = jax.jit(lambda text_tokens, *_: jnp.zeros((text_tokens.shape[0], 2)))
  assert evaluation.binding_accuracy(constant, binding, chunk_size=3) == pytest.approx({
      'itc': 50.0, 'itm': 0.0, 'count': 4, 'itm_spread': 0.0})


def test_binding_set_from_pairs_splits_true_and_negative_captions():
  rng = np.random.default_rng(8)
  t2i = np.repeat(np.arange(3), 2)
  tokens, mask, emb = rng.normal(size=(6, 2, 3)), np.ones((6, 2), np.int32), rng.normal(size=(6, 4))
  embedded = evaluation.Embedded(rng.normal(size=(3, 4)), rng.normal(size=(3, 5, 3)), np.arange(3), emb, tokens, mask,
                               t2i)
  binding = evaluation.binding_set_from_pairs(embedded)
  np.testing.assert_array_equal(binding.true.tokens, tokens[0::2])
  np.testing.assert_array_equal(binding.negative.emb, emb[1::2])
  np.testing.assert_array_equal(binding.image_tokens, embedded.image_tokens)
  with pytest.raises(ValueError, match='two captions'):
    evaluation.binding_set_from_pairs(dataclasses.replace(embedded, text_to_image=np.array([0, 0, 1, 2, 2, 2])))


def test_zero_shot_accuracy_with_averaged_templates():
  # Two templates per class; class k's templates point along axis k with a shared nuisance along axis 3.
  e = np.eye(4, dtype=np.float32)
  templates = np.stack([np.stack([3 * e[k] + e[3], e[k] - e[3]]) for k in range(3)])  # (K=3, M=2, E=4)
  classes = evaluation.class_embeddings(templates)
  # Normalised templates: (3, 0, 1)/sqrt10 and (1, -1)/sqrt2; their mean's axis-3 part is 1/sqrt10 - 1/sqrt2 < 0.
  a, b = 3 / np.sqrt(10) + 1 / np.sqrt(2), 1 / np.sqrt(10) - 1 / np.sqrt(2)
  want = np.stack([a * e[k] + b * e[3] for k in range(3)]) / np.hypot(a, b)
  np.testing.assert_allclose(classes, want, atol=1e-6)
  images = np.stack([e[0], e[1] + 0.1 * e[2], e[2] - e[3], e[0] + 2 * e[1]])
  labels = np.array([0, 1, 0, 0])  # the third leans to class 2 and the fourth to class 1: 2 of 4 right
  assert evaluation.zero_shot_accuracy(images, labels, classes) == 50.0


@pytest.mark.slow  # initialises the tiny model (session fixture) and compiles its towers
def test_embed_prompts_match_text_tower(tiny_model):
  model, variables = tiny_model
  rng = np.random.default_rng(6)
  ids = rng.integers(1, model.spec.text.vocab_size, (3, 2, TEXT_LEN)).astype(np.int32)
  mask = np.ones_like(ids)
  got = evaluation.embed_prompts(model, variables, ids, mask, batch_size=4)
  _, want = model.apply(variables, ids.reshape(6, -1), mask.reshape(6, -1), method=XModal.encode_text)
  np.testing.assert_allclose(got, np.asarray(want).reshape(3, 2, -1), atol=1e-5)


def test_evaluate_retrieval_and_table():
  rng = np.random.default_rng(7)
  t2i, image_tokens, text_tokens, text_mask, _ = perfect_itm_gallery(rng, 12)
  image_emb = rng.normal(size=(12, 8)).astype(np.float32)
  text_emb = rng.normal(size=(t2i.size, 8)).astype(np.float32)
  embedded = evaluation.Embedded(image_emb, image_tokens, np.arange(12), text_emb, text_tokens, text_mask, t2i)
  first = lambda i: np.flatnonzero(t2i == i)[0]
  texts = lambda rows: evaluation.Texts(text_tokens[rows], text_mask[rows], text_emb[rows])
  binding = evaluation.BindingSet(image_emb, image_tokens, texts([first(i) for i in range(12)]),
                                texts([first((i + 1) % 12) for i in range(12)]))
  results = evaluation.evaluate_retrieval(embedded, jax.jit(perfect_match), k=t2i.size, chunk_size=32,
                                        binding=binding)
  assert_metrics_close(results['itc'], brute_force_metrics(image_emb @ text_emb.T, t2i))
  assert all(v == 100.0 for v in results['itc+itm'].values())
  assert evaluation.retrieval_metrics(image_emb @ text_emb.T, t2i)['r_mean'] < 90  # so the re-ranking did the work
  assert results['binding']['itm'] == 100.0 and results['binding']['count'] == 12
  table = evaluation.format_table(results | {'zero_shot': 42.0})
  lines = table.splitlines()
  assert lines[0].split()[:3] == ['i2t', 'R@1', 'R@5'] and lines[1].startswith('ITC ')
  assert lines[2].split() == ['ITC+ITM'] + ['100.00'] * 7
  assert 'binding accuracy (12 images)' in table and 'zero-shot top-1: 42.00' in table
  kinds = np.array(['colours'] * 5 + ['relation'] * 7)
  by_kind = evaluation.evaluate_retrieval(embedded, jax.jit(perfect_match), k=2, chunk_size=32,
                                          binding=dataclasses.replace(binding, kinds=kinds))
  table = evaluation.format_table(by_kind)
  assert '  colours (5 images): ITC' in table and '  relation (7 images): ITC' in table
