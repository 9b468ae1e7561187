"""Model presets, parameter metadata, and the invariances of scan, remat and resolution."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from xmodal.config.model import PRESETS, model_config
from xmodal.models import XModal, build, dummy_inputs
from xmodal.models.vit import resize_pos_embedding
from xmodal.train.objective import LossWeights, compute_loss
from helpers import micro_model_config

# Expected parameter counts in millions. base is ALBEF's ~210M (ViT-B/16 86M + BERT-base 110M + 6 cross-attentions).
EXPECTED_MILLIONS = {'tiny': (1.0, 5.0), 'small': (50, 80), 'base': (210 * 0.97, 210 * 1.03), 'large': (600, 750)}


def count_params(config):
  model = build(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(model.spec)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('size', sorted(PRESETS))
def test_preset_parameter_count(size):
  millions = count_params(model_config(size)) / 1e6
  print(f'{size}: {millions:.2f}M parameters')
  low, high = EXPECTED_MILLIONS[size]
  assert low <= millions <= high


def test_base_counts_like_albef_by_hand():
  """ViT-B/16 at 256 px + BERT-base with 6 of its 12 layers given cross-attention, counted by hand."""
  d, mlp, vocab = 768, 3072, 30522
  layer = 4 * d * d + 4 * d + 2 * d * mlp + mlp + d + 4 * d  # attention, MLP, two LayerNorms
  vit = (3 * 16 * 16 * d + d) + d + (1 + 16 * 16) * d + 12 * layer + 2 * d
  bert = (vocab + 512 + 2) * d + 2 * d + 12 * layer
  cross = 6 * (4 * d * d + 4 * d + 2 * d)
  heads = 2 * (d * 256 + 256) + (d * 2 + 2) + 3
  assert count_params(model_config('base')) == vit + bert + cross + heads


@pytest.fixture(scope='module')
def tiny_setup():
  model = build(micro_model_config())
  variables = model.init(jax.random.key(0), *dummy_inputs(model.spec))
  rng = np.random.default_rng(0)
  s = model.spec
  batch = {
      'images': jnp.asarray(rng.normal(size=(4, s.image_size, s.image_size, 3)), jnp.float32),
      'text_ids': jnp.asarray(rng.integers(5, s.text.vocab_size, size=(4, s.max_text_len)), jnp.int32),
      'text_mask': jnp.asarray(np.arange(s.max_text_len)[None] < np.array([[5], [9], [12], [3]]), jnp.int32),
      'image_ids': jnp.arange(4),
  }
  return model, variables, batch


@pytest.mark.slow  # tiny_setup initialises the micro model eagerly
def test_every_parameter_has_logical_axis_names(tiny_setup):
  _, variables, _ = tiny_setup
  leaves = jax.tree.leaves(variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), type(leaf)
    assert len(leaf.names) == leaf.value.ndim


def _loss_and_grad(model, params, batch):
  def loss_fn(p):
    return compute_loss(model, p, batch, jax.random.key(1), LossWeights(1.0, 1.0, 0.5))
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)


@pytest.mark.slow  # compiles the loss and gradient of the micro model
def test_tiny_loss_and_gradient_are_finite(tiny_setup):
  model, variables, batch = tiny_setup
  (loss, metrics), grads = _loss_and_grad(model, variables['params'], batch)
  assert np.isfinite(float(loss))
  for key in ('itc_loss', 'itm_loss', 'sigmoid_loss', 'temperature'):
    assert np.isfinite(float(metrics[key])), key
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(nn.unbox(grads))]
  assert all(np.isfinite(norms))
  assert sum(n > 0 for n in norms) > 0.9 * len(norms)  # nearly every parameter receives a gradient


def _unstack(params, name):
  """Scanned parameters (module `name`, leading layer axis) -> unscanned `name_0, name_1, ...`."""
  out = {}
  for key, value in params.items():
    if key == name:
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f'{name}_{i}'] = jax.tree.map(lambda x: x[i], value)
    elif isinstance(value, dict):
      out[key] = _unstack(value, name)
    else:
      out[key] = value
  return out


@pytest.mark.slow  # compiles two loss gradients each
@pytest.mark.parametrize('remat', ['none', 'full', 'dots'])
def test_unscanned_and_rematerialised_models_compute_the_same_loss_and_grads(tiny_setup, remat):
  model, variables, batch = tiny_setup
  params = nn.unbox(variables['params'])
  (loss, _), grads = _loss_and_grad(model, params, batch)
  cfg = micro_model_config()
  cfg.scan_layers, cfg.remat = False, remat
  (loss2, _), grads2 = _loss_and_grad(build(cfg), _unstack(params, 'layers'), batch)
  np.testing.assert_allclose(float(loss), float(loss2), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6),
               _unstack(grads, 'layers'), grads2)


@pytest.mark.slow  # compiles a bfloat16 loss gradient
def test_bfloat16_compute_keeps_float32_parameters(tiny_setup):
  _, variables, batch = tiny_setup
  cfg = micro_model_config()
  cfg.dtype = 'bfloat16'
  model = build(cfg)
  params = nn.unbox(variables['params'])
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(model.init(jax.random.key(0),
                                                                        *dummy_inputs(model.spec))))
  tokens, emb = model.apply({'params': params}, batch['images'], method=XModal.encode_image)
  assert tokens.dtype == jnp.bfloat16 and emb.dtype == jnp.float32
  _, emb32 = build(micro_model_config()).apply({'params': params}, batch['images'], method=XModal.encode_image)
  np.testing.assert_allclose(np.asarray(emb), np.asarray(emb32), atol=0.05)


def test_position_embedding_resize_keeps_cls_and_identity_grid():
  posemb = jax.random.normal(jax.random.key(0), (1, 1 + 16, 8))
  assert resize_pos_embedding(posemb, (4, 4)) is posemb
  bigger = resize_pos_embedding(posemb, (6, 6))
  assert bigger.shape == (1, 37, 8)
  np.testing.assert_array_equal(bigger[:, 0], posemb[:, 0])
  # A constant grid stays constant under bicubic resizing.
  flat = jnp.concatenate([posemb[:, :1], jnp.ones((1, 16, 8))], axis=1)
  np.testing.assert_allclose(resize_pos_embedding(flat, (7, 7))[:, 1:], 1.0, atol=1e-5)


def test_sincos2d_position_embeddings_code_the_patch_grid():
  from xmodal.models.vit import sincos2d_init
  grid, width = 5, 16
  posemb = np.asarray(sincos2d_init(None, (1, 1 + grid * grid, width)))
  assert posemb.shape == (1, 1 + grid * grid, width)
  np.testing.assert_array_equal(posemb[0, 0], 0.0)  # [CLS] has no position
  code = posemb[0, 1:].reshape(grid, grid, width)
  # Each (sin, cos) pair has unit norm: every patch's code has squared norm width / 2.
  np.testing.assert_allclose(np.sum(code ** 2, axis=-1), width / 2, rtol=1e-6)
  # The first half codes the row only, the second half the column only, and every patch's code is distinct.
  np.testing.assert_allclose(code[:, :, :width // 2], code[:, :1, :width // 2].repeat(grid, axis=1), atol=1e-7)
  np.testing.assert_allclose(code[:, :, width // 2:], code[:1, :, width // 2:].repeat(grid, axis=0), atol=1e-7)
  flat = code.reshape(grid * grid, width)
  distance = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
  assert np.all(distance[~np.eye(grid * grid, dtype=bool)] > 1e-3)
  # Neighbours are closer than far patches along a row: the code carries the grid's geometry.
  assert np.linalg.norm(code[2, 0] - code[2, 1]) < np.linalg.norm(code[2, 0] - code[2, 4])


@pytest.mark.slow  # initialises the micro model eagerly
def test_sincos2d_is_the_initial_value_of_a_learned_parameter():
  config = micro_model_config()
  config.vision.posemb_init = 'sincos2d'
  model = build(config)
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  from xmodal.models.vit import sincos2d_init
  expected = sincos2d_init(None, params['vision']['pos_embedding'].shape)
  np.testing.assert_allclose(params['vision']['pos_embedding'], expected, atol=1e-7)


@pytest.mark.slow  # initialises and runs two micro models
def test_mean_pooling_embeds_the_mean_of_the_real_tokens():
  config = micro_model_config()
  config.pool = 'mean'
  model = build(config)
  variables = model.init(jax.random.key(0), *dummy_inputs(model.spec))
  params = nn.unbox(variables['params'])
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(5, 60, size=(3, 12)), jnp.int32)
  mask = jnp.asarray(np.arange(12)[None] < np.array([[4], [9], [12]]), jnp.int32)
  tokens, emb = model.apply({'params': params}, ids, mask, method=XModal.encode_text)
  t = np.asarray(tokens, np.float64)
  for row, length in enumerate((4, 9, 12)):
    pooled = t[row, :length].mean(axis=0)
    projected = pooled @ np.asarray(params['text_proj']['kernel'], np.float64) + np.asarray(params['text_proj']['bias'])
    np.testing.assert_allclose(emb[row], projected / np.linalg.norm(projected), atol=1e-5)
  # Changing what stands in the padding changes nothing.
  other = jnp.where(mask == 1, ids, 7)
  np.testing.assert_allclose(model.apply({'params': params}, other, mask, method=XModal.encode_text)[1], emb, atol=1e-6)
  images = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
  image_tokens, image_emb = model.apply({'params': params}, images, method=XModal.encode_image)
  projected = np.asarray(image_tokens, np.float64).mean(axis=1) @ np.asarray(params['image_proj']['kernel'], np.float64)
  projected += np.asarray(params['image_proj']['bias'])
  np.testing.assert_allclose(image_emb, projected / np.linalg.norm(projected, axis=-1, keepdims=True), atol=1e-5)


def test_fc_norm_pooling_normalises_the_mean_of_the_patch_tokens_taken_before_the_final_norm():
  config = micro_model_config()
  config.pool = 'mean_fc_norm'
  model = build(config)
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  width = config.vision.width
  scale, bias = np.linspace(0.5, 1.5, width), np.linspace(-0.1, 0.1, width)
  params['vision']['fc_norm']['norm'] = {'scale': jnp.asarray(scale, jnp.float32), 'bias': jnp.asarray(bias, jnp.float32)}
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  final_norm_inputs = []

  def record(next_fun, args, kwargs, context):
    if context.module.name == 'ln_final' and context.method_name == '__call__':
      final_norm_inputs.append(np.asarray(args[0], np.float64))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _, emb = model.apply({'params': params}, images, method=XModal.encode_image)
  pooled = final_norm_inputs[0][:, 1:].mean(axis=1)  # the patch tokens, not [CLS]
  normed = (pooled - pooled.mean(-1, keepdims=True)) / np.sqrt(pooled.var(-1, keepdims=True) + 1e-6) * scale + bias
  projected = normed @ np.asarray(params['image_proj']['kernel'], np.float64) + np.asarray(params['image_proj']['bias'])
  np.testing.assert_allclose(emb, projected / np.linalg.norm(projected, axis=-1, keepdims=True), atol=1e-5)


def test_max_pooling_projects_the_channel_wise_max_of_the_patch_tokens():
  config = micro_model_config()
  config.pool = 'max'
  model = build(config)
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  tokens, emb = model.apply({'params': params}, images, method=XModal.encode_image)
  patches = np.asarray(tokens, np.float64)[:, 1:]  # not [CLS]
  pooled = np.array([[max(patches[b, :, d]) for d in range(patches.shape[2])] for b in range(2)])
  projected = pooled @ np.asarray(params['image_proj']['kernel'], np.float64) + np.asarray(params['image_proj']['bias'])
  np.testing.assert_allclose(emb, projected / np.linalg.norm(projected, axis=-1, keepdims=True), atol=1e-5)
  assert not np.allclose(pooled, patches.mean(axis=1), atol=1e-3)  # not the mean the other pools take


def test_match_by_image_index_equals_match_on_copies_with_gradients():
  """Pairs that name their images by index (ITM's negatives reuse the batch's images, keys and values projected
  once per image) score as the same pairs given copies of the images, and each image's gradient is the sum over
  the pairs that read it."""
  model = build(micro_model_config())
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(3, 17, model.spec.vision.width)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(5, 8, model.spec.text.width)), jnp.float32)
  mask = jnp.asarray(np.arange(8)[None, :] < np.array([8, 3, 5, 8, 1])[:, None])
  index = jnp.array([2, 0, 2, 1, 2])

  def scores(image_tokens, indexed):
    if indexed:
      logits = model.apply({'params': params}, text, mask, image_tokens, None, index, method=XModal.match)
    else:
      logits = model.apply({'params': params}, text, mask, image_tokens[index], method=XModal.match)
    return jnp.sum(logits * jnp.array([[0.3, -1.0]])), logits

  (_, by_index), grad_by_index = jax.value_and_grad(lambda x: scores(x, True), has_aux=True)(images)
  (_, by_copy), grad_by_copy = jax.value_and_grad(lambda x: scores(x, False), has_aux=True)(images)
  np.testing.assert_allclose(by_index, by_copy, atol=1e-5)
  np.testing.assert_allclose(grad_by_index, grad_by_copy, atol=1e-5)
  assert float(jnp.abs(grad_by_index[2]).sum()) > float(jnp.abs(grad_by_index[0]).sum())  # read three times


@pytest.mark.slow  # initialises and runs three micro image towers
def test_layer_scale_of_one_is_the_plain_block_and_small_starts_near_the_identity():
  config = micro_model_config()
  images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  plain = build(config)
  params = nn.unbox(plain.init(jax.random.key(0), *dummy_inputs(plain.spec))['params'])
  config.vision.layer_scale_init = 1.0
  scaled = build(config)
  scaled_params = nn.unbox(scaled.init(jax.random.key(0), *dummy_inputs(scaled.spec))['params'])
  np.testing.assert_array_equal(scaled_params['vision']['layers']['ls1'], 1.0)
  with_ones = jax.tree.map(lambda x: x, params)
  with_ones['vision']['layers'].update(ls1=scaled_params['vision']['layers']['ls1'],
                                       ls2=scaled_params['vision']['layers']['ls2'])
  np.testing.assert_allclose(scaled.apply({'params': with_ones}, images, method=XModal.encode_image)[1],
                             plain.apply({'params': params}, images, method=XModal.encode_image)[1], atol=1e-6)
  # Near 0, the blocks add almost nothing: the same tokens as blocks whose weights are all zero (the identity).
  tiny = jax.tree.map(lambda x: x, with_ones)
  tiny['vision']['layers'].update(ls1=jnp.full_like(with_ones['vision']['layers']['ls1'], 1e-6),
                                  ls2=jnp.full_like(with_ones['vision']['layers']['ls2'], 1e-6))
  identity = jax.tree.map(lambda x: x, with_ones)
  identity['vision']['layers'] = {name: jax.tree.map(jnp.zeros_like, sub) if name in ('attn', 'mlp') else sub
                                  for name, sub in with_ones['vision']['layers'].items()}
  near = scaled.apply({'params': tiny}, images, method=XModal.encode_image)[0]
  exact = scaled.apply({'params': identity}, images, method=XModal.encode_image)[0]
  full = scaled.apply({'params': with_ones}, images, method=XModal.encode_image)[0]
  np.testing.assert_allclose(near, exact, atol=1e-4)
  assert float(jnp.max(jnp.abs(full - exact))) > 1e-2


def test_lecun_fusion_init_scales_every_fusion_kernel_by_its_fan_in_and_leaves_the_towers_alone():
  config = micro_model_config()
  config.text.width, config.text.heads, config.text.mlp_dim = 64, 4, 256
  config.fusion_init = 'lecun'
  model = build(config)
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  fusion = params['fusion']['layers']  # scanned: a leading layers axis
  width, vision_width = config.text.width, config.vision.width
  # Fan-in by hand: the query reads text tokens, the cross-attention's K/V read image tokens, the output projection
  # contracts heads x head width, fc2 reads the MLP's width. variance_scaling corrects its truncated normal to the
  # std asked for; `truncated_normal(0.02)` (BERT's) cuts at +-2 std, which leaves 0.88 of it.
  fan_ins = {('cross_attn', 'query'): width, ('cross_attn', 'kv'): vision_width, ('cross_attn', 'out'): width,
             ('attn', 'qkv'): width, ('attn', 'out'): width, ('mlp', 'fc1'): width, ('mlp', 'fc2'): 256}
  for (block, name), fan_in in fan_ins.items():
    kernel = np.asarray(fusion[block][name]['kernel'])
    assert np.std(kernel) == pytest.approx(1 / np.sqrt(fan_in), rel=0.1), (block, name)
  # The towers keep BERT's and ViT's std 0.02.
  assert np.std(np.asarray(params['text']['layers']['attn']['qkv']['kernel'])) == pytest.approx(0.88 * 0.02, rel=0.1)
  config.fusion_init = 'bert'
  bert = nn.unbox(build(config).init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  assert np.std(np.asarray(bert['fusion']['layers']['mlp']['fc2']['kernel'])) == pytest.approx(0.88 * 0.02, rel=0.1)


@pytest.mark.slow  # initialises and runs the micro model eagerly
@pytest.mark.parametrize('stem', ['patch', 'conv'])
def test_the_stem_gives_one_token_per_patch(stem):
  config = micro_model_config()
  config.vision.stem = stem
  model = build(config)
  variables = model.init(jax.random.key(0), *dummy_inputs(model.spec))
  tokens, emb = model.apply(variables, jnp.zeros((2, 32, 32, 3)), method=XModal.encode_image)
  assert tokens.shape == (2, 1 + (32 // config.vision.patch_size) ** 2, config.vision.width)
  assert ('conv_stem' in variables['params']['vision']) == (stem == 'conv')


@pytest.mark.slow  # tiny_setup initialises the micro model eagerly
def test_model_runs_at_another_resolution(tiny_setup):
  model, variables, _ = tiny_setup
  images = jnp.zeros((2, 48, 48, 3))
  tokens, emb = model.apply(variables, images, method=XModal.encode_image)
  assert tokens.shape == (2, 1 + (48 // 8) ** 2, model.spec.vision.width)
  assert emb.shape == (2, model.spec.embed_dim)


@pytest.mark.slow  # tiny_setup initialises the micro model eagerly
def test_temperature_is_kept_in_range(tiny_setup):
  model, variables, _ = tiny_setup
  params = nn.unbox(variables['params'])
  assert float(model.apply({'params': params}, method=XModal.temperature)) == pytest.approx(0.07)
  for raw, expected in ((1e-6, 0.001), (3.0, 0.5)):
    changed = dict(params, temperature=jnp.asarray(raw))
    assert float(model.apply({'params': changed}, method=XModal.temperature)) == pytest.approx(expected)


def test_models_losses_and_train_step_import_without_tensorflow():
  import subprocess
  import sys
  code = '''
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):
      raise ImportError('blocked: ' + name)
sys.meta_path.insert(0, Block())
import xmodal.models, xmodal.losses, xmodal.train.objective, xmodal.train.step, xmodal.train.loop, xmodal.train.bench
assert 'tensorflow' not in sys.modules
'''
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


def test_word_window_mixes_each_token_with_the_tokens_before_it_and_never_with_padding():
  """WordWindow against a plain loop: token i becomes LN(x_i + b + sum_k W_k x_{i-k}) over the real tokens at most
  `window` before it; a later token, a farther one or a padding token changes nothing."""
  from xmodal.models.fusion import WordWindow
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 6, 8)).astype(np.float32)
  mask = np.arange(6)[None, :] < np.array([6, 4])[:, None]
  module = WordWindow(window=2, eps=1e-6, kernel_init='lecun')
  params = nn.unbox(module.init(jax.random.key(0), x, mask)['params'])
  params['bias'] = jnp.asarray(rng.normal(size=8), jnp.float32)
  out = np.asarray(module.apply({'params': params}, x, mask))
  kernel, bias = np.asarray(params['kernel'], np.float64), np.asarray(params['bias'], np.float64)
  xm = np.where(mask[..., None], x, 0.0).astype(np.float64)
  for b in range(2):
    for i in range(6):
      mixed = xm[b, i] + bias + sum(xm[b, i - k] @ kernel[k] for k in range(3) if i - k >= 0)
      expected = (mixed - mixed.mean()) / np.sqrt(mixed.var() + 1e-6)  # the LayerNorm's scale 1, bias 0 at init
      if mask[b, i]:
        np.testing.assert_allclose(out[b, i], expected, atol=1e-4)
  changed = x.copy()
  changed[0, 2] += 1.0  # a real token: it and the two after it move; those before it and three after do not
  changed[1, 5] += 1.0  # padding: nothing moves
  moved = np.abs(np.asarray(module.apply({'params': params}, changed, mask)) - out).max(axis=-1) > 1e-6
  np.testing.assert_array_equal(moved[0], [False, False, True, True, True, False])
  assert not moved[1, :4].any()


def test_word_window_is_a_fusion_parameter_and_changes_the_match():
  config = micro_model_config()
  config.fusion_word_window = 2
  model = build(config)
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  fusion = params['fusion']
  assert fusion['word_window']['kernel'].shape == (3, config.text.width, config.text.width)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.normal(size=(2, 17, model.spec.vision.width)), jnp.float32)
  text = jnp.asarray(rng.normal(size=(2, 8, model.spec.text.width)), jnp.float32)
  mask = jnp.ones((2, 8), bool)
  with_window = model.apply({'params': params}, text, mask, images, method=XModal.match)
  zeroed = jax.tree.map(jnp.zeros_like, fusion['word_window'])
  zeroed['ln'] = fusion['word_window']['ln']
  without = model.apply({'params': {**params, 'fusion': {**fusion, 'word_window': zeroed}}}, text, mask, images,
                        method=XModal.match)
  assert not np.allclose(with_window, without, atol=1e-4)


@pytest.mark.slow  # compiles the micro fusion encoder and, scanned, its gradient twice
@pytest.mark.parametrize('scan', [True, False])
def test_a_match_computes_the_last_fusion_layer_for_cls_alone_and_gets_the_full_layers_cls(scan):
  cfg = micro_model_config()
  cfg.update(fusion_depth=3, fusion_word_window=2, fusion_locator=True, scan_layers=scan)
  model = build(cfg)
  params = nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.normal(size=(6, 12, 32)), jnp.float32)
  mask = jnp.asarray(np.arange(12)[None] < np.array([[3], [5], [12], [7], [2], [9]]))
  images, index = jnp.asarray(rng.normal(size=(3, 17, 32)), jnp.float32), jnp.array([0, 1, 2, 0, 1, 2])

  def every_token(p):  # the fusion encoder's every output token, then the ITM head on [CLS]
    return model.apply({'params': p}, method=lambda m: m.itm_head(m.fusion(text, mask, images, None, index)[:, 0]))

  def match(p):
    return model.apply({'params': p}, method=lambda m: m.match(text, mask, images, None, index))
  fused = model.apply({'params': params}, method=lambda m: m.fusion(text, mask, images, None, index, cls_only=True))
  assert fused.shape == (6, 1, 32)
  np.testing.assert_allclose(jax.jit(match)(params), jax.jit(every_token)(params), rtol=1e-5, atol=1e-6)
  if scan:  # the stacked parameters split into a scanned first part and the last layer: their gradients too
    grads = [jax.jit(jax.grad(lambda p: jnp.sum(f(p) ** 2)))(params) for f in (every_token, match)]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6), *grads)


@pytest.mark.slow  # compiles the micro fusion encoder four times
@pytest.mark.parametrize('scan', [True, False])
def test_a_match_on_each_images_kept_keys_and_values_equals_the_match_on_its_tokens(scan):
  """What a search index keeps per image (every cross-attention's keys and values, the Locator's included) scores
  as the image tokens do, pair by pair and with pairs naming their images by index."""
  cfg = micro_model_config()
  cfg.update(fusion_depth=3, fusion_word_window=2, fusion_locator=True, scan_layers=scan)
  model = build(cfg)
  variables = {'params': nn.unbox(model.init(jax.random.key(0), *dummy_inputs(model.spec))['params'])}
  rng = np.random.default_rng(0)
  text = jnp.asarray(rng.normal(size=(6, 12, 32)), jnp.float32)
  mask = jnp.asarray(np.arange(12)[None] < np.array([[3], [5], [12], [7], [2], [9]]))
  images, index = jnp.asarray(rng.normal(size=(3, 17, 32)), jnp.float32), jnp.array([0, 1, 2, 0, 1, 2])
  keys_values = model.apply(variables, images, method=XModal.image_keys_values)
  assert keys_values.shape == (4, 2, 3, 2, 16, 17)  # (Locator + 3 layers, k and v, images, heads, head dim, tokens)
  match = jax.jit(lambda *args, **kwargs: model.apply(variables, *args, **kwargs, method=XModal.match))
  reference = match(text, mask, images, image_index=index)
  np.testing.assert_allclose(match(text, mask, None, image_index=index, keys_values=keys_values), reference,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(match(text, mask, None, keys_values=keys_values[:, :, index]), reference,
                             rtol=1e-5, atol=1e-6)
  pairs = [(keys[index], values[index]) for keys, values in keys_values]  # each layer's own arrays
  np.testing.assert_allclose(match(text, mask, None, keys_values=pairs), reference, rtol=1e-5, atol=1e-6)
  # Texts named by index, as a search's pairs name their query: the texts' own layers run once per text.
  texts, text_index = text[:3], jnp.array([2, 0, 1, 1, 0, 2])
  np.testing.assert_allclose(
      match(texts, mask[:3], None, image_index=index, keys_values=keys_values, text_index=text_index),
      match(texts[text_index], mask[:3][text_index], images, image_index=index), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('shape', [(2, 8, 8, 3), (1, 7, 5, 2)])
def test_the_strided_conv_is_a_3x3_stride_2_same_convolution(shape):
  """Against a loop over output pixels (TensorFlow's 'SAME': the odd padding pixel after) and nn.Conv's
  initial parameters."""
  from xmodal.models.vit import StridedConv
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  conv = StridedConv(4)
  params = nn.unbox(conv.init(jax.random.key(0), jnp.asarray(x)))
  reference = nn.Conv(4, (3, 3), strides=(2, 2), padding='SAME', kernel_init=nn.initializers.lecun_normal())
  np.testing.assert_array_equal(params['params']['kernel'],
                                reference.init(jax.random.key(0), jnp.asarray(x))['params']['kernel'])
  kernel, bias = (np.asarray(params['params'][name]) for name in ('kernel', 'bias'))
  height, width = shape[1:3]
  rows, cols = -(-height // 2), -(-width // 2)
  pad = [max((n - 1) * 2 + 3 - size, 0) for n, size in ((rows, height), (cols, width))]
  padded = np.pad(x, [(0, 0), (pad[0] // 2, pad[0] - pad[0] // 2), (pad[1] // 2, pad[1] - pad[1] // 2), (0, 0)])
  expected = np.zeros((shape[0], rows, cols, 4), np.float32)
  for i in range(rows):
    for j in range(cols):
      window = padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3]  # (B, 3, 3, C)
      expected[:, i, j] = np.einsum('byxc,yxco->bo', window, kernel) + bias
  np.testing.assert_allclose(conv.apply(params, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
