"""Hugging Face ViT / DeiT and timm ViT state dicts <-> XModal's image tower.

Position embeddings trained at another resolution are resized to the model's patch grid with
`xmodal.models.vit.resize_pos_embedding` (bicubic over the grid, [CLS] kept), the same function the model applies to
images of another size, so that loading at resolution r and running at r agree with running the model at r.

DeiT's distilled checkpoints carry a second, distillation token (and its position embedding) that xmodal's ViT (one
[CLS], as ALBEF's timm DeiT without distillation) has no place for. It is reported as unused, which is an error
unless `expected_unused` names it: then the token is dropped with its position embedding. Dropping it changes what
the network computes (the other tokens attended to it), so it is opt-in.
"""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np

from xmodal.models.model import ModelSpec
from xmodal.models.vit import resize_pos_embedding
from xmodal.pretrained import rules as R
from xmodal.pretrained.common import Checkpoint, CheckpointError, Field, check_fields, find_prefix, require

HF_ANCHOR = 'embeddings.cls_token'
TIMM_ANCHOR = 'cls_token'
# Tensors an image checkpoint typically holds that the tower has no place for: HF's [CLS] pooler, classification
# heads (HF 'classifier.', DeiT 'cls_classifier.' / 'distillation_classifier.', timm 'head.'), and the masked-image
# -modelling mask token.
DEFAULT_EXPECTED_UNUSED = (r'(^|\.)pooler\.', r'classifier\.', r'(^|\.)head\.', r'(^|\.)mask_token$')
# timm's VisionTransformer builds its LayerNorms with eps=1e-6 whatever the size.
TIMM_LAYER_NORM_EPS = 1e-6


def is_hf(names) -> bool:
  """Whether a state dict is in Hugging Face ViT/DeiT naming (else timm's)."""
  return any(n == HF_ANCHOR or n.endswith('.' + HF_ANCHOR) for n in names)


def prefix(names) -> str:
  return find_prefix(names, HF_ANCHOR if is_hf(names) else TIMM_ANCHOR)


def fields(ckpt: Checkpoint, tensors: dict[str, np.ndarray]) -> tuple[list[Field], list[str]]:
  """(model config values the checkpoint fixes, notes on what could not be checked), `tensors` unprefixed."""
  if is_hf(tensors):
    c = ckpt.config
    missing = [k for k in ('hidden_size', 'num_hidden_layers', 'num_attention_heads', 'intermediate_size',
                           'patch_size') if k not in c]
    if missing:
      raise CheckpointError(f'ViT checkpoint {str(ckpt.path)!r}: config.json lacks {missing}')
    keys = (('hidden_size', 'vision.width'), ('num_hidden_layers', 'vision.depth'),
            ('num_attention_heads', 'vision.heads'), ('intermediate_size', 'vision.mlp_dim'),
            ('patch_size', 'vision.patch_size'), ('layer_norm_eps', 'vision.layer_norm_eps'))
    # 1e-12 is HF ViTConfig's default eps (timm and big_vision use 1e-6): it must come through to the model.
    return [Field(k, m, c.get(k, 1e-12)) for k, m in keys], []
  # timm saves no sizes beside the weights: read them from the tensors' shapes.
  needed = [k for k in ('cls_token', 'patch_embed.proj.weight', 'blocks.0.mlp.fc1.weight') if k not in tensors]
  if needed:
    raise CheckpointError(f'{str(ckpt.path)!r} is neither an HF ViT/DeiT nor a timm ViT state dict: no {needed}')
  depth = len({n.split('.')[1] for n in tensors if n.startswith('blocks.')})
  found = [Field('cls_token.shape[-1]', 'vision.width', tensors['cls_token'].shape[-1]),
           Field('number of blocks.N', 'vision.depth', depth),
           Field('blocks.0.mlp.fc1.weight.shape[0]', 'vision.mlp_dim', tensors['blocks.0.mlp.fc1.weight'].shape[0]),
           Field('patch_embed.proj.weight.shape[-1]', 'vision.patch_size',
                 tensors['patch_embed.proj.weight'].shape[-1]),
           Field('timm LayerNorm eps', 'vision.layer_norm_eps', TIMM_LAYER_NORM_EPS)]
  heads = ckpt.config.get('model_args', {}).get('num_heads')
  if heads is not None:
    return found + [Field('model_args.num_heads', 'vision.heads', heads)], []
  return found, ['timm checkpoint gives no head count: model.vision.heads taken as is, unverified']


def check(ckpt: Checkpoint, tensors: dict[str, np.ndarray], spec: ModelSpec) -> list[str]:
  """Validates an image checkpoint (tensor names unprefixed) against the model; returns notes for the report."""
  what = 'ViT'
  if is_hf(tensors):
    require(ckpt.config, 'model_type', ('vit', 'deit'), ckpt.path, what, default='vit')
    require(ckpt.config, 'hidden_act', ('gelu',), ckpt.path, what, default='gelu')
    require(ckpt.config, 'qkv_bias', (True,), ckpt.path, what, default=True)
    require(ckpt.config, 'num_channels', (3,), ckpt.path, what, default=3)
  found, notes = fields(ckpt, tensors)
  check_fields(found, spec, ckpt.path, what)
  return notes


