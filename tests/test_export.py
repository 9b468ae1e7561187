"""Inference bundles: the exported functions equal the model, the bundle runs without training code or TensorFlow,
and a damaged bundle is refused naming the file."""

import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import ROOT, micro_config

# Every test but one uses the exported micro bundle (module fixture), whose export compiles each function.
pytestmark = pytest.mark.slow

CAPTIONS = ['a red circle', 'a small blue square left of a green triangle', 'two shapes', 'a large yellow star',
            'a purple circle above a red square', 'green', 'a blue triangle right of a small red circle']


def bundle_config():
  """The micro model with the shipped shapes vocabulary."""
  config = micro_config()
  config.model.text.vocab_size = 256  # the shipped shapes vocabulary has 168 entries
  return config


def init_params(config, seed=0):
  """(model, a checkpoint-like float32 parameter tree): random values at the model's shapes, no init compile."""
  import flax.linen as nn
  from xmodal.models import build
  from xmodal.models.model import ModelSpec, dummy_inputs
  model = build(config.model)
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(ModelSpec.from_config(config.model))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    noise = rng.normal(0.0, 0.05, leaf.shape).astype(np.float32)
    # Norm scales near 1, as initialised, keep activations in the usual range.
    return noise + 1.0 if path[-1].key == 'scale' else noise

  return model, jax.tree_util.tree_map_with_path(fill, shapes['params'])


def random_images(count, size=32, seed=0):
  return list(np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8))


