"""Hugging Face BERT <-> XModal's text tower, and BERT's upper layers <-> the fusion layers' self-attention and MLP.

As in ALBEF, a BERT of T + F layers fills the T text layers and, from its layers T .. T+F-1, the self-attention,
MLP and both LayerNorms of the F fusion layers; the fusion layers' cross-attention (and its LayerNorm) has no BERT
counterpart and stays as initialised. A BERT of exactly T layers fills the text tower only.
"""

from __future__ import annotations

import pathlib

from xmodal.models.model import ModelSpec
from xmodal.pretrained import rules as R
from xmodal.pretrained.common import Checkpoint, CheckpointError, Field, check_fields, require

# The tensor whose name gives the checkpoint's prefix ('' in BertModel, 'bert.' in BertForMaskedLM / ALBEF's
# 'text_encoder.bert.').
ANCHOR = 'embeddings.word_embeddings.weight'
# Tensors a BERT checkpoint typically holds that the towers have no place for: the [CLS] pooler (ALBEF projects
# [CLS] with its own text_proj), the MLM / NSP heads ('cls.'), and the position-id buffer old checkpoints saved.
DEFAULT_EXPECTED_UNUSED = (r'(^|\.)pooler\.', r'^cls\.', r'(^|\.)position_ids$')
# BertForMaskedLM's prediction head ('cls.predictions.*', beside 'bert.*'): with model.mlm_head it fills xmodal's MLM
# head; the decoder weight is the word embeddings (tied in BERT and in xmodal), so it stays unused.
MLM_ANCHOR = 'cls.predictions.transform.dense.weight'


def fields(config: dict) -> list[Field]:
  """The model config values a BERT config.json fixes (the depth split is checked by `num_layers_to_load`)."""
  keys = (('hidden_size', 'text.width'), ('num_attention_heads', 'text.heads'), ('intermediate_size', 'text.mlp_dim'),
          ('vocab_size', 'text.vocab_size'), ('max_position_embeddings', 'text.max_positions'),
          ('type_vocab_size', 'text.type_vocab_size'), ('layer_norm_eps', 'text.layer_norm_eps'))
  # BERT's config defaults, for the keys a config.json may leave out.
  defaults = {'type_vocab_size': 2, 'layer_norm_eps': 1e-12, 'max_position_embeddings': 512}
  missing = [k for k, _ in keys if k not in config and k not in defaults]
  if missing:
    raise CheckpointError(f'BERT config.json lacks {missing}')
  return [Field(k, m, config.get(k, defaults.get(k))) for k, m in keys]


def check(ckpt: Checkpoint, spec: ModelSpec) -> int:
  """Validates a BERT checkpoint's config against the model; returns how many BERT layers to load (T or T + F)."""
  what = 'BERT'
  if not ckpt.config:
    raise CheckpointError(f'BERT checkpoint {str(ckpt.path)!r} has no config.json: its head count cannot be read')
  require(ckpt.config, 'model_type', ('bert',), ckpt.path, what, default='bert')
  # 'gelu' is the exact (erf) GELU that xmodal's MLP computes; BERT's 'gelu_new' is the tanh approximation.
  require(ckpt.config, 'hidden_act', ('gelu',), ckpt.path, what, default='gelu')
  require(ckpt.config, 'position_embedding_type', ('absolute',), ckpt.path, what, default='absolute')
  check_fields(fields(ckpt.config), spec, ckpt.path, what)
  layers, text, fusion = ckpt.config['num_hidden_layers'], spec.text.depth, spec.fusion_depth
  if layers not in (text, text + fusion):
    raise CheckpointError(
        f'BERT checkpoint {str(ckpt.path)!r} has num_hidden_layers={layers}, but model.text.depth={text} and '
        f'model.fusion_depth={fusion}: need num_hidden_layers == model.text.depth (text tower only) or == '
        f'model.text.depth + model.fusion_depth (upper layers into the fusion layers, as ALBEF)')
  return layers


