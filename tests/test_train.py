"""The train step and optimizer: FLOP count, per-parameter rules, sharded equals single-device, non-finite policy."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import micro_config
from xmodal import sharding
from xmodal.models import build, flops
from xmodal.models.model import ModelSpec
from xmodal.train import optim, state as state_lib
from xmodal.train.bench import synthetic_batch
from xmodal.train.objective import LossWeights
from xmodal.train.step import make_train_step


def test_flop_count_matches_a_hand_count():
  """ViT: 4 patches of 4x4x3 + [CLS] = 5 tokens, width 8, MLP 16, 1 layer; text: 3 tokens, width 8, 1 layer + 1 fusion."""
  config = micro_config().model
  config.image_size, config.max_text_len, config.embed_dim, config.fusion_depth = 8, 3, 4, 1
  config.vision.update(width=8, depth=1, heads=2, mlp_dim=16, patch_size=4)
  config.text.update(width=8, depth=1, heads=2, mlp_dim=16)
  spec = ModelSpec.from_config(config)
  patch = 2 * 4 * 48 * 8  # 4 patches x (48 -> 8)
  vit_layer = 2 * 5 * 8 * 24 + 2 * 5 * 8 * 8 + 2 * 2 * 5 * 5 * 8 + 2 * 2 * 5 * 8 * 16
  text_layer = 2 * 3 * 8 * 24 + 2 * 3 * 8 * 8 + 2 * 2 * 3 * 3 * 8 + 2 * 2 * 3 * 8 * 16
  image_keys = 2 * 5 * 8 * 16  # cross-attention's K and V from one image's 5 tokens
  # A match's last (here only) fusion layer computes [CLS] alone: Q, K, V of the 3 tokens, the rest for one query.
  fusion_layer = 2 * 3 * 8 * 24 + 2 * 1 * 8 * 8 + 2 * 2 * 1 * 3 * 8 + 2 * 2 * 1 * 8 * 16
  cross = 2 * 1 * 8 * 8 + image_keys + 2 * 2 * 1 * 5 * 8 + 2 * 1 * 8 * 8
  cross3 = 2 * 3 * 8 * 8 + image_keys + 2 * 2 * 3 * 5 * 8 + 2 * 3 * 8 * 8  # all 3 tokens (the Locator's)
  heads = 2 * 8 * 4 * 2 + 3 * 2 * 8 * 2 + 2 * 2 * 4  # two projections, ITM head on 3 pairs, similarity row (B=2)
  # Three pairs per example share the batch's images: K and V once per image, not per pair.
  per_example = patch + vit_layer + text_layer + 3 * (fusion_layer + cross) - 2 * image_keys + heads
  assert flops.train_flops(spec, batch=2) == 3 * 2 * per_example
  # Without ITM the fusion encoder and its head do no work; with written negatives added, 4 pairs (the fourth on an
  # image already projected) and 2 captions.
  itm_head = 2 * 8 * 2
  assert flops.train_flops(spec, batch=2, itm_pairs=0) == 3 * 2 * (
      per_example - 3 * (fusion_layer + cross + itm_head) + 2 * image_keys)
  assert flops.train_flops(spec, batch=2, itm_pairs=4, extra_texts=1) == 3 * 2 * (
      per_example + text_layer + fusion_layer + cross - image_keys + itm_head)
  # Every 4th example's 3 pairs: fewer pairs than images, each pair projects its own copy (batch 4: a similarity
  # row of 4).
  assert flops.train_flops(spec, batch=4, itm_pairs=0.75) == 3 * 4 * (
      per_example - 2.25 * (fusion_layer + cross + itm_head) + 2 * image_keys + 2 * 2 * 4)
  # The momentum model with a queue of 6: ITC's two directions score B + 6 momentum keys (trained: forward and
  # backward), and the momentum towers and projections run forward once; distillation adds its similarities once.
  keys = 2 * 2 * (2 + 6) * 4
  momentum_forward = patch + vit_layer + text_layer + 2 * 8 * 4 * 2
  assert flops.train_flops(spec, batch=2, momentum=True, queue_size=6) == 2 * (
      3 * (per_example + keys) + momentum_forward)
  assert flops.train_flops(spec, batch=2, momentum=True, queue_size=6, distill=True) == 2 * (
      3 * (per_example + keys) + momentum_forward + keys)
  # Two regions per example with phrases of 2 tokens: each phrase through the text layer, both projections, and its
  # row of the (B R, B R) = (4, 4) similarity.
  phrase_layer = 2 * 2 * 8 * 24 + 2 * 2 * 8 * 8 + 2 * 2 * 2 * 2 * 8 + 2 * 2 * 2 * 8 * 16
  regions = 2 * (phrase_layer + 2 * 8 * 4 * 2 + 2 * 4 * 4)
  assert flops.train_flops(spec, batch=2, regions=2, phrase_len=2) == 3 * 2 * (per_example + regions)
  # A conv stem instead of the patchify: 3x3 stride-2 convolutions 8x8x3 -> 4x4x8 -> 2x2x8, then 1x1 to width 8.
  config.vision.stem = 'conv'
  stem = 2 * 16 * 9 * 3 * 8 + 2 * 4 * 9 * 8 * 8 + 2 * 4 * 8 * 8
  assert flops.train_flops(ModelSpec.from_config(config), batch=2) == 3 * 2 * (per_example - patch + stem)
  # A word window of 1 at the fusion encoder's input: each pair's 3 tokens mixed from 2 positions (16 -> 8).
  config.fusion_word_window = 1
  window = 2 * 3 * 16 * 8
  assert flops.train_flops(ModelSpec.from_config(config), batch=2) == 3 * 2 * (
      per_example - patch + stem + 3 * window)
  # The Locator: one more fusion layer per pair (its K and V once per image), its head (8 -> 2) and the place's
  # dense layer (2 -> 8); each of the now two cross-attentions reads where it looked: its 3 x 5 scores again, the
  # weighted (x, y) of 2 heads, their projection (2 x 2 -> 8).
  config.fusion_locator = True
  where = 2 * 3 * 5 * 8 + 2 * 3 * 5 * 2 * 2 + 2 * 3 * 2 * 2 * 8
  where_cls = 2 * 1 * 5 * 8 + 2 * 1 * 5 * 2 * 2 + 2 * 1 * 2 * 2 * 8  # the last layer's, for [CLS] alone
  locator = text_layer + (cross3 - image_keys) + 2 * 3 * 8 * 2 + 2 * 3 * 2 * 8
  with_locator = per_example - patch + stem + 3 * (window + locator + where + where_cls) + image_keys
  assert flops.train_flops(ModelSpec.from_config(config), batch=2) == 3 * 2 * with_locator
  # Locating two phrases of 2 tokens per example (no region contrast): each through the text layer, the word
  # window and the Locator's layer and head, against its image's K and V, projected once.
  phrase_cross = 2 * 2 * 8 * 8 + 2 * 2 * 2 * 5 * 8 + 2 * 2 * 8 * 8
  phrase_where = 2 * 2 * 5 * 8 + 2 * 2 * 5 * 2 * 2 + 2 * 2 * 2 * 2 * 8
  phrase_locate = 2 * 2 * 16 * 8 + phrase_layer + phrase_cross + phrase_where + 2 * 2 * 8 * 2
  assert flops.train_flops(ModelSpec.from_config(config), batch=2, regions=2, phrase_len=2, region_contrast=False,
                           locate=True) == 3 * 2 * (with_locator + 2 * (phrase_layer + phrase_locate) + image_keys)
  # Grounded captions: each caption of 3 tokens through the word window and the Locator too, its image's K and V
  # projected again.
  caption_locate = window + locator - 2 * 3 * 2 * 8 + where
  assert flops.train_flops(ModelSpec.from_config(config), batch=2, regions=2, phrase_len=2, region_contrast=False,
                           locate=True, grounded_captions=True) == 3 * 2 * (
      with_locator + 2 * (phrase_layer + phrase_locate) + image_keys + caption_locate + image_keys)


@pytest.mark.slow  # compiles the micro train step per case for XLA's cost analysis
@pytest.mark.parametrize('written, stem, mlm, momentum, regions, locate, relation', [
    ('off', 'patch', False, False, 0, False, False), ('add', 'conv', False, False, 0, False, False),
    ('replace', 'patch', True, False, 0, False, False), ('off', 'patch', True, True, 0, False, False),
    ('off', 'conv', False, False, 3, False, False), ('add', 'conv', False, False, 3, True, False),
    ('add', 'conv', False, False, 3, 'captions', False), ('add', 'patch', False, False, 0, False, True)])
def test_flop_count_is_close_to_xla_cost_analysis(written, stem, mlm, momentum, regions, locate, relation):
  """XLA counts every op; the analytic count (matmuls only) must account for the bulk of its forward FLOPs (with the
  momentum model: its forward, a queue of 32 and distillation of ITC and MLM, beside the loss's; with regions, their
  phrases through the text tower and their projections; with `locate`, the fusion encoder's Locator on every pair
  and on the phrases; with 'captions', on the grounded captions too; with `relation`, the relation swaps through the
  text tower and ITM)."""
  from xmodal.losses import QueuedKeys
  from xmodal.train.objective import compute_loss, momentum_outputs
  config = micro_config()
  config.model.scan_layers = False  # XLA's cost analysis counts a while loop's body once, not per iteration
  config.model.vision.stem = stem
  config.model.mlm_head = mlm
  config.model.fusion_locator = bool(locate)
  grounded = locate == 'captions'
  model = build(config.model)
  params = nn.unbox(state_lib.abstract_params(model))
  queue_size = 32 if momentum else 0
  weights = LossWeights(itm_written_negatives=written, mlm=float(mlm), mlm_mask_id=4,
                        mlm_vocab_size=config.model.text.vocab_size, momentum=0.995 * momentum,
                        queue_size=queue_size, distill_alpha=0.4 * momentum, region=float(regions > 0),
                        regions_per_example=regions, phrase_len=8 if regions else 0, locate=float(bool(locate)),
                        grounded_captions=grounded, relation=float(relation))
  batch = jax.tree.map(jnp.asarray, synthetic_batch(model.spec, 8, np.random.default_rng(0), negatives=True,
                                                    regions=(regions, 8) if regions else None, grounded=grounded,
                                                    relations=relation))

  def forward(p, m, b):  # m: the momentum parameters, an argument of their own (XLA would fold a second use of p)
    rng = jax.random.key(0)
    if not momentum:
      return compute_loss(model, p, b, rng, weights)[0]
    keys = jnp.zeros((queue_size, config.model.embed_dim))
    queue = QueuedKeys(keys, keys, jnp.zeros((queue_size,), jnp.int32), jnp.ones((queue_size,), bool))
    return compute_loss(model, p, b, rng, weights, teacher=momentum_outputs(model, m, b, rng, weights), queue=queue)[0]
  xla = jax.jit(forward).lower(params, params, batch).compile().cost_analysis()['flops']
  ours = sum(flops.forward_flops(model.spec, 8, weights.itm_pairs, weights.extra_texts, mlm, momentum, queue_size,
                                 momentum, regions=regions, phrase_len=weights.phrase_len, locate=bool(locate),
                                 grounded_captions=grounded).values())
  # At width 32 the elementwise work (LayerNorm, softmax, GELU; with MLM a log-softmax over the vocabulary at every
  # position) is a quarter of XLA's count; a missed matmul part (a tower, the fusion pairs) would cost far more.
  assert 0.7 * xla <= ours <= 1.05 * xla, (ours, xla)


def _params(config):
  model = build(config.model)
  return model, nn.unbox(state_lib.abstract_params(model))


def test_weight_decay_skips_biases_norms_and_embeddings():
  _, params = _params(micro_config())
  mask = dict(zip(optim.param_paths(params), jax.tree.leaves(optim.decay_mask(params))))
  assert mask['vision/layers/attn/qkv/kernel'] and mask['text/layers/mlp/fc1/kernel']
  for path in ('vision/layers/attn/qkv/bias', 'vision/layers/ln1/norm/scale', 'text/embeddings/word/embedding',
               'vision/pos_embedding', 'vision/cls', 'temperature', 'text/embeddings/ln/norm/bias'):
    assert not mask[path], path


def test_a_pattern_that_matches_nothing_is_an_error():
  config = micro_config()
  _, params = _params(config)
  config.optim.freeze = ('^visoin/',)
  with pytest.raises(ValueError, match='visoin'):
    optim.build_optimizer(config.optim, params, 10)


@pytest.mark.slow  # three optimizers stepped eagerly over the micro model
def test_frozen_parameters_get_no_update_and_no_adam_moments_and_the_rest_trains_as_if_alone():
  config = micro_config()
  config.optim.update(warmup_steps=0, clip_norm=0.5, lr_multipliers=(('^text/', 2.0),))
  _, abstract = _params(config)
  rng = np.random.default_rng(0)
  draw = lambda tree: jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), jnp.float32), tree)
  params, grads = draw(abstract), [draw(abstract) for _ in range(3)]
  # Clipping is active, so which parameters the global norm covers shows in every update.
  assert float(optax.tree.norm(grads[0])) > 10 * config.optim.clip_norm
  trainable = lambda tree: {k: v for k, v in tree.items() if k != 'vision'}
  # The reference: the same optimizer, without freezing, over the unfrozen parameters alone.
  reference, _ = optim.build_optimizer(config.optim, trainable(params), 10)
  unfrozen, _ = optim.build_optimizer(config.optim, params, 10)
  config.optim.freeze = ('^vision/',)
  frozen, _ = optim.build_optimizer(config.optim, params, 10)

  state, ref_state = frozen.init(params), reference.init(trainable(params))
  for g in grads:
    updates, state = frozen.update(g, state, params)
    ref_updates, ref_state = reference.update(trainable(g), ref_state, trainable(params))
    chex.assert_trees_all_equal(updates['vision'], jax.tree.map(jnp.zeros_like, params['vision']))
    chex.assert_trees_all_equal(trainable(updates), ref_updates)

  # AdamW keeps two moments (mu, nu) per trained parameter and none for a frozen one.
  unfrozen_state = unfrozen.init(params)
  nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
  count = lambda tree: len(jax.tree.leaves(tree))
  assert nbytes(state) == nbytes(unfrozen_state) - 2 * nbytes(params['vision'])
  assert count(state) == count(unfrozen_state) - 2 * count(params['vision'])
  (_, mu), = optax.tree_utils.tree_get_all_with_path(state, 'mu')
  masked = lambda x: isinstance(x, optax.MaskedNode)
  assert all(masked(m) for m in jax.tree.leaves(mu['vision'], is_leaf=masked))
  assert not any(masked(m) for m in jax.tree.leaves(trainable(mu), is_leaf=masked))


def _run(config, mesh_shape, steps=2, batch=None):
  """Runs `steps` jitted train steps on a mesh; returns (losses, final params as numpy)."""
  mesh = sharding.make_mesh(mesh_shape, jax.devices()[:int(np.prod(mesh_shape))])
  rules = [tuple(r) for r in config.mesh.rules]
  model, abstract = _params(config)
  tx, schedule = optim.build_optimizer(config.optim, abstract, 10)
  shardings = state_lib.state_shardings(model, tx, mesh, rules)
  state = state_lib.create_state(model, tx, jax.random.key(0), shardings)
  weights = LossWeights(1.0, 1.0, 0.5, chunked=config.loss.chunked)
  step = jax.jit(make_train_step(model, tx, schedule, weights,
                                 grad_accum=config.train.grad_accum,
                                 skip_nonfinite=config.train.nan_policy == 'skip'),
                 in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  host = batch if batch is not None else synthetic_batch(model.spec, config.data.batch_size,
                                                         np.random.default_rng(1))
  losses, metrics = [], None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _ in range(steps):
      state, metrics = step(state, sharding.host_to_global(host, mesh), jax.random.key(2))
      losses.append(float(metrics['loss']))
  return losses, jax.tree.map(np.asarray, state.params), jax.device_get(metrics)


@pytest.fixture(scope='module')
def single_device_run():
  return _run(micro_config(), (1, 1, 1))


@pytest.mark.slow  # compiles and runs the micro train step on one device and on the mesh
@pytest.mark.parametrize('mesh_shape, chunked', [((4, 2, 1), False), ((2, 2, 2), False), ((4, 2, 1), True)])
def test_sharded_training_matches_one_device(single_device_run, mesh_shape, chunked):
  losses, params, _ = single_device_run
  config = micro_config()
  config.loss.chunked = chunked  # the ring form of ITC/sigmoid must train exactly like the plain form
  sharded_losses, sharded_params, _ = _run(config, mesh_shape)
  np.testing.assert_allclose(sharded_losses, losses, rtol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), sharded_params, params)


@pytest.mark.slow  # compiles and runs two micro train steps
def test_frozen_parameters_do_not_move():
  config = micro_config()
  config.optim.freeze = ('^vision/',)
  model = build(config.model)
  initial = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), *_dummy(model))['params']))
  _, params, _ = _run(config, (1, 1, 1), steps=2)  # step 0 has learning rate 0 (warmup)
  np.testing.assert_array_equal(params['vision']['layers']['attn']['qkv']['kernel'],
                                initial['vision']['layers']['attn']['qkv']['kernel'])
  assert not np.array_equal(params['text']['layers']['attn']['qkv']['kernel'],
                            initial['text']['layers']['attn']['qkv']['kernel'])


def _dummy(model):
  from xmodal.models import dummy_inputs
  return dummy_inputs(model.spec)


@pytest.mark.slow  # compiles and runs a micro train step
def test_nonfinite_step_is_skipped_under_the_skip_policy():
  config = micro_config()
  config.train.nan_policy = 'skip'
  model = build(config.model)
  batch = synthetic_batch(model.spec, config.data.batch_size, np.random.default_rng(1))
  batch['images'][0, 0, 0, 0] = np.nan
  initial = jax.tree.map(np.asarray, nn.unbox(model.init(jax.random.key(0), *_dummy(model))['params']))
  _, params, metrics = _run(config, (1, 1, 1), steps=1, batch=batch)
  assert not metrics['finite']
  jax.tree.map(np.testing.assert_array_equal, params, initial)


@pytest.mark.slow  # compiles a micro train step with accumulation and two loss gradients
def test_gradient_accumulation_of_one_example_batches_sums_per_example_gradients():
  """With grad_accum = B the ITC/ITM negatives vanish: only the sigmoid/ITC self-terms remain — so instead check
  accumulation over 2 micro-batches equals averaging the two half-batch steps' gradients (SGD-free: compare loss)."""
  config = micro_config(batch_size=8)
  config.train.grad_accum = 2
  losses, _, _ = _run(config, (1, 1, 1), steps=1)
  model = build(config.model)
  batch = synthetic_batch(model.spec, 8, np.random.default_rng(1))
  halves = []
  for part in (slice(0, 4), slice(4, 8)):
    from xmodal.train.objective import compute_loss
    params = nn.unbox(model.init(jax.random.key(0), *_dummy(model))['params'])
    step_rng = jax.random.fold_in(jax.random.key(2), 0)
    index = 0 if part.start == 0 else 1
    loss, _ = compute_loss(model, params, {k: v[part] for k, v in batch.items()},
                           jax.random.fold_in(step_rng, index), LossWeights(1.0, 1.0, 0.5))
    halves.append(float(loss))
  np.testing.assert_allclose(losses[0], np.mean(halves), rtol=1e-5)
