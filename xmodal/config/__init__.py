"""Config files, `path:arg` specs and dotted overrides, validated before anything compiles.

A config file is Python with `get_config(arg: str | None) -> ConfigDict` (the ml_collections idiom). The command line
names it as `configs/NAME.py[:arg]` and changes single values with `--config.a.b=value`. Every failure here is a
`ConfigError` whose message names the offending key, so that a typo costs a second, not a compile.

The settings themselves: `defaults.py` (the full default config, every section and knob), `model.py` (the size table
and the model section it fills), `data.py` (the data section). Those three import nothing of xmodal beyond
`xmodal.sharding`'s rules; the validation here imports each allowed-value list from the code that implements it.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from collections.abc import Iterable, Sequence

import ml_collections

from xmodal.evaluation import rerank
from xmodal.models import attention, layers, vit
from xmodal.models import model as model_lib
from xmodal.train import objective
from xmodal.train import step as step_lib


class ConfigError(ValueError):
  """A config that cannot be run; the message names the key."""


def parse_arg(arg: str | None, defaults: dict) -> ml_collections.ConfigDict:
  """Parses a config argument `k=v,k2=v2` into typed fields, starting from `defaults`.

  Values take the type of their default; unknown keys are an error listing the valid ones.
  """
  fields = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return fields
  for item in arg.split(','):
    if not item.strip():
      continue
    if '=' not in item:
      raise ConfigError(f'config argument {item!r} is not of the form key=value (valid keys: {sorted(defaults)})')
    key, value = (s.strip() for s in item.split('=', 1))
    if key not in defaults:
      raise ConfigError(f'unknown config argument {key!r}; valid: {sorted(defaults)}')
    fields[key] = _coerce(value, defaults[key], key)
  return fields


def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:arg]`, applies `a.b=value` overrides and validates the result."""
  path, _, arg = spec.partition(':')
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(f'xmodal_config_{file.stem}', file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'config file {path!r} defines no get_config(arg)')
  config = module.get_config(arg or None)
  apply_overrides(config, overrides)
  validate(config)
  return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Iterable[str]) -> None:
  """Applies `a.b.c=value` assignments in place; unknown keys and type mismatches raise ConfigError."""
  for override in overrides:
    key, sep, raw = override.partition('=')
    key = key.strip().removeprefix('--config.').removeprefix('config.')
    if not sep:
      raise ConfigError(f'override {override!r} is not of the form a.b=value')
    *parents, leaf = key.split('.')
    node = config
    for depth, name in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        raise ConfigError(f'unknown config key {".".join(parents[:depth + 1])!r} (in override {override!r})')
      node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(f'unknown config key {key!r}; valid keys here: {valid}')
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f'config key {key!r} is a group; set one of its fields: {sorted(current.keys())}')
    with node.unlocked():
      node[leaf] = _coerce(raw, current, key)


def _coerce(raw: str, current, key: str):
  """Turns the string `raw` into the type of `current`, the value it replaces."""
  if current is None:
    return _literal(raw)
  kind = type(current)
  try:
    if kind is bool:
      lowered = raw.lower()
      if lowered not in ('true', 'false', '1', '0'):
        raise ValueError(raw)
      return lowered in ('true', '1')
    if kind is int:
      return int(raw)
    if kind is float:
      return float(raw)
    if kind is str:
      return raw
    if kind in (tuple, list):
      value = ast.literal_eval(raw)
      if not isinstance(value, (tuple, list)):
        value = (value,)
      return kind(value)
  except (ValueError, SyntaxError) as e:
    raise ConfigError(f'config key {key!r} expects {kind.__name__}, got {raw!r}') from e
  raise ConfigError(f'config key {key!r} of type {kind.__name__} cannot be set from the command line')


