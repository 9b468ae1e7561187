"""Explanations: per-token heatmaps from the fusion encoder's cross-attention (xmodal.models.explain), their bundle
function and Retriever.explain, the overlays, `xmodal search --explain`, and the pointing test's scoring."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import micro_model_config
from test_export import bundle_config, init_params, random_images, write_pngs


def _inputs(model, batch=3, seed=0):
  """Random images, ids and masks of three lengths (4, 7 and full) for the micro model."""
  from xmodal.models.model import dummy_inputs
  images, ids, _ = dummy_inputs(model.spec, batch)
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=images.shape), jnp.float32)
  ids = jnp.asarray(rng.integers(5, 60, ids.shape), jnp.int32)
  lengths = np.array([4, 7, ids.shape[1]])[:batch, None]
  mask = jnp.asarray(np.arange(ids.shape[1])[None] < lengths, jnp.int32)
  return images, ids, mask


def _model(locator: bool, scan: bool):
  from xmodal.models.model import build
  config = micro_model_config()
  config.update(fusion_locator=locator, fusion_word_window=2 if locator else 0, scan_layers=scan)
  return build(config)


@pytest.mark.parametrize('locator,scan', [(True, True), (False, False)])
def test_maps_are_the_head_mean_of_the_weights_and_gradcam_uses_a_gradient_finite_differences_confirm(locator, scan):
  """The attention maps are the sown cross-attention weights averaged over heads; Grad-CAM is weights times the
  positive part of d(ITM logit)/d(weights), a gradient checked here against central differences of the logit."""
  from xmodal.models import explain
  from xmodal.models.layers import EXPLAIN_NAME
  from xmodal.models.model import XModal
  model = _model(locator, scan)
  images, ids, mask = _inputs(model)
  params = model.init(jax.random.key(0), images, ids, mask)['params']
  image_tokens, _ = model.apply({'params': params}, images, method=XModal.encode_image)
  text_tokens, _ = model.apply({'params': params}, ids, mask, method=XModal.encode_text)
  maps, logit = jax.jit(functools.partial(explain.explain, model))(params, text_tokens, mask, image_tokens)
  depth = model.spec.fusion_depth + int(locator)
  assert maps.shape == (3, 2, depth, ids.shape[1], image_tokens.shape[1] - 1)
  reference = model.apply({'params': params}, text_tokens, mask, image_tokens, method=XModal.match)[:, 1]
  np.testing.assert_allclose(logit, reference, atol=1e-5)

  # The test's own route to the weights and their gradient: perturbations, as flax documents them.
  run = lambda p: model.apply({'params': params, 'perturbations': p}, text_tokens, mask, image_tokens,
                              method=XModal.match_explained, mutable=['intermediates'])
  _, state = model.apply({'params': params}, text_tokens, mask, image_tokens, method=XModal.match_explained,
                         mutable=['perturbations', 'intermediates'])
  zeros = jax.tree.map(jnp.zeros_like, state['perturbations'])
  total = lambda p: jnp.sum(run(p)[0][:, 1])
  gradients = jax.grad(total)(zeros)
  sown = run(zeros)[1]['intermediates']

  def layers(tree, sown_tuple):
    fusion = tree['fusion']
    out = []
    if locator:
      leaf = fusion['locator']['layer']['cross_attn'][EXPLAIN_NAME]
      out.append(np.asarray(leaf[0] if sown_tuple else leaf))
    if scan:
      leaf = fusion['layers']['cross_attn'][EXPLAIN_NAME]
      out += list(np.asarray(leaf[0] if sown_tuple else leaf))
    else:
      for i in range(model.spec.fusion_depth):
        leaf = fusion[f'layers_{i}']['cross_attn'][EXPLAIN_NAME]
        out.append(np.asarray(leaf[0] if sown_tuple else leaf))
    return out

  weights, grads = layers(sown, True), layers(gradients, False)
  for k, (w, g) in enumerate(zip(weights, grads)):
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)  # each query's distribution over the image tokens
    np.testing.assert_allclose(maps[:, 0, k], w.mean(axis=1)[..., 1:], atol=1e-6)
    np.testing.assert_allclose(maps[:, 1, k], (w * np.maximum(g, 0)).mean(axis=1)[..., 1:], atol=1e-7)
  if locator:  # its places reach the logit through a stop-gradient only
    assert np.all(grads[0] == 0)
  first = 1 if locator else 0
  assert np.abs(grads[first]).max() > 0

  # Central differences along a random direction in the first fusion layer's weights.
  direction = np.random.default_rng(1).normal(size=grads[first].shape).astype(np.float32)
  def shifted(eps):
    p = jax.tree.map(jnp.zeros_like, zeros)
    if scan:
      stacked = jnp.zeros_like(zeros['fusion']['layers']['cross_attn'][EXPLAIN_NAME])
      p['fusion']['layers']['cross_attn'][EXPLAIN_NAME] = stacked.at[0].set(eps * direction)
    else:
      p['fusion']['layers_0']['cross_attn'][EXPLAIN_NAME] = eps * direction
    return float(total(p))
  eps = 1e-2
  numeric = (shifted(eps) - shifted(-eps)) / (2 * eps)
  analytic = float(np.sum(grads[first] * direction))
  assert abs(numeric - analytic) <= 2e-2 * abs(analytic) + 1e-6, (numeric, analytic)


@pytest.fixture(scope='module')
def explained_bundle(tmp_path_factory):
  """(model, params, bundle) of a random micro model with the shapes default's fusion encoder (word window and
  Locator), exported."""
  from xmodal.bundle import export
  config = bundle_config()
  config.model.update(fusion_locator=True, fusion_word_window=2)
  model, params = init_params(config)
  out = tmp_path_factory.mktemp('bundle') / 'explained'
  export.export_bundle(config, params, 'shapes', out)
  return model, params, out


@pytest.mark.slow
def test_the_bundles_explain_equals_the_frameworks_and_retriever_explain_reads_it(explained_bundle):
  from xmodal.inference import Retriever
  from xmodal.inference import explain as inference_explain
  from xmodal.models import explain
  from xmodal.models.model import XModal
  model, params, bundle = explained_bundle
  retriever = Retriever.load(bundle, batch_size=8)
  images = random_images(5, seed=2)
  texts = ['a red circle', 'a small blue square left of a green triangle', 'green', 'a red circle', 'two shapes']
  _, text_tokens, mask = retriever.encode_texts(texts)
  _, image_tokens = retriever.encode_images(images)
  maps, logit = retriever._run('explain', text_tokens, mask, image_tokens)
  ref_maps, ref_logit = jax.jit(functools.partial(explain.explain, model))(params, text_tokens, mask, image_tokens)
  np.testing.assert_allclose(maps, ref_maps, atol=1e-5)
  np.testing.assert_allclose(logit, ref_logit, atol=1e-5)
  np.testing.assert_allclose(logit, retriever.match_tokens(text_tokens, mask, image_tokens), atol=1e-5)

  query = texts[1]
  explanation = retriever.explain(query, images[1], method='attention', layer=0)
  words = query.split()
  assert explanation.tokens == words and len(explanation.maps) == len(words)
  grid = math.isqrt(image_tokens.shape[1] - 1)
  expected = ref_maps[1, 0, 0, 1:1 + len(words)].reshape(len(words), grid, grid)
  np.testing.assert_allclose(explanation.maps, expected / expected.max(axis=(1, 2), keepdims=True), atol=1e-5)
  assert explanation.itm == pytest.approx(float(ref_logit[1]), abs=1e-5)
  # Function words get no overlay; the rest keep their own maps.
  assert [w for w, _ in explanation.words()] == ['small', 'blue', 'square', 'left', 'green', 'triangle']
  np.testing.assert_allclose(dict(explanation.words())['green'], explanation.maps[words.index('green')])
  assert retriever.explain(query, images[1], method='gradcam', layer=-1).layer == 2
  with pytest.raises(ValueError, match='not one of'):
    retriever.explain(query, images[1], method='saliency')
  with pytest.raises(ValueError, match='out of range'):
    retriever.explain(query, images[1], layer=3)
  with pytest.raises(ValueError, match='empty'):
    retriever.explain('  ', images[1])
  del inference_explain, XModal


def test_words_merge_pieces_that_touch_and_drop_function_words():
  from xmodal.inference.explain import Explanation
  maps = np.zeros((5, 2, 2), np.float32)
  for i in range(5):
    maps[i].flat[i % 4] = i + 1.0
  explanation = Explanation('a redd-ish box,', ['a', 'red', 'd', '-ish', 'box', ','],
                            [(0, 1), (2, 5), (5, 6), (6, 10), (11, 14), (14, 15)], maps[[0, 1, 2, 3, 4, 4]], 0.0,
                            'attention', 0)
  words = explanation.words()
  assert [w for w, _ in words] == ['redd-ish', 'box']
  merged = maps[1:4].mean(axis=0)
  np.testing.assert_allclose(words[0][1], merged / merged.max())
  assert [w for w, _ in explanation.words(content_only=False)] == ['a', 'redd-ish', 'box', ',']


def test_overlay_lights_the_map_and_dims_the_rest():
  from xmodal.inference.explain import overlay
  rgb = np.full((32, 32, 3), 200, np.uint8)
  heat = np.zeros((4, 4), np.float32)
  heat[0, 3] = 1.0  # top right
  lit = overlay(rgb, heat, floor=0.2)
  assert lit.shape == rgb.shape and lit.dtype == np.uint8
  assert lit[3, 28].min() >= 190 and lit[28, 3].max() <= 41  # lit cell near full, far cell at the floor


def test_pointing_scores_the_hottest_patch_against_the_named_objects_circle():
  """Targets and hits against a plain loop: a caption of two objects, maps peaking where the test puts them."""
  from xmodal.data.shapes.render import Obj, Scene
  from xmodal.evaluation import pointing
  from xmodal.tokenizer import load_tokenizer
  size, grid = 64, 8
  scene = Scene([Obj('red', 'circle', 'large', 12.0, 12.0, 9.3), Obj('blue', 'square', 'small', 50.0, 44.0, 5.4)],
                (0, 'left', 1))
  caption = 'a big red circle to the left of one blue box'
  tokenizer = load_tokenizer('shapes')
  offsets = tokenizer.token_offsets([caption])
  targets = pointing.targets([caption], [scene], offsets, max_len=24)
  words = caption.split()
  position = lambda word: 1 + words.index(word)  # one token per word in the shapes vocabulary, [CLS] first
  assert [(t.kind, t.tokens, t.x) for t in targets] == [
      ('shape', (position('circle'),), 12.0), ('colour', (position('red'),), 12.0),
      ('shape', (position('box'),), 50.0), ('colour', (position('blue'),), 50.0)]
  cell = lambda x, y: int(y // (size / grid)) * grid + int(x // (size / grid))
  maps = np.zeros((1, 2, 1, 24, grid * grid), np.float32)
  maps[0, :, 0, position('circle'), cell(12, 12)] = 1.0  # on the circle
  maps[0, :, 0, position('red'), cell(50, 44)] = 1.0  # on the other object
  maps[0, 0, 0, position('box'), cell(50, 44)] = 1.0  # method 0 finds the box, method 1 does not
  maps[0, 1, 0, position('box'), cell(5, 60)] = 1.0
  maps[0, :, 0, position('blue'), cell(52, 46)] = 1.0  # the cell's centre (52, 44) is 2 px from the box's
  hit = pointing.hits(maps, targets, size)

  def loop(t, m):  # the hottest patch's centre, from first principles
    best = int(np.argmax(maps[0, m, 0, list(t.tokens)].mean(axis=0)))
    cx, cy = (best % grid + 0.5) * size / grid, (best // grid + 0.5) * size / grid
    return (cx - t.x) ** 2 + (cy - t.y) ** 2 <= t.radius ** 2
  expected = np.array([[[loop(t, m)] for m in range(2)] for t in targets])
  np.testing.assert_array_equal(hit, expected)
  assert hit[:, :, 0].tolist() == [[True, True], [False, False], [True, False], [True, True]]
  centres = [((i % grid + 0.5) * 8, (i // grid + 0.5) * 8) for i in range(grid * grid)]
  inside = [sum((x - t.x) ** 2 + (y - t.y) ** 2 <= t.radius ** 2 for x, y in centres) / len(centres)
            for t in targets]
  assert pointing.chance(targets, grid * grid, size) == pytest.approx(np.mean(inside))


@pytest.mark.slow
def test_xmodal_search_explain_writes_an_overlay_per_content_word_into_the_page(explained_bundle, tmp_path, capsys):
  from PIL import Image
  from xmodal.cli.main import main
  _, _, bundle = explained_bundle
  folder = write_pngs(random_images(6, seed=3), tmp_path / 'gallery')
  out = tmp_path / 'sheet'
  assert main(['search', '--bundle', str(bundle), '--images', str(folder), '--query', 'a red circle left of a box',
               '--k', '3', '--out', str(out), '--explain', '--no-progress']) == 0
  pngs = sorted((out / 'explain').glob('*.png'))
  # 3 results x the content words 'red', 'circle', 'left', 'box'
  assert [p.name.split('_', 2)[2] for p in pngs[:4]] == ['red.png', 'circle.png', 'left.png', 'box.png']
  assert len(pngs) == 12 and Image.open(pngs[0]).size == (32, 32)
  page = (out / 'results.html').read_text()
  assert page.count('<div class="hit">') == 3 and all(f'explain/{p.name}' in page for p in pngs)
  capsys.readouterr()
  assert main(['search', '--bundle', str(bundle), '--images', str(folder), '--query', 'a red circle',
               '--explain', '--no-progress']) == 2
  assert '--explain' in capsys.readouterr().err


@pytest.mark.slow
def test_the_pointing_run_scores_every_shape_and_colour_word_of_a_split(tmp_path):
  """`xmodal eval --pointing`'s driver on a tiny shapes build with a random model: every named word within the text
  length is scored once per method and layer (counted here from the captions by a loop), chance is the objects'
  share of patches."""
  from xmodal.data.shapes import builder as shapes_lib
  from xmodal.data.shapes.captions import named_objects
  from xmodal.tokenizer import load_tokenizer
  from xmodal.train import pointing
  shapes_config = shapes_lib.shapes_config(seed=0, image_size=32, train_size=8, validation_size=8, test_size=12,
                                           test_hard_size=4, validation_hard_size=4)
  builder = shapes_lib.XmodalShapes(config=shapes_config, data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare()
  config = bundle_config()
  config.model.update(fusion_locator=True, fusion_word_window=2)
  config.data.tfds_name = builder.data_dir
  model, params = init_params(config)
  results = pointing.run(config, model, params, 'test', batch_size=16)

  _, captions = shapes_lib.read_split(builder, 'test')
  texts = [c for cs in captions for c in cs]
  tokenizer = load_tokenizer('shapes')
  within = lambda text, span: any(a < span[1] and b > span[0] and i + 1 < config.model.max_text_len - 1
                                  for i, (a, b) in enumerate(tokenizer.token_offsets([text])[0]))
  shape_words = sum(within(t, o.shape_span) for t in texts for o in named_objects(t))
  colour_words = sum(within(t, o.color_span) for t in texts for o in named_objects(t))
  assert results['pairs'] == len(texts) == 60 and results['layers'] == 3
  assert results['shape']['count'] == shape_words > 0 and results['colour']['count'] == colour_words > 0
  for kind in ('shape', 'colour'):
    assert 1.0 < results[kind]['chance'] < 10.0
    assert all(len(results[kind][m]) == 3 and all(0 <= v <= 100 for v in results[kind][m])
               for m in ('attention', 'gradcam'))
    assert results[kind]['gradcam'][0] <= 100.0 / results[kind]['count'] * 5  # the Locator's Grad-CAM is all zero
  assert 'layer 0' in pointing.format_table(results)