def write_pngs(images, folder):
  from PIL import Image
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f'img{i:03d}.png')
  return folder


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(model, params, bundle dir) of a randomly initialised micro model: equality needs no training."""
  from xmodal.bundle import export
  config = bundle_config()
  model, params = init_params(config)
  out = tmp_path_factory.mktemp('bundle') / 'micro'
  export.export_bundle(config, params, 'shapes', out)
  return model, params, out


def relative_error(actual, expected):
  return float(np.linalg.norm(np.asarray(actual, np.float64) - expected) / np.linalg.norm(expected))


def test_bundle_functions_equal_the_model_at_batch_1_7_64(exported):
  import functools
  from xmodal.inference import Retriever
  from xmodal.models.model import XModal
  model, params, bundle = exported
  retriever = Retriever.load(bundle, batch_size=64)
  variables = {'params': params}
  apply = lambda method: jax.jit(functools.partial(model.apply, variables, method=method))
  # The reference runs once at 64; rows are independent, so its first 1 and 7 rows are the smaller batches'.
  pixels = retriever.preprocess(random_images(64, seed=1))
  texts = (CAPTIONS * 10)[:64]
  ids, ref_mask = retriever.tokenize(texts)
  ref_tokens, ref_emb = apply(XModal.encode_image)(jnp.asarray(pixels))
  ref_text_tokens, ref_text_emb = apply(XModal.encode_text)(ids, ref_mask)
  ref_logits = apply(XModal.match)(ref_text_tokens, ref_mask, ref_tokens)
  for batch in (1, 7, 64):
    emb, tokens = retriever.encode_pixels(pixels[:batch])
    assert emb.shape == (batch, 16) and tokens.shape == (batch, *ref_tokens.shape[1:])
    assert relative_error(emb, ref_emb[:batch]) <= 1e-5 and relative_error(tokens, ref_tokens[:batch]) <= 1e-5
    text_emb, text_tokens, mask = retriever.encode_texts(texts[:batch])
    np.testing.assert_array_equal(mask, ref_mask[:batch])
    assert relative_error(text_emb, ref_text_emb[:batch]) <= 1e-5
    assert relative_error(text_tokens, ref_text_tokens[:batch]) <= 1e-5
    scores = retriever.match_tokens(text_tokens, mask, tokens)
    assert scores.shape == (batch,) and relative_error(scores, ref_logits[:batch, 1]) <= 1e-5


def test_the_matches_at_each_texts_length_and_on_kept_keys_values_equal_the_models_full_length_match(tmp_path):
  """The shapes model's fusion encoder (a word window, a Locator) as exported: texts cut to their length bucket,
  named by index, matched against each image's keys and values (or its tokens) give the model's full-length match."""
  from xmodal.bundle import export, format as bundle_lib
  from xmodal.inference import Retriever, ranking
  from xmodal.models.model import XModal
  config = bundle_config()
  config.model.update(fusion_word_window=2, fusion_locator=True)
  model, params = init_params(config)
  export.export_bundle(config, params, 'shapes', tmp_path / 'bundle')
  flat = bundle_lib.load_safetensors(tmp_path / 'bundle' / bundle_lib.PARAMS)

  def call(name, *inputs):
    exported = jax.export.deserialize(bytearray((tmp_path / 'bundle' / bundle_lib.function_file(name)).read_bytes()))
    return exported.call(flat, *inputs)

  retriever = Retriever.load(tmp_path / 'bundle')
  _, text_tokens, mask = retriever.encode_texts(CAPTIONS)  # 7 texts of 3 to 11 tokens: lengths 8 and 12
  _, image_tokens = retriever.encode_pixels(retriever.preprocess(random_images(3, seed=2)))
  texts, images = np.repeat(np.arange(len(CAPTIONS)), 3), np.tile(np.arange(3), len(CAPTIONS))  # every pair
  reference = np.asarray(model.apply({'params': params}, text_tokens[texts], mask[texts], image_tokens[images],
                                     method=XModal.match))
  keys_values = np.asarray(call('image_keys_values', image_tokens))  # (images, C, 2, H, Dh, 1+N)
  assert keys_values.shape == (3, 3, 2, 2, 16, 17)  # the Locator's cross-attention and the 2 layers'
  lengths = ranking.text_lengths(mask)[texts]
  assert set(lengths) == {8, 12}
  for length in set(lengths):
    rows = np.flatnonzero(lengths == length)
    cut = text_tokens[texts[rows], :length], mask[texts[rows], :length]
    np.testing.assert_allclose(call('match', *cut, image_tokens[images[rows]]), reference[rows], atol=1e-5)
    distinct, text_index = np.unique(texts[rows], return_inverse=True)
    layers = [keys_values[images[rows], layer, kind] for layer in range(3) for kind in range(2)]
    logits = call('match_keys_values', text_tokens[distinct, :length], mask[distinct, :length],
                  text_index.astype(np.int32), *layers)
    np.testing.assert_allclose(logits, reference[rows], atol=1e-5)


def old_style_copy(bundle, out, model):
  """`bundle` as exports before re-ranking at a query's length wrote it: the match at the model's fixed text length
  and no functions for keys and values."""
  from xmodal.bundle import export, format as bundle_lib
  shutil.copytree(bundle, out)
  manifest = json.loads((out / 'manifest.json').read_text())
  for name in bundle_lib.OPTIONAL_FUNCTIONS:
    (out / bundle_lib.function_file(name)).unlink()
    del manifest['functions'][name], manifest['files'][bundle_lib.function_file(name)]
  inputs = manifest['functions']['match']['inputs']
  length = model.spec.max_text_len
  for name in ('text_tokens', 'text_mask'):
    inputs[name]['shape'][1] = length
  (b,) = jax.export.symbolic_shape('b')
  specs = [jax.ShapeDtypeStruct((b, *inputs[name]['shape'][1:]), inputs[name]['dtype'])
           for name in ('text_tokens', 'text_mask', 'image_tokens')]
  flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
          for k, v in bundle_lib.load_safetensors(out / bundle_lib.PARAMS).items()}
  fixed = jax.export.export(jax.jit(export._model_functions(model)['match']))(flat, *specs)
  (out / 'match.stablehlo').write_bytes(fixed.serialize())
  (out / 'manifest.json').write_text(json.dumps(manifest))
  _rehash(out, 'match.stablehlo')
  return out


def test_a_bundle_exported_before_keys_values_loads_and_searches_through_its_fixed_length_match(exported, tmp_path):
  from xmodal.inference import Retriever
  model, _, bundle = exported
  old, new = Retriever.load(old_style_copy(bundle, tmp_path / 'old', model)), Retriever.load(bundle)
  assert (old.match_any_length, old.can_keep_keys_values, new.match_any_length, new.can_keep_keys_values) == (
      False, False, True, True)
  images = random_images(10, seed=4)
  old_index, new_index = old.index(images, progress=False), new.index(images, progress=False, keep_keys_values=True)
  scores = lambda hits: [{h.index: h.itm for h in row} for row in hits]
  expected = scores(new.search(CAPTIONS, new_index, k=8, rerank=8))
  for got in (scores(old.search(CAPTIONS, old_index, k=8, rerank=8)),
              scores(old.search(CAPTIONS, new_index, k=8, rerank=8))):  # the new index through the old bundle's match
    for row, expected_row in zip(got, expected):
      assert row.keys() == expected_row.keys()
      np.testing.assert_allclose([row[i] for i in row], [expected_row[i] for i in row], atol=1e-5)
  with pytest.raises(ValueError, match='does not export image_keys_values'):
    old.index(images, progress=False, keep_keys_values=True)


def test_manifest_lists_every_file_with_its_sha256_and_symbolic_signatures(exported):
  from xmodal.bundle import format as bundle_lib
  _, params, bundle = exported
  manifest = json.loads((bundle / 'manifest.json').read_text())
  on_disk = sorted(p.relative_to(bundle).as_posix() for p in bundle.rglob('*') if p.is_file())
  assert sorted(manifest['files']) == [f for f in on_disk if f != 'manifest.json']
  for name, entry in manifest['files'].items():
    assert entry['sha256'] == bundle_lib.sha256_file(bundle / name)
  assert manifest['format_version'] == bundle_lib.FORMAT_VERSION and manifest['jax_version'] == jax.__version__
  assert manifest['functions']['encode_image']['inputs']['images']['shape'] == ['b', 32, 32, 3]
  assert manifest['functions']['match']['outputs'] == [{'shape': ['b', 2], 'dtype': 'float32'}]
  # The matches take any text length (a search cuts each query to its own); an index keeps (C, 2, H, Dh, 1+N) per
  # image: the micro model's 2 cross-attentions, keys and values, 2 heads of 16, 16 patches and [CLS].
  assert manifest['functions']['match']['inputs']['text_tokens']['shape'] == ['b', 'l', 32]
  assert manifest['functions']['image_keys_values']['outputs'][0]['shape'] == ['b', 2, 2, 2, 16, 17]
  assert {name: entry['shape'] for name, entry in manifest['functions']['match_keys_values']['inputs'].items()} == {
      'text_tokens': ['t', 'l', 32], 'text_mask': ['t', 'l'], 'text_index': ['b'], 'keys_0': ['b', 2, 16, 17],
      'values_0': ['b', 2, 16, 17], 'keys_1': ['b', 2, 16, 17], 'values_1': ['b', 2, 16, 17]}
  # Parameters only, readable by the safetensors library itself; no optimizer state, no pickle anywhere.
  from safetensors.numpy import load_file
  stored = load_file(bundle / 'params.safetensors')
  assert len(stored) == manifest['parameters']['tensors'] == len(jax.tree.leaves(params))
  assert not any(p.suffix in ('.pkl', '.pickle', '.msgpack') for p in bundle.rglob('*'))


def test_bfloat16_bundle_is_half_the_size_and_close_to_float32(exported, tmp_path):
  from xmodal.bundle import export
  from xmodal.inference import Retriever
  _, params, bundle = exported
  out = tmp_path / 'bf16'
  export.export_bundle(bundle_config(), params, 'shapes', out, dtype='bfloat16')
  assert (out / 'params.safetensors').stat().st_size < 0.6 * (bundle / 'params.safetensors').stat().st_size
  pixels = Retriever.load(bundle).preprocess(random_images(4))
  emb32, _ = Retriever.load(bundle).encode_pixels(pixels)
  emb16, _ = Retriever.load(out).encode_pixels(pixels)
  assert emb16.dtype == np.float32 and np.min(np.sum(emb32 * emb16, axis=1)) > 0.98


def test_pil_preprocessing_matches_the_tensorflow_eval_pipeline():
  import tensorflow as tf
  from PIL import Image
  import io
  from xmodal.bundle import format as bundle_lib
  from xmodal.data import preprocess as tf_preprocess
  from xmodal.inference import preprocess
  spec = bundle_lib.preprocess_spec(32, (120.0, 110.0, 100.0), (60.0, 50.0, 70.0))
  rng = np.random.default_rng(0)
  for shape in ((32, 32), (45, 70), (100, 61), (20, 24)):
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format='PNG')
    expected = tf_preprocess.eval_image(tf.constant(buffer.getvalue()), size=32, mean=spec['mean'],
                                        std=spec['std']).numpy()
    actual = preprocess.preprocess(preprocess.load_rgb(image), spec)
    # Same resize filter up to float rounding; 0.02 normalised units is ~1 grey level.
    np.testing.assert_allclose(actual, expected, atol=0.02)


BLOCKED_RUN = textwrap.dedent('''
    import importlib.abc, json, sys

    BLOCKED = ('tensorflow', 'tensorflow_datasets', 'flax', 'optax', 'orbax', 'xmodal.train', 'xmodal.models')

    class Block(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + '.') for b in BLOCKED):
          raise ImportError(f'blocked in this test: {name}')
        return None

    sys.meta_path.insert(0, Block())
    from xmodal.inference import Retriever
    retriever = Retriever.load(sys.argv[1])
    index = retriever.index(sys.argv[2], progress=False)
    hits = retriever.search('a red circle', index, k=3, rerank=2)
    words = [w for w, _ in retriever.explain('a red circle', hits[0].name).words()]
    loaded = sorted(m for m in sys.modules if any(m == b or m.startswith(b + '.') for b in BLOCKED))
    print(json.dumps({'names': [h.name for h in hits], 'itm': [h.itm for h in hits], 'words': words,
                      'loaded': loaded}))
''')


def test_a_process_without_tensorflow_or_model_code_loads_the_bundle_searches_and_explains(exported, tmp_path):
  _, _, bundle = exported
  folder = write_pngs(random_images(5, size=40), tmp_path / 'gallery')
  result = subprocess.run([sys.executable, '-c', BLOCKED_RUN, str(bundle), str(folder)], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert len(out['names']) == 3 and all(n.startswith(str(folder)) for n in out['names'])
  assert out['itm'][0] is not None and out['itm'][2] is None  # 2 re-ranked, the third by ITC only
  assert out['words'] == ['red', 'circle']  # explanations run from the bundle alone too
  assert out['loaded'] == []


def _damaged_copy(bundle, tmp_path, damage):
  copy = tmp_path / 'damaged'
  shutil.copytree(bundle, copy)
  damage(copy)
  return copy


def _flip_byte(path, position=-1):
  data = bytearray(path.read_bytes())
  data[position] ^= 0xFF
  path.write_bytes(bytes(data))


def _truncate(path):
  path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])


def _set_manifest(copy, **fields):
  manifest = json.loads((copy / 'manifest.json').read_text())
  manifest.update(fields)
  (copy / 'manifest.json').write_text(json.dumps(manifest))


def _drop_file(copy, name):
  """Deletes a file and its line in the manifest's files (its function stays listed)."""
  (copy / name).unlink()
  manifest = json.loads((copy / 'manifest.json').read_text())
  del manifest['files'][name]
  (copy / 'manifest.json').write_text(json.dumps(manifest))


