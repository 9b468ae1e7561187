"""Text rows computed at their real length (models/buckets.py, loss.length_buckets) give what the full-length step
gives, and the loop's host check admits only batches the plan fits."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal import config as config_lib
from xmodal.models import build, buckets, dummy_inputs, flops
from xmodal.train import bench
from xmodal.train.objective import LossWeights, compute_loss
from helpers import micro_model_config

PLAN = ((0.25, 4), (0.25, 8))  # of the micro model's 12 tokens


def test_spans_round_each_bucket_down_to_whole_row_multiples_and_leave_the_rest_at_full_length():
  assert buckets.ROW_MULTIPLE == 8
  assert buckets.spans(320, ((0.375, 12), (0.375, 16)), 24) == [(0, 120, 12), (120, 240, 16), (240, 320, 24)]
  assert buckets.spans(100, ((0.3, 5), (0.3, 9)), 12) == [(0, 24, 5), (24, 48, 9), (48, 100, 12)]
  assert buckets.spans(12, ((0.5, 5),), 12) == [(0, 12, 12)]  # a share of 6 rows rounds to no bucket
  assert buckets.spans(64, (), 24) == [(0, 64, 24)]


def test_a_plan_fits_when_each_buckets_sorted_rows_are_no_longer_than_the_bucket():
  plan = ((0.5, 4),)  # 16 rows: the shortest 8 at 4 tokens
  lengths = np.array([4] * 8 + [12] * 8)
  assert buckets.fits(lengths, plan, 12) and bool(buckets.fits(jnp.asarray(lengths), plan, 12))
  lengths[0] = 5  # now only 7 rows fit in 4 tokens
  assert not buckets.fits(lengths, plan, 12) and not bool(buckets.fits(jnp.asarray(lengths), plan, 12))


def test_mean_length_weights_each_bucket_by_its_share():
  assert buckets.mean_length(((0.375, 12), (0.375, 16)), 24) == pytest.approx(0.375 * 12 + 0.375 * 16 + 0.25 * 24)
  assert buckets.mean_length(((0.5, 2),), 4, cost=lambda n: n * n) == pytest.approx(0.5 * 4 + 0.5 * 16)


def _shapes_like_model():
  cfg = micro_model_config()
  cfg.update(pool='max', fusion_word_window=2, fusion_locator=True, fusion_init='lecun')
  return build(cfg)


@pytest.fixture(scope='module')
def micro():
  model = _shapes_like_model()
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  return model, params


def _close_to_float_rounding(expected, actual):
  """Equal up to float32 rounding of sums in another order: 1e-5 of the array's largest entry."""
  expected, actual = np.asarray(expected), np.asarray(actual)
  np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5 * max(np.abs(expected).max(), 1e-6))


@pytest.mark.slow  # compiles two gradients of the micro model's text tower and fusion encoder
def test_bucketed_text_tower_and_fusion_encoder_equal_the_full_length_ones_with_gradients(micro):
  model, params = micro
  rows, images, length = 32, 8, model.spec.max_text_len
  rng = np.random.default_rng(0)
  lengths = rng.permutation(np.concatenate([rng.integers(2, 5, 8), rng.integers(5, 9, 8), rng.integers(9, 13, 16)]))
  assert buckets.fits(lengths, PLAN, length)
  mask = jnp.asarray(np.arange(length)[None] < lengths[:, None], jnp.int32)
  ids = jnp.asarray(rng.integers(5, model.spec.text.vocab_size, (rows, length)), jnp.int32)
  pixels = jnp.asarray(rng.normal(size=(images, model.spec.image_size, model.spec.image_size, 3)), jnp.float32)
  image_index = jnp.asarray(rng.integers(0, images, rows), jnp.int32)
  weights = jnp.asarray(rng.normal(size=(3, rows, 16)), jnp.float32)

  def outputs(params, plan):
    def run(module):
      image_tokens, _ = module.encode_image(pixels)
      encode = lambda mdl, m, tok, row, shared: tuple([x] for x in mdl.encode_text(tok[0], m))
      ((tokens,), (emb,)), text_fit = buckets.apply_by_length(module, encode, mask, [ids], [], [], plan)
      match = lambda mdl, m, tok, row, shared: ([], [mdl.match(tok[0], m, shared[0], image_index=row[0])])
      ((), (logits,)), match_fit = buckets.apply_by_length(module, match, mask, [tokens], [image_index],
                                                           [image_tokens], plan)
      return tokens * mask[..., None], emb, logits, text_fit & match_fit
    return model.apply({'params': params}, method=run)

  def loss(params, plan):
    tokens, emb, logits, _ = outputs(params, plan)
    return (jnp.sum(tokens[:, :, :16] * weights[0, :, None]) + jnp.sum(emb * weights[1])
            + jnp.sum(logits * weights[2, :, :2]))

  full, bucketed = jax.jit(lambda p: outputs(p, ()))(params), jax.jit(lambda p: outputs(p, PLAN))(params)
  assert bool(bucketed[3])
  for a, b in zip(full[:3], bucketed[:3]):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
  grads = [jax.jit(jax.grad(lambda p: loss(p, plan)))(params) for plan in ((), PLAN)]
  jax.tree.map(_close_to_float_rounding, *grads)


def _shapes_weights(plan=PLAN) -> LossWeights:
  config = config_lib.load('configs/shapes.py')
  weights = LossWeights.from_config(config.loss, config.data)
  return dataclasses.replace(weights, itm_start=0, length_buckets=plan)


