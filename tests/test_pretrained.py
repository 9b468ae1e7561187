"""Pretrained checkpoints in and out, checked against the reference implementations in `transformers`.

TEST-ONLY dependencies: torch and transformers build random-initialised BERT / ViT / DeiT models from small configs
(no download) as the independent reference. xmodal itself never imports them (see the last test).
"""

import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch  # test-only reference
import transformers  # test-only reference

from xmodal.config.model import model_config
from xmodal.models import build, dummy_inputs
from xmodal.models.model import XModal
from xmodal.models.vit import resize_pos_embedding
from xmodal.pretrained import CheckpointError, config_overrides, image_to_hf, load_pretrained, text_to_hf

TOL = 1e-4
WIDTH, HEADS, MLP, VOCAB, POSITIONS = 64, 4, 128, 100, 32
PATCH, IMAGE = 8, 32


# ---------------------------------------------------------------- references (torch, test-only)

def _hf_bert(tmp_path, layers, **overrides):
  torch.manual_seed(0)
  config = transformers.BertConfig(**{**dict(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=layers,
                                              num_attention_heads=HEADS, intermediate_size=MLP,
                                              max_position_embeddings=POSITIONS, attn_implementation='eager'),
                                      **overrides})
  model = transformers.BertModel(config).eval()
  path = tmp_path / 'bert'
  model.save_pretrained(path)
  (path / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', 'a']) + '\n')
  return model, path


def _hf_vit(tmp_path, name='vit', cls=transformers.ViTModel, config_cls=transformers.ViTConfig, image_size=IMAGE,
            **overrides):
  torch.manual_seed(1)
  config = config_cls(hidden_size=WIDTH, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=MLP,
                      image_size=image_size, patch_size=PATCH, attn_implementation='eager', **overrides)
  model = cls(config).eval()
  path = tmp_path / name
  model.save_pretrained(path)
  return model, path


def _torch_tokens(model, **inputs):
  """The reference model's output (last_hidden_state, hidden_states) on numpy inputs."""
  with torch.no_grad():
    out = model(**{k: torch.from_numpy(v) for k, v in inputs.items()}, output_hidden_states=True)
  return out


# ---------------------------------------------------------------- xmodal side

def _config(text_depth=2, fusion_depth=2, scan=True, image_size=IMAGE, vision_eps=1e-12):
  """The tiny preset resized to the reference models' sizes."""
  config = model_config('tiny')
  config.text.update(width=WIDTH, depth=text_depth, heads=HEADS, mlp_dim=MLP, vocab_size=VOCAB,
                     max_positions=POSITIONS, layer_norm_eps=1e-12)
  config.vision.update(width=WIDTH, depth=2, heads=HEADS, mlp_dim=MLP, patch_size=PATCH, layer_norm_eps=vision_eps)
  config.update(image_size=image_size, fusion_depth=fusion_depth, embed_dim=32, max_text_len=16, attention='xla',
                scan_layers=scan)
  return config


@functools.cache
def _setup(**kwargs):
  """(model config, boxed variables, jitted encode_text, jitted encode_image), cached per config.

  The variables have model.init's structure and boxes (from eval_shape) but random values: compiling model.init would
  dominate these tests' time, and every value the tests compare is overwritten by the load anyway.
  """
  config = _config(**kwargs)
  model = build(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.spec))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.02, s.shape), s.dtype), abstract)
  encode_text = jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=XModal.encode_text)[0])
  encode_image = jax.jit(lambda v, images: model.apply(v, images, method=XModal.encode_image)[0])
  return config, variables, encode_text, encode_image


def _text_inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(1, VOCAB, size=(2, 12)).astype(np.int64)
  mask = np.ones((2, 12), np.int64)
  mask[1, 7:] = 0  # the second caption is padded after 7 tokens
  ids[1, 7:] = 0
  return ids, mask


def _images(size):
  return np.random.default_rng(1).normal(size=(2, size, size, 3)).astype(np.float32)


def _max_diff_real_tokens(ours, theirs, mask):
  real = mask.astype(bool)
  return float(np.max(np.abs(np.asarray(ours)[real] - np.asarray(theirs)[real])))


def _params(variables):
  return nn.meta.unbox(variables)['params']


# ---------------------------------------------------------------- text

