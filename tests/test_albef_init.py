"""configs/albef.py trains from imported towers: small random Hugging Face checkpoints written by the test."""

import jax
import numpy as np
import pytest
import torch  # test-only reference
import transformers  # test-only reference

from helpers import ROOT
from xmodal import config as config_lib, sharding
from xmodal.train import loop
from xmodal.train.run import restore_state

VOCAB = (ROOT / 'xmodal' / 'tokenizer' / 'assets' / 'shapes_vocab.txt').read_text().split('\n')[:-1]


@pytest.mark.slow  # imports two towers and trains a step
def test_albef_config_trains_from_imported_bert_and_vit(shapes_dir, tmp_path):
  torch.manual_seed(0)
  bert = transformers.BertModel(transformers.BertConfig(
      vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
      max_position_embeddings=16))
  bert.save_pretrained(tmp_path / 'bert')
  (tmp_path / 'bert' / 'vocab.txt').write_text('\n'.join(VOCAB) + '\n')
  vit = transformers.ViTModel(transformers.ViTConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8))
  vit.save_pretrained(tmp_path / 'vit')

  spec = f'{ROOT}/configs/albef.py:text_init={tmp_path / "bert"},image_init={tmp_path / "vit"},res=32'
  sizes = dict(width=32, depth=2, heads=2, mlp_dim=64)
  overrides = [f'model.vision.{k}={v}' for k, v in sizes.items()] + [f'model.text.{k}={v}' for k, v in sizes.items()]
  overrides += ['model.vision.patch_size=8', 'model.vision.layer_norm_eps=1e-12', f'model.text.vocab_size={len(VOCAB)}',
                'model.text.max_positions=16', 'model.fusion_depth=2', 'model.max_text_len=12', 'model.dtype=float32',
                'model.remat=none', f'data.tfds_name={shapes_dir}', 'data.captions_key=captions',
                'data.id_key=image_id', 'data.eval_split=test', 'data.max_text_len=12', 'data.batch_size=8',
                'data.eval_batch_size=8', 'train.steps=1', 'train.progress=false', 'eval.k=4',
                'loss.queue_size=64']  # ALBEF's 65,536 would be 128 MB of checkpoint here
  config = config_lib.load(spec, overrides)
  results = loop.train(config, tmp_path / 'run')
  assert 'itc' in results

  # One AdamW step at lr 1e-5 moves each weight by about 1e-5: the checkpoint still holds the imported weights to
  # 2e-5, where a random initialisation would differ by ~0.02.
  _, state, _ = restore_state(config, tmp_path / 'run', None, sharding.make_mesh((1, 1, 1), jax.devices()[:1]))
  params = jax.tree.map(np.asarray, state.params)
  np.testing.assert_allclose(params['text']['embeddings']['word']['embedding'],
                             bert.embeddings.word_embeddings.weight.detach().numpy(), rtol=0, atol=2e-5)
  np.testing.assert_allclose(params['vision']['pos_embedding'][0],
                             vit.embeddings.position_embeddings.detach().numpy()[0], rtol=0, atol=2e-5)
  # The momentum model starts as a copy of the imported towers (ALBEF), and one step at 0.995 leaves it there.
  np.testing.assert_allclose(np.asarray(state.momentum_params['text']['embeddings']['word']['embedding']),
                             bert.embeddings.word_embeddings.weight.detach().numpy(), rtol=0, atol=2e-5)
  fusion_fc1 = params['fusion']['layers']['mlp']['fc1']['kernel'][1]  # fusion layer 1 = BERT layer 3
  np.testing.assert_allclose(fusion_fc1, bert.encoder.layer[3].intermediate.dense.weight.detach().numpy().T, rtol=0, atol=2e-5)