@pytest.mark.slow  # compiles the shapes objective's loss and gradient twice on the micro model
def test_the_shapes_objective_with_length_buckets_gives_the_loss_and_gradients_without_them(micro):
  model, params = micro
  weights = _shapes_weights()
  batch = bench.synthetic_batch(model.spec, 16, np.random.default_rng(0), negatives=True, regions=(3, 8),
                                grounded=True, relations=True, length_buckets=PLAN)
  assert weights.buckets_fit(batch)
  batch = jax.tree.map(jnp.asarray, batch)

  def loss_and_grad(weights):
    return jax.jit(jax.value_and_grad(lambda p: compute_loss(model, p, batch, jax.random.key(1), weights, 0),
                                      has_aux=True))(params)
  (loss, metrics), grads = loss_and_grad(weights.without_buckets())
  (bucketed_loss, bucketed_metrics), bucketed_grads = loss_and_grad(weights)
  assert float(bucketed_metrics['length_buckets_fit']) == 1.0
  assert 'length_buckets_fit' not in metrics
  np.testing.assert_allclose(float(bucketed_loss), float(loss), rtol=1e-5)
  for key in ('itc_loss', 'itm_loss', 'relation_loss', 'locate_loss'):
    np.testing.assert_allclose(float(bucketed_metrics[key]), float(metrics[key]), rtol=1e-5, err_msg=key)
  jax.tree.map(_close_to_float_rounding, grads, bucketed_grads)


def test_the_host_check_counts_the_texts_a_step_draws_itself_at_full_length():
  weights = _shapes_weights(((0.375, 4),))  # captions, negatives, swaps: 48 texts; ITM: 5 x 16 = 80 pairs
  batch = {f'{name}_{field}': None for name in ('text', 'negative', 'relation') for field in ('ids', 'mask')}

  def with_short(captions: int, written: int, swaps: int) -> dict:
    short = lambda n: (np.arange(12)[None] < np.where(np.arange(16) < n, 4, 12)[:, None]).astype(np.int32)
    return {**batch, 'text_mask': short(captions), 'negative_mask': short(written), 'relation_mask': short(swaps)}
  # The pairs: captions twice, the drawn negative texts (counted long), the written negatives, the swaps; the plan's
  # first bucket needs 24 of the 80 pairs and 16 of the 48 texts at 4 tokens.
  assert weights.buckets_fit(with_short(6, 6, 6))  # pairs 6 + 6 + 0 + 6 + 6 = 24, texts 18
  assert not weights.buckets_fit(with_short(6, 5, 6))  # pairs 23
  assert not weights.buckets_fit(with_short(2, 14, 0))  # pairs 2 + 2 + 14 = 18 though texts 16
  assert weights.without_buckets().buckets_fit(with_short(0, 0, 0))


def test_bench_lengths_follow_the_plan_so_that_the_bucketed_step_is_the_one_timed():
  lengths = bench._text_lengths(12, 64, np.random.default_rng(0), PLAN)
  ordered = np.sort(lengths)  # a quarter and a quarter more (20 rows) at most 4, as many at most 8
  assert ordered[19] <= 4 and ordered[39] <= 8 and ordered[-1] <= 12 and ordered[0] >= 1
  assert ordered[20] > 4 and ordered[40] > 8  # no shorter than they need be: the bucket above is used too


def test_flops_count_each_bucket_at_its_length_and_the_drawn_pairs_at_full_length():
  spec = _shapes_like_model().spec
  one = lambda spec, plan=(), pairs=5, drawn=1: flops.forward_flops(spec, 16, itm_pairs=pairs, extra_texts=2,
                                                                    length_buckets=plan, drawn_pairs=drawn)
  at = lambda n, **kw: one(dataclasses.replace(spec, max_text_len=n), **kw)
  expected = 0.25 * at(4)['text'] + 0.25 * at(8)['text'] + 0.5 * at(12)['text']
  assert one(spec, PLAN)['text'] == pytest.approx(expected, rel=1e-6)
  # Four pairs per example bucketed (their images' keys and values once), one at full length (its own copies).
  bucketed = sum(share * at(n, pairs=4)['fusion'] for share, n in ((0.25, 4), (0.25, 8), (0.5, 12)))
  assert one(spec, PLAN)['fusion'] == pytest.approx(bucketed + at(12, pairs=1)['fusion'], rel=1e-6)
  for part in ('text', 'fusion'):
    assert one(spec, PLAN)[part] < 0.9 * one(spec)[part], part
  assert one(spec, PLAN)['vision'] == one(spec)['vision']


@pytest.mark.parametrize('plan, message', [
    (((0.5, 4), (0.6, 8)), 'sum to at most 1'),
    (((0.5, 8), (0.25, 4)), 'must increase'),
    (((0.5, 12),), 'lengths must be whole numbers in'),
    (((0.5,),), 'expects ((share, length), ...)'),
])
def test_a_bad_bucket_plan_names_the_key(plan, message):
  config = config_lib.load('tests/micro_config.py')
  config.loss.length_buckets = plan
  with pytest.raises(config_lib.ConfigError, match=r'loss\.length_buckets') as error:
    config_lib.validate(config)
  assert message in str(error.value)


def test_length_buckets_refuse_gradient_accumulation():
  config = config_lib.load('tests/micro_config.py')
  config.loss.length_buckets, config.train.grad_accum = PLAN, 2
  with pytest.raises(config_lib.ConfigError, match=r'loss\.length_buckets: not with gradient accumulation'):
    config_lib.validate(config)