@pytest.mark.parametrize('scan', [True, False])
def test_bert_lower_layers_match_hf_hidden_states_and_upper_layers_fill_fusion(tmp_path, scan):
  bert, path = _hf_bert(tmp_path, layers=4)
  config, variables, encode_text, _ = _setup(scan=scan)
  loaded, report = load_pretrained(variables, config, text_dir=path)

  ids, mask = _text_inputs()
  tokens = encode_text(loaded, jnp.asarray(ids), jnp.asarray(mask))
  reference = _torch_tokens(bert, input_ids=ids, attention_mask=mask).hidden_states[2]
  diff = _max_diff_real_tokens(tokens, reference.numpy(), mask)
  print(f'bert split (scan={scan}) max abs diff {diff:.2e}')
  assert diff <= TOL

  # BERT layers 2 and 3 are the fusion layers' self-attention, MLP and LayerNorms, exactly.
  state, fusion = safetensors.numpy.load_file(str(path / 'model.safetensors')), _params(loaded)['fusion']
  for i in range(2):
    layer = jax.tree.map(lambda x: np.asarray(x)[i], fusion['layers']) if scan else fusion[f'layers_{i}']
    key = f'encoder.layer.{2 + i}'
    qkv = np.asarray(layer['attn']['qkv']['kernel'])
    for j, name in enumerate(('query', 'key', 'value')):
      np.testing.assert_array_equal(qkv[:, j].reshape(WIDTH, WIDTH), state[f'{key}.attention.self.{name}.weight'].T)
    np.testing.assert_array_equal(np.asarray(layer['attn']['out']['kernel']).reshape(WIDTH, WIDTH),
                                  state[f'{key}.attention.output.dense.weight'].T)
    np.testing.assert_array_equal(layer['mlp']['fc1']['kernel'], state[f'{key}.intermediate.dense.weight'].T)
    np.testing.assert_array_equal(layer['mlp']['fc2']['bias'], state[f'{key}.output.dense.bias'])
    np.testing.assert_array_equal(layer['ln1']['norm']['scale'], state[f'{key}.attention.output.LayerNorm.weight'])
    np.testing.assert_array_equal(layer['ln2']['norm']['bias'], state[f'{key}.output.LayerNorm.bias'])

  groups = report.unfilled_groups()
  assert {'fusion/layers/cross_attn/kv', 'fusion/layers/ln_cross', 'itm_head', 'temperature',
          'vision/patch_embed'} <= set(groups)
  assert not any(g.startswith('text/') for g in groups)
  assert report.unused['text'] == ['pooler.dense.bias', 'pooler.dense.weight']
  assert report.tokenizer == str(path / 'vocab.txt')
  # The input's boxes and structure come back.
  assert jax.tree.structure(loaded, is_leaf=lambda x: isinstance(x, nn.Partitioned)) == jax.tree.structure(
      variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def test_bert_of_text_depth_fills_the_text_tower_only_and_matches_last_hidden_state(tmp_path):
  bert, path = _hf_bert(tmp_path, layers=2)
  config, variables, encode_text, _ = _setup()
  params = nn.meta.unbox(variables)  # unboxed trees load the same way
  loaded, report = load_pretrained(params, config, text_dir=path)

  ids, mask = _text_inputs()
  tokens = encode_text(loaded, jnp.asarray(ids), jnp.asarray(mask))
  reference = _torch_tokens(bert, input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
  diff = _max_diff_real_tokens(tokens, reference, mask)
  print(f'bert text-only max abs diff {diff:.2e}')
  assert diff <= TOL
  assert 'fusion/layers/attn/qkv' in report.unfilled_groups()
  np.testing.assert_array_equal(loaded['params']['fusion']['layers']['attn']['qkv']['kernel'],
                                params['params']['fusion']['layers']['attn']['qkv']['kernel'])


def test_bert_pickle_with_prefix_and_gamma_beta_names_loads_like_safetensors(tmp_path):
  bert, path = _hf_bert(tmp_path, layers=4)
  pickled = tmp_path / 'bert_bin'
  pickled.mkdir()
  (pickled / 'config.json').write_text((path / 'config.json').read_text())
  # The original bert-base-uncased pickle: a 'bert.' prefix, LayerNorm gamma/beta, the MLM head beside.
  state = {'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'): v
           for k, v in bert.state_dict().items()}
  state['cls.predictions.bias'] = torch.zeros(VOCAB)
  torch.save(state, pickled / 'pytorch_model.bin')
  config, variables, _, _ = _setup()
  from_safetensors, _ = load_pretrained(variables, config, text_dir=path)
  from_pickle, report = load_pretrained(variables, config, text_dir=pickled)
  jax.tree.map(np.testing.assert_array_equal, _params(from_pickle)['text'], _params(from_safetensors)['text'])
  jax.tree.map(np.testing.assert_array_equal, _params(from_pickle)['fusion'], _params(from_safetensors)['fusion'])
  assert 'cls.predictions.bias' in report.unused['text']


def test_bert_for_masked_lm_fills_the_mlm_head_and_predicts_like_transformers(tmp_path):
  torch.manual_seed(2)
  reference = transformers.BertForMaskedLM(transformers.BertConfig(
      vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=4, num_attention_heads=HEADS, intermediate_size=MLP,
      max_position_embeddings=POSITIONS, attn_implementation='eager')).eval()
  with torch.no_grad():  # a head that is not at its initial values (bias 0, LayerNorm 1 / 0)
    for p in reference.cls.predictions.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path / 'bert_mlm'
  reference.save_pretrained(path)
  config = _config()
  config.mlm_head = True
  model = build(config)
  abstract = jax.eval_shape(model.init, jax.random.key(0), *dummy_inputs(model.spec))
  variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), abstract)
  loaded, report = load_pretrained(variables, config, text_dir=path)
  assert not [g for g in report.unfilled_groups() if g.startswith('mlm')], report.unfilled_groups()
  assert any('cls.predictions -> the MLM head' in n for n in report.notes)

  # The head on the same hidden states: BERT's last layer output through its prediction head.
  ids, mask = _text_inputs()
  with torch.no_grad():
    out = reference(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
  hidden = out.hidden_states[-1].numpy()
  logits = model.apply(loaded, jnp.asarray(hidden), method=XModal.mlm_logits)
  diff = float(np.max(np.abs(np.asarray(logits) - out.logits.numpy())))
  print(f'mlm head max abs diff {diff:.2e}')
  assert diff <= TOL
  # Without the head in the checkpoint (a BertModel), it stays as it was, and the report says so.
  _, bare = _hf_bert(tmp_path, layers=4)
  kept, report = load_pretrained(loaded, config, text_dir=bare)
  np.testing.assert_array_equal(_params(kept)['mlm_bias'], _params(loaded)['mlm_bias'])
  assert any('no MLM head' in n for n in report.notes)


def test_a_bfloat16_checkpoint_reads_with_the_values_torch_wrote(tmp_path):
  # Hub checkpoints are often bfloat16; the safetensors file here is written by torch, the independent writer.
  from xmodal.pretrained.common import read_checkpoint
  bert, path = _hf_bert(tmp_path, layers=1)
  bert.to(torch.bfloat16).save_pretrained(path)
  tensors = read_checkpoint(path).tensors
  for name, tensor in bert.state_dict().items():
    assert tensors[name].dtype == jnp.bfloat16, name
    np.testing.assert_array_equal(tensors[name].astype(np.float32), tensor.float().numpy())


# ---------------------------------------------------------------- image

def test_hf_vit_matches_last_hidden_state_with_checkpoint_eps(tmp_path):
  vit, path = _hf_vit(tmp_path)
  assert json.loads((path / 'config.json').read_text())['layer_norm_eps'] == 1e-12  # not xmodal's default 1e-6
  config, variables, _, encode_image = _setup(scan=False)
  assert config_overrides(image_dir=path)['vision.layer_norm_eps'] == 1e-12
  loaded, report = load_pretrained(variables, config, image_dir=path)

  images = _images(IMAGE)
  tokens = encode_image(loaded, jnp.asarray(images))
  reference = _torch_tokens(vit, pixel_values=images.transpose(0, 3, 1, 2)).last_hidden_state.numpy()
  diff = float(np.max(np.abs(np.asarray(tokens) - reference)))
  print(f'vit max abs diff {diff:.2e}')
  assert diff <= TOL
  assert report.unused['image'] == ['pooler.dense.bias', 'pooler.dense.weight']
  assert not any(g.startswith('vision') for g in report.unfilled_groups())


def test_vit_at_another_resolution_matches_hf_vit_with_the_same_bicubic_resize(tmp_path):
  vit, path = _hf_vit(tmp_path)
  new_size = 48  # 4x4 patches in the checkpoint, 6x6 in the model
  config, variables, _, encode_image = _setup(image_size=new_size)
  loaded, report = load_pretrained(variables, config, image_dir=path)
  assert any('4x4 to 6x6' in n for n in report.notes)

  # Reference: an HF ViT of the new size with the checkpoint's position embeddings resized the same way.
  state = vit.state_dict()
  posemb = state['embeddings.position_embeddings'].numpy()
  state['embeddings.position_embeddings'] = torch.tensor(np.asarray(resize_pos_embedding(jnp.asarray(posemb), (6, 6))))
  reference_model = transformers.ViTModel(transformers.ViTConfig(**{**vit.config.to_dict(), 'image_size': new_size}))
  reference_model.load_state_dict(state)
  images = _images(new_size)
  tokens = encode_image(loaded, jnp.asarray(images))
  reference = _torch_tokens(reference_model.eval(), pixel_values=images.transpose(0, 3, 1, 2)).last_hidden_state
  diff = float(np.max(np.abs(np.asarray(tokens) - reference.numpy())))
  print(f'vit resized max abs diff {diff:.2e}')
  assert diff <= TOL


def test_timm_state_dict_matches_hf_vit(tmp_path):
  vit, path = _hf_vit(tmp_path, layer_norm_eps=1e-6)  # timm's eps
  s = safetensors.numpy.load_file(str(path / 'model.safetensors'))  # HF hub names (the file's, not the module's)
  timm = {'cls_token': s['embeddings.cls_token'], 'pos_embed': s['embeddings.position_embeddings'],
          'patch_embed.proj.weight': s['embeddings.patch_embeddings.projection.weight'],
          'patch_embed.proj.bias': s['embeddings.patch_embeddings.projection.bias'],
          'norm.weight': s['layernorm.weight'], 'norm.bias': s['layernorm.bias'],
          'head.weight': np.zeros((10, WIDTH), np.float32), 'head.bias': np.zeros(10, np.float32)}
  for n in range(2):
    hf, b = f'encoder.layer.{n}.', f'blocks.{n}.'
    for part in ('weight', 'bias'):
      timm[b + f'attn.qkv.{part}'] = np.concatenate([s[hf + f'attention.attention.{x}.{part}']
                                                     for x in ('query', 'key', 'value')])
      timm[b + f'attn.proj.{part}'] = s[hf + f'attention.output.dense.{part}']
      timm[b + f'norm1.{part}'] = s[hf + f'layernorm_before.{part}']
      timm[b + f'norm2.{part}'] = s[hf + f'layernorm_after.{part}']
      timm[b + f'mlp.fc1.{part}'] = s[hf + f'intermediate.dense.{part}']
      timm[b + f'mlp.fc2.{part}'] = s[hf + f'output.dense.{part}']
  file = tmp_path / 'timm' / 'model.safetensors'
  file.parent.mkdir()
  safetensors.numpy.save_file(timm, str(file))
  config, variables, _, encode_image = _setup(vision_eps=1e-6)
  loaded, report = load_pretrained(variables, config, image_dir=file)

  images = _images(IMAGE)
  tokens = encode_image(loaded, jnp.asarray(images))
  reference = _torch_tokens(vit, pixel_values=images.transpose(0, 3, 1, 2)).last_hidden_state.numpy()
  diff = float(np.max(np.abs(np.asarray(tokens) - reference)))
  print(f'timm max abs diff {diff:.2e}')
  assert diff <= TOL
  assert report.unused['image'] == ['head.bias', 'head.weight']
  assert any('unverified' in n for n in report.notes)  # timm files carry no head count


def test_deit_distillation_token_is_an_error_unless_expected_then_dropped(tmp_path):
  deit, path = _hf_vit(tmp_path, 'deit', transformers.DeiTModel, transformers.DeiTConfig)
  config, variables, _, encode_image = _setup()
  with pytest.raises(CheckpointError, match='distillation_token'):
    load_pretrained(variables, config, image_dir=path)
  loaded, report = load_pretrained(variables, config, image_dir=path, expected_unused=(r'distillation_token$',))
  assert 'embeddings.distillation_token' in report.unused['image']

  # Reference: the same weights in an HF ViT, without the distillation token and its position embedding.
  state = deit.state_dict()
  del state['embeddings.distillation_token']
  posemb = state['embeddings.position_embeddings']
  state['embeddings.position_embeddings'] = torch.cat([posemb[:, :1], posemb[:, 2:]], dim=1)
  vit = transformers.ViTModel(transformers.ViTConfig(**{k: v for k, v in deit.config.to_dict().items()
                                                        if k != 'model_type'}))
  vit.load_state_dict(state)
  images = _images(IMAGE)
  tokens = encode_image(loaded, jnp.asarray(images))
  reference = _torch_tokens(vit.eval(), pixel_values=images.transpose(0, 3, 1, 2)).last_hidden_state.numpy()
  assert float(np.max(np.abs(np.asarray(tokens) - reference))) <= TOL


# ---------------------------------------------------------------- to_hf

@pytest.mark.parametrize('scan', [True, False])
def test_to_hf_gives_back_the_loaded_tensors_and_runs_in_transformers(tmp_path, scan):
  bert, bert_path = _hf_bert(tmp_path, layers=4)
  vit, vit_path = _hf_vit(tmp_path)
  config, variables, _, _ = _setup(scan=scan)
  loaded, report = load_pretrained(variables, config, text_dir=bert_path, image_dir=vit_path)

  for exported, source in ((text_to_hf(loaded, config, tmp_path / 'out_bert', tokenizer=report.tokenizer),
                            bert_path),
                           (image_to_hf(loaded, config, tmp_path / 'out_vit'), vit_path)):
    original = safetensors.numpy.load_file(str(source / 'model.safetensors'))
    back = safetensors.numpy.load_file(str(exported / 'model.safetensors'))
    assert set(back) == {k for k in original if not k.startswith('pooler.')}
    for key, value in back.items():
      np.testing.assert_array_equal(value, original[key], err_msg=key)
  assert (tmp_path / 'out_bert' / 'vocab.txt').is_file()

  # transformers reads the export back and computes what the original computed.
  again = transformers.BertModel.from_pretrained(tmp_path / 'out_bert', attn_implementation='eager').eval()
  ids, mask = _text_inputs()
  diff = _max_diff_real_tokens(_torch_tokens(again, input_ids=ids, attention_mask=mask).last_hidden_state.numpy(),
                               _torch_tokens(bert, input_ids=ids, attention_mask=mask).last_hidden_state.numpy(),
                               mask)
  assert diff == 0.0


# ---------------------------------------------------------------- errors

def test_size_mismatch_names_both_values_and_the_config_key(tmp_path):
  _, path = _hf_bert(tmp_path, layers=4, intermediate_size=96)
  config, variables, _, _ = _setup()
  with pytest.raises(CheckpointError, match=r'intermediate_size=96 but model\.text\.mlp_dim=128'):
    load_pretrained(variables, config, text_dir=path)
  _, path = _hf_bert(tmp_path / 'deep', layers=3)
  with pytest.raises(CheckpointError, match=r'num_hidden_layers=3.*model\.text\.depth=2.*model\.fusion_depth=2'):
    load_pretrained(variables, config, text_dir=path)
  _, vit_path = _hf_vit(tmp_path)
  with pytest.raises(CheckpointError, match=r'layer_norm_eps=1e-12 but model\.vision\.layer_norm_eps=1e-06'):
    load_pretrained(variables, _config(vision_eps=1e-6), image_dir=vit_path)


def test_unexpected_unused_tensor_is_an_error_unless_expected(tmp_path):
  _, path = _hf_bert(tmp_path, layers=4)
  tensors = safetensors.numpy.load_file(str(path / 'model.safetensors'))
  tensors['encoder.layer.0.adapter.weight'] = np.zeros((4, 4), np.float32)
  safetensors.numpy.save_file(tensors, str(path / 'model.safetensors'), metadata={'format': 'pt'})
  config, variables, _, _ = _setup()
  with pytest.raises(CheckpointError, match=r'encoder\.layer\.0\.adapter\.weight'):
    load_pretrained(variables, config, text_dir=path)
  _, report = load_pretrained(variables, config, text_dir=path, expected_unused=(r'\.adapter\.',))
  assert 'encoder.layer.0.adapter.weight' in report.unused['text']


def test_importing_xmodal_pretrained_imports_neither_torch_nor_transformers():
  code = ('import sys, xmodal, xmodal.models, xmodal.pretrained; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers")))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]'


def test_sharded_parameters_stay_sharded(tmp_path):
  _, path = _hf_bert(tmp_path, layers=4)
  config, variables, _, _ = _setup()
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('x',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'x'))
  embeddings = variables['params']['text']['embeddings']['word']
  sharded = {**variables, 'params': {**variables['params'], 'text': {
      **variables['params']['text'], 'embeddings': {**variables['params']['text']['embeddings'], 'word': {
          'embedding': embeddings['embedding'].replace_boxed(
              jax.device_put(embeddings['embedding'].unbox(), sharding))}}}}}
  loaded, report = load_pretrained(sharded, config, text_dir=path)
  leaf = loaded['params']['text']['embeddings']['word']['embedding'].unbox()
  assert leaf.sharding == sharding
  np.testing.assert_array_equal(leaf, safetensors.numpy.load_file(str(path / 'model.safetensors'))[
      'embeddings.word_embeddings.weight'])
  print(report.summary())