def _rehash(copy, name):
  from xmodal.bundle import format as bundle_lib
  manifest = json.loads((copy / 'manifest.json').read_text())
  manifest['files'][name] = {'sha256': bundle_lib.sha256_file(copy / name), 'bytes': (copy / name).stat().st_size}
  (copy / 'manifest.json').write_text(json.dumps(manifest))


@pytest.mark.parametrize('damage, message', [
    (lambda c: _flip_byte(c / 'params.safetensors'), r'params\.safetensors: sha256 mismatch'),
    (lambda c: (c / 'match.stablehlo').unlink(), r'match\.stablehlo: missing'),
    (lambda c: _drop_file(c, 'match_keys_values.stablehlo'), r'match_keys_values\.stablehlo: not listed'),
    (lambda c: (c / 'tokenizer' / 'shapes_vocab.txt').write_text('[PAD]\n'), r'shapes_vocab\.txt: \d+ bytes'),
    (lambda c: (c / 'manifest.json').unlink(), r'manifest\.json: missing'),
    (lambda c: (c / 'manifest.json').write_text('{"format": '), r'manifest\.json: not valid JSON'),
    (lambda c: _set_manifest(c, format_version=99), r'manifest\.json: bundle format version 99 is not supported'),
    (lambda c: (_truncate(c / 'encode_text.stablehlo'), _rehash(c, 'encode_text.stablehlo')),
     r'encode_text\.stablehlo: cannot deserialize'),
    (lambda c: ((c / 'params.safetensors').write_bytes(b'\x10' + b'\x00' * 7 + b'not json'),
                _rehash(c, 'params.safetensors')), r'params\.safetensors: not a readable safetensors'),
], ids=['checksum', 'missing_function', 'missing_optional_function', 'truncated_tokenizer', 'missing_manifest',
        'bad_manifest', 'version', 'corrupt_stablehlo_with_valid_checksum', 'corrupt_params_with_valid_checksum'])
def test_a_damaged_bundle_is_refused_naming_the_file(exported, tmp_path, damage, message):
  from xmodal.inference import BundleError, Retriever
  copy = _damaged_copy(exported[2], tmp_path, damage)
  with pytest.raises(BundleError, match=message):
    Retriever.load(copy)


def test_export_refuses_a_non_empty_directory_and_leaves_no_partial_bundle(exported, tmp_path):
  from xmodal.bundle import export
  _, params, _ = exported
  (tmp_path / 'busy').mkdir()
  (tmp_path / 'busy' / 'file').write_text('x')
  with pytest.raises(FileExistsError):
    export.export_bundle(bundle_config(), params, 'shapes', tmp_path / 'busy')
  with pytest.raises(ValueError, match='dtype'):
    export.export_bundle(bundle_config(), params, 'shapes', tmp_path / 'new', dtype='float16')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['busy']