def rules(spec: ModelSpec, tensors: dict[str, np.ndarray] | None = None) -> tuple[list[R.Rule], list[str]]:
  """(rules, notes) for a checkpoint's unprefixed tensors; `tensors=None` gives HF ViTModel's rules (export)."""
  hf = tensors is None or is_hf(tensors)
  extra = int(tensors is not None and any(n in tensors for n in ('embeddings.distillation_token', 'dist_token')))
  posemb, notes = _pos_embedding_rule(spec, 'embeddings.position_embeddings' if hf else 'pos_embed', extra, tensors)
  heads = spec.vision.heads
  if hf:
    out = [R.conv_kernel('vision/patch_embed/kernel', 'embeddings.patch_embeddings.projection.weight'),
           R.copy('vision/patch_embed/bias', 'embeddings.patch_embeddings.projection.bias'),
           R.copy('vision/cls', 'embeddings.cls_token'), posemb,
           *R.layer_norm('vision/ln_final', 'layernorm')]
  else:
    out = [R.conv_kernel('vision/patch_embed/kernel', 'patch_embed.proj.weight'),
           R.copy('vision/patch_embed/bias', 'patch_embed.proj.bias'),
           R.copy('vision/cls', 'cls_token'), posemb,
           *R.layer_norm('vision/ln_final', 'norm')]
  for n in range(spec.vision.depth):
    out += _hf_layer_rules(n, heads) if hf else _timm_layer_rules(n, heads)
  return out, notes


def _pos_embedding_rule(spec: ModelSpec, key: str, extra: int, tensors) -> tuple[R.Rule, list[str]]:
  grid = spec.image_size // spec.vision.patch_size
  notes = []
  if extra:
    notes.append(f'distillation token and its position embedding ({key}[:, 1]) dropped')
  if tensors is not None:
    patches = tensors[key].shape[1] - 1 - extra
    old = int(round(np.sqrt(patches)))
    if old * old != patches:
      raise CheckpointError(f'{key} holds {patches} patch positions, not a square grid')
    if old != grid:
      notes.append(f'position embeddings resized from {old}x{old} to {grid}x{grid} patches (bicubic, [CLS] kept)')

  def load(posemb):
    if extra:
      posemb = np.concatenate([posemb[:, :1], posemb[:, 2:]], axis=1)
    return np.asarray(resize_pos_embedding(jnp.asarray(posemb, jnp.float32), (grid, grid)))
  return R.Rule('vision/pos_embedding', None, (key,), load, lambda p: (p,)), notes


def _hf_layer_rules(n: int, heads: int) -> list[R.Rule]:
  key, param = f'encoder.layer.{n}', 'vision/layers'
  qkv = tuple(f'{key}.attention.attention.{name}' for name in ('query', 'key', 'value'))
  return [*R.layer_norm(f'{param}/ln1', f'{key}.layernorm_before', n),
          R.qkv_kernel(f'{param}/attn/qkv/kernel', tuple(f'{k}.weight' for k in qkv), heads, n),
          R.qkv_bias(f'{param}/attn/qkv/bias', tuple(f'{k}.bias' for k in qkv), heads, n),
          R.out_kernel(f'{param}/attn/out/kernel', f'{key}.attention.output.dense.weight', heads, n),
          R.copy(f'{param}/attn/out/bias', f'{key}.attention.output.dense.bias', n),
          *R.layer_norm(f'{param}/ln2', f'{key}.layernorm_after', n),
          *R.dense(f'{param}/mlp/fc1', f'{key}.intermediate.dense', n),
          *R.dense(f'{param}/mlp/fc2', f'{key}.output.dense', n)]


def _timm_layer_rules(n: int, heads: int) -> list[R.Rule]:
  key, param = f'blocks.{n}', 'vision/layers'
  return [*R.layer_norm(f'{param}/ln1', f'{key}.norm1', n),
          R.fused_qkv_kernel(f'{param}/attn/qkv/kernel', f'{key}.attn.qkv.weight', heads, n),
          R.fused_qkv_bias(f'{param}/attn/qkv/bias', f'{key}.attn.qkv.bias', heads, n),
          R.out_kernel(f'{param}/attn/out/kernel', f'{key}.attn.proj.weight', heads, n),
          R.copy(f'{param}/attn/out/bias', f'{key}.attn.proj.bias', n),
          *R.layer_norm(f'{param}/ln2', f'{key}.norm2', n),
          *R.dense(f'{param}/mlp/fc1', f'{key}.mlp.fc1', n),
          *R.dense(f'{param}/mlp/fc2', f'{key}.mlp.fc2', n)]


def hf_config(spec: ModelSpec) -> dict:
  """A ViTModel config.json for the exported tower."""
  return {'architectures': ['ViTModel'], 'model_type': 'vit', 'hidden_size': spec.vision.width,
          'num_hidden_layers': spec.vision.depth, 'num_attention_heads': spec.vision.heads,
          'intermediate_size': spec.vision.mlp_dim, 'hidden_act': 'gelu', 'image_size': spec.image_size,
          'patch_size': spec.vision.patch_size, 'num_channels': 3, 'qkv_bias': True,
          'layer_norm_eps': spec.vision.layer_norm_eps, 'hidden_dropout_prob': 0.0,
          'attention_probs_dropout_prob': 0.0, 'initializer_range': 0.02}


def distillation_hint(unused: list[str]) -> str:
  """An extra line for the unused-tensor error when the culprit is DeiT's distillation token."""
  if any(re.search(r'(distillation_token|dist_token)$', n) for n in unused):
    return ('\nDeiT distillation token: xmodal\'s ViT has one [CLS]; pass expected_unused=(r"dist(illation)?_token$",) '
            'to drop it and its position embedding (this changes what the network computes).')
  return ''