def rules(spec: ModelSpec, num_layers: int) -> list[R.Rule]:
  """Rules for BertModel's tensors (unprefixed names) of a `num_layers`-layer BERT."""
  out = [R.copy('text/embeddings/word/embedding', 'embeddings.word_embeddings.weight'),
         R.copy('text/embeddings/position/embedding', 'embeddings.position_embeddings.weight'),
         R.copy('text/embeddings/type/embedding', 'embeddings.token_type_embeddings.weight'),
         *R.layer_norm('text/embeddings/ln', 'embeddings.LayerNorm')]
  for n in range(num_layers):
    tower, layer = ('text', n) if n < spec.text.depth else ('fusion', n - spec.text.depth)
    out += _layer_rules(f'{tower}/layers', layer, f'encoder.layer.{n}', spec.text.heads)
  return out


def _layer_rules(param: str, layer: int, key: str, heads: int) -> list[R.Rule]:
  qkv = tuple(f'{key}.attention.self.{name}' for name in ('query', 'key', 'value'))
  return [R.qkv_kernel(f'{param}/attn/qkv/kernel', tuple(f'{k}.weight' for k in qkv), heads, layer),
          R.qkv_bias(f'{param}/attn/qkv/bias', tuple(f'{k}.bias' for k in qkv), heads, layer),
          R.out_kernel(f'{param}/attn/out/kernel', f'{key}.attention.output.dense.weight', heads, layer),
          R.copy(f'{param}/attn/out/bias', f'{key}.attention.output.dense.bias', layer),
          *R.layer_norm(f'{param}/ln1', f'{key}.attention.output.LayerNorm', layer),
          *R.dense(f'{param}/mlp/fc1', f'{key}.intermediate.dense', layer),
          *R.dense(f'{param}/mlp/fc2', f'{key}.output.dense', layer),
          *R.layer_norm(f'{param}/ln2', f'{key}.output.LayerNorm', layer)]


def mlm_rules() -> list[R.Rule]:
  """Rules for the MLM head's tensors, named from 'cls.' on: dense + GELU + LayerNorm, then the output bias."""
  return [*R.dense('mlm_transform', 'cls.predictions.transform.dense'),
          *R.layer_norm('mlm_norm', 'cls.predictions.transform.LayerNorm'),
          R.copy('mlm_bias', 'cls.predictions.bias')]


def canonical_name(name: str) -> str:
  """Old BERT checkpoints (the original bert-base-uncased pickle) call LayerNorm's weight and bias gamma and beta."""
  return name.replace('LayerNorm.gamma', 'LayerNorm.weight').replace('LayerNorm.beta', 'LayerNorm.bias')


def hf_config(spec: ModelSpec, num_layers: int) -> dict:
  """A BertModel config.json for the exported tower."""
  return {'architectures': ['BertModel'], 'model_type': 'bert', 'hidden_size': spec.text.width,
          'num_hidden_layers': num_layers, 'num_attention_heads': spec.text.heads,
          'intermediate_size': spec.text.mlp_dim, 'hidden_act': 'gelu', 'vocab_size': spec.text.vocab_size,
          'max_position_embeddings': spec.text.max_positions, 'type_vocab_size': spec.text.type_vocab_size,
          'layer_norm_eps': spec.text.layer_norm_eps, 'position_embedding_type': 'absolute',
          'hidden_dropout_prob': 0.1, 'attention_probs_dropout_prob': 0.1, 'initializer_range': 0.02,
          'pad_token_id': 0}


def describe(path: pathlib.Path, num_layers: int, spec: ModelSpec) -> str:
  """One line for the load report."""
  into = (f'layers 0..{spec.text.depth - 1} -> text, {spec.text.depth}..{num_layers - 1} -> fusion self-attn/MLP'
          if num_layers > spec.text.depth else f'layers 0..{num_layers - 1} -> text; fusion left as initialised')
  return f'BERT {str(path)!r}: {into}'