def _literal(raw: str):
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def _require(condition: bool, key: str, message: str) -> None:
  if not condition:
    raise ConfigError(f'{key}: {message}')


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks shapes and choices that would otherwise fail deep inside a compile."""
  if 'model' in config:
    validate_model(config.model, prefix='model')
  if 'data' in config and 'model' in config:
    for field, model_field in (('image_size', 'image_size'), ('max_text_len', 'max_text_len')):
      _require(config.data[field] == config.model[model_field], f'data.{field}',
               f'{config.data[field]} differs from model.{model_field}={config.model[model_field]}')
  if 'train' in config:
    _require(config.train.nan_policy in NAN_POLICIES, 'train.nan_policy',
             f'{config.train.nan_policy!r} is not one of {NAN_POLICIES}')
    _require(config.train.grad_accum >= 1, 'train.grad_accum', f'must be >= 1, got {config.train.grad_accum}')
    if 'data' in config:
      _require(config.data.batch_size % config.train.grad_accum == 0, 'train.grad_accum',
               f'{config.train.grad_accum} does not divide data.batch_size={config.data.batch_size}')
    _validate_grad_accum_mode(config)
  if 'eval' in config:
    _require(config.eval.score in rerank.ITM_SCORES, 'eval.score',
             f'{config.eval.score!r} is not one of {rerank.ITM_SCORES}')
  if 'loss' in config:
    loss = config.loss
    if 'itm_subsample' in loss:
      _require(loss.itm_subsample >= 1, 'loss.itm_subsample', f'must be >= 1, got {loss.itm_subsample}')
      if 'data' in config:
        _require(config.data.batch_size % loss.itm_subsample == 0, 'loss.itm_subsample',
                 f'{loss.itm_subsample} does not divide data.batch_size={config.data.batch_size}')
    if loss.get('itc_written_negatives'):
      _require(not loss.get('chunked'), 'loss.itc_written_negatives',
               'the ring form (loss.chunked) has no extra columns')
      if 'data' in config:
        _require(config.data.negatives_key, 'loss.itc_written_negatives',
                 'needs negatives from the data: set data.negatives_key')
    if 'itm_written_negatives' in loss:
      _require(loss.itm_written_negatives in WRITTEN_NEGATIVES, 'loss.itm_written_negatives',
               f'{loss.itm_written_negatives!r} is not one of {WRITTEN_NEGATIVES}')
      if 'data' in config:
        _require(loss.itm_written_negatives == 'off' or config.data.negatives_key, 'loss.itm_written_negatives',
                 f'{loss.itm_written_negatives!r} needs negatives from the data: set data.negatives_key')
    if loss.get('mlm_weight', 0) > 0:
      if 'model' in config:
        _require(config.model.get('mlm_head', False), 'loss.mlm_weight', 'needs the MLM head: set model.mlm_head=True')
      _require(0 < loss.mlm_probability < 1, 'loss.mlm_probability', f'must be in (0, 1), got {loss.mlm_probability}')
    for name in ('region_weight', 'locate_weight'):  # the losses read from the data's regions
      if loss.get(name, 0) > 0 and 'data' in config:
        _require(config.data.region_boxes_key, f'loss.{name}',
                 'needs regions from the data: set data.region_boxes_key and data.region_phrases_key')
    if loss.get('locate_weight', 0) > 0 and 'model' in config:
      _require(config.model.get('fusion_locator', False), 'loss.locate_weight',
               'trains the fusion encoder\'s Locator: set model.fusion_locator=True')
    if 'data' in config and config.data.get('caption_grounding', ''):
      _require(loss.get('locate_weight', 0) > 0, 'data.caption_grounding',
               f'{config.data.caption_grounding!r} grounds captions for the Locator: set loss.locate_weight > 0')
    if loss.get('relation_weight', 0) > 0:
      _require(loss.itm_weight > 0, 'loss.relation_weight', 'scores pairs with the ITM head: set loss.itm_weight > 0')
      if 'data' in config:
        _require(config.data.get('relation_swaps', ''), 'loss.relation_weight',
                 'needs relation swaps from the data: set data.relation_swaps')
    if loss.get('length_buckets') and 'model' in config:
      _validate_length_buckets(loss.length_buckets, config.model.max_text_len)
      if 'train' in config:
        # The loop checks the whole batch against the plan; a micro-batch of it may not fit.
        _require(config.train.grad_accum == 1, 'loss.length_buckets',
                 f'not with gradient accumulation (train.grad_accum={config.train.grad_accum})')
    if loss.get('itm_start_step', 0):
      _require(loss.itm_start_step >= 0, 'loss.itm_start_step', f'must be >= 0, got {loss.itm_start_step}')
      if 'train' in config:
        _require(loss.itm_start_step < config.train.steps, 'loss.itm_start_step',
                 f'{loss.itm_start_step} leaves ITM no step of train.steps={config.train.steps} (a config '
                 f'argument such as configs/shapes.py:steps=N moves both)')
      _require(loss.itm_start_step == 0 or loss.mlm_weight == 0, 'loss.itm_start_step',
               f'starts the fusion encoder late, but MLM (loss.mlm_weight={loss.mlm_weight}) trains it from step 0')
    _validate_momentum(config)
    for name in ('itc_weight', 'itm_weight', 'sigmoid_weight', 'mlm_weight', 'region_weight', 'locate_weight',
                 'relation_weight'):
      if name in loss:
        _require(loss[name] >= 0, f'loss.{name}', f'must be >= 0, got {loss[name]}')


def _validate_grad_accum_mode(config: ml_collections.ConfigDict) -> None:
  """train.grad_accum_mode, and the losses 'exact' (gradient caching) does not cache."""
  mode = config.train.get('grad_accum_mode', 'micro')
  _require(mode in GRAD_ACCUM_MODES, 'train.grad_accum_mode', f'{mode!r} is not one of {GRAD_ACCUM_MODES}')
  if mode != 'exact' or 'loss' not in config:
    return
  loss = config.loss
  _require(not loss.get('momentum', 0.0), 'loss.momentum',
           f"{loss.get('momentum')}: train.grad_accum_mode='exact' does not cache the momentum form of ITC (its "
           "keys, queue and distilled targets); set loss.momentum=0 or train.grad_accum_mode='micro'")
  _require(not loss.get('chunked'), 'loss.chunked',
           "train.grad_accum_mode='exact' takes ITC's plain form over the cached embeddings; set loss.chunked=False "
           "or train.grad_accum_mode='micro'")
  _require(not loss.get('itc_written_negatives'), 'loss.itc_written_negatives',
           "train.grad_accum_mode='exact' does not cache the written negatives' embeddings; set "
           "loss.itc_written_negatives=False or train.grad_accum_mode='micro'")
  _require(not loss.get('region_weight', 0.0), 'loss.region_weight',
           "train.grad_accum_mode='exact' does not cache the region and phrase embeddings; set "
           "loss.region_weight=0 or train.grad_accum_mode='micro'")


def _validate_momentum(config: ml_collections.ConfigDict) -> None:
  """loss.momentum, queue_size, distill_alpha, distill_warmup_steps and what they combine with."""
  loss = config.loss
  momentum = loss.get('momentum', 0.0)
  _require(0 <= momentum < 1, 'loss.momentum', f'must be in [0, 1) (0 = off, ALBEF 0.995), got {momentum}')
  queue_size, alpha = loss.get('queue_size', 0), loss.get('distill_alpha', 0.0)
  _require(queue_size >= 0, 'loss.queue_size', f'must be >= 0, got {queue_size}')
  _require(0 <= alpha <= 1, 'loss.distill_alpha', f'must be in [0, 1], got {alpha}')
  _require(loss.get('distill_warmup_steps', 0) >= 0, 'loss.distill_warmup_steps',
           f"must be >= 0, got {loss.get('distill_warmup_steps')}")
  for name, value in (('queue_size', queue_size), ('distill_alpha', alpha)):
    _require(not value or momentum > 0, f'loss.{name}',
             f'{value} needs the momentum model: set loss.momentum (ALBEF 0.995)')
  if momentum > 0:
    _require(not loss.get('chunked'), 'loss.chunked',
             'the ring form has no momentum ITC (its keys, queue and distilled targets); set loss.momentum=0')
    _require(not loss.get('itc_written_negatives'), 'loss.itc_written_negatives',
             'has no columns in the momentum form of ITC (loss.momentum > 0); use loss.itm_written_negatives')
  if queue_size and 'data' in config:
    _require(queue_size % config.data.batch_size == 0, 'loss.queue_size',
             f'{queue_size} is not a multiple of data.batch_size={config.data.batch_size} (the queue takes one global '
             f'batch per step)')


# Allowed values are owned by the code that implements them; validation reads them from there.
ATTENTION_IMPLS = attention.IMPLEMENTATIONS
REMAT_POLICIES = layers.REMAT_POLICIES
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
NAN_POLICIES = ('stop', 'skip')  # train.nan_policy: end the run naming the step, or drop that update
GRAD_ACCUM_MODES = step_lib.GRAD_ACCUM_MODES
POSEMB_INITS = tuple(vit.POSEMB_INITS)
POOLS = model_lib.POOLS
KERNEL_INITS = layers.KERNEL_INITS
VISION_STEMS = vit.STEMS
WRITTEN_NEGATIVES = objective.WRITTEN_NEGATIVES


def _validate_length_buckets(buckets, max_text_len: int) -> None:
  key = 'loss.length_buckets'
  _require(all(isinstance(b, (tuple, list)) and len(b) == 2 for b in buckets), key,
           f'expects ((share, length), ...), got {buckets!r}')
  shares, lengths = [float(s) for s, _ in buckets], [b[1] for b in buckets]
  _require(all(s > 0 for s in shares) and sum(shares) <= 1, key,
           f'shares must be positive and sum to at most 1, got {buckets!r}')
  _require(all(isinstance(n, int) and 0 < n < max_text_len for n in lengths), key,
           f'lengths must be whole numbers in (0, max_text_len={max_text_len}), got {buckets!r}')
  _require(lengths == sorted(set(lengths)), key, f'lengths must increase, got {buckets!r}')


def validate_model(model: ml_collections.ConfigDict, prefix: str = 'model') -> None:
  """Checks a model config: divisibility of widths by heads and of images by patches, and the choices."""
  vit, text = model.vision, model.text
  _require(model.image_size % vit.patch_size == 0, f'{prefix}.image_size',
           f'{model.image_size} is not divisible by {prefix}.vision.patch_size={vit.patch_size}')
  for tower_name, tower in (('vision', vit), ('text', text)):
    for field in ('width', 'depth', 'heads', 'mlp_dim'):
      _require(tower[field] > 0, f'{prefix}.{tower_name}.{field}', f'must be positive, got {tower[field]}')
    _require(tower.width % tower.heads == 0, f'{prefix}.{tower_name}.width',
             f'{tower.width} is not divisible by {prefix}.{tower_name}.heads={tower.heads}')
  _require(model.fusion_depth > 0, f'{prefix}.fusion_depth', f'must be positive, got {model.fusion_depth}')
  _require(model.embed_dim > 0, f'{prefix}.embed_dim', f'must be positive, got {model.embed_dim}')
  _require(text.vocab_size > 0, f'{prefix}.text.vocab_size', f'must be positive, got {text.vocab_size}')
  _require(model.max_text_len <= text.max_positions, f'{prefix}.max_text_len',
           f'{model.max_text_len} exceeds {prefix}.text.max_positions={text.max_positions}')
  _require(model.attention in ATTENTION_IMPLS, f'{prefix}.attention',
           f'{model.attention!r} is not one of {ATTENTION_IMPLS}')
  _require(model.remat in REMAT_POLICIES, f'{prefix}.remat', f'{model.remat!r} is not one of {REMAT_POLICIES}')
  _require(vit.posemb_init in POSEMB_INITS, f'{prefix}.vision.posemb_init',
           f'{vit.posemb_init!r} is not one of {POSEMB_INITS}')
  _require(vit.stem in VISION_STEMS, f'{prefix}.vision.stem', f'{vit.stem!r} is not one of {VISION_STEMS}')
  if vit.stem == 'conv':
    _require(vit.patch_size & (vit.patch_size - 1) == 0, f'{prefix}.vision.patch_size',
             f'a conv stem halves the image log2(patch) times: {vit.patch_size} is not a power of two')
  _require(vit.layer_scale_init >= 0, f'{prefix}.vision.layer_scale_init',
           f'must be >= 0, got {vit.layer_scale_init}')
  _require(model.pool in POOLS, f'{prefix}.pool', f'{model.pool!r} is not one of {POOLS}')
  _require(model.fusion_init in KERNEL_INITS, f'{prefix}.fusion_init',
           f'{model.fusion_init!r} is not one of {KERNEL_INITS}')
  _require(0 <= model.fusion_word_window < model.max_text_len, f'{prefix}.fusion_word_window',
           f'must be in [0, max_text_len={model.max_text_len}), got {model.fusion_word_window}')
  _require(model.dtype in COMPUTE_DTYPES, f'{prefix}.dtype', f'{model.dtype!r} is not one of {COMPUTE_DTYPES}')
  _require(0.001 <= model.temperature_init <= 0.5, f'{prefix}.temperature_init',
           f'{model.temperature_init} is outside [0.001, 0.5]')
