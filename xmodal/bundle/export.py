"""`xmodal export`: a trained model as an inference bundle that runs without the model code (see bundle/format.py).

  xmodal export --workdir DIR --out BUNDLE [--step N] [--dtype float32|bfloat16] [--platforms cpu,cuda]

The model functions (encode_image, encode_text, match, explain, image_keys_values, match_keys_values) are
serialized with `jax.export` at a symbolic batch size 'b', the matches also at a symbolic text length 'l' (re-ranking
runs each query at its own length). Parameters are the first argument of each function, not constants baked into
the program: the weights are stored once (params.safetensors) instead of once per function, the StableHLO files stay
a few hundred KB whatever the model size, and a bundle can be re-weighted without re-exporting. Every function takes
and returns float32 (and int32 ids/masks); a bfloat16 bundle stores bfloat16 weights and runs its matmuls in
bfloat16 (model.dtype), casting at the boundary.

`export_bundle` needs only a config and a parameter tree, so tests and other tools can export without a checkpoint.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import pathlib
import shutil
import tempfile
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

import xmodal
from xmodal.bundle import format as bundle_lib
from xmodal.models import explain as explain_lib
from xmodal.models.model import XModal, build
from xmodal.tokenizer import Tokenizer, load_tokenizer

DTYPES = ('float32', 'bfloat16')
DEFAULT_PLATFORMS = ('cpu',)


def flatten_params(params) -> dict[str, np.ndarray]:
  """A (possibly boxed) parameter tree → {'vision/.../kernel': float32 array}, the names params.safetensors uses."""
  flat = traverse_util.flatten_dict(nn.unbox(params), sep='/')
  return {name: np.asarray(jax.device_get(value), np.float32) for name, value in flat.items()}


def _model_functions(model: XModal):
  """The exported functions, each (flat params, inputs...) → float32 outputs."""

  def variables(flat):
    # Stored weights may be bfloat16; the modules expect float32 parameters (model.dtype sets the matmul precision).
    return {'params': traverse_util.unflatten_dict({k: v.astype(jnp.float32) for k, v in flat.items()}, sep='/')}

  def encode_image(flat, images):
    tokens, emb = model.apply(variables(flat), images, method=XModal.encode_image)
    return tokens.astype(jnp.float32), emb.astype(jnp.float32)

  def encode_text(flat, ids, mask):
    tokens, emb = model.apply(variables(flat), ids, mask, method=XModal.encode_text)
    return tokens.astype(jnp.float32), emb.astype(jnp.float32)

  def match(flat, text_tokens, text_mask, image_tokens):
    dtype = jnp.dtype(model.spec.dtype)
    logits = model.apply(variables(flat), text_tokens.astype(dtype), text_mask, image_tokens.astype(dtype),
                         method=XModal.match)
    return logits.astype(jnp.float32)

  def explain(flat, text_tokens, text_mask, image_tokens):
    dtype = jnp.dtype(model.spec.dtype)
    maps, logit = explain_lib.explain(model, variables(flat)['params'], text_tokens.astype(dtype), text_mask,
                                      image_tokens.astype(dtype))
    return maps.astype(jnp.float32), logit.astype(jnp.float32)

  def image_keys_values(flat, image_tokens):
    keys_values = model.apply(variables(flat), image_tokens.astype(jnp.dtype(model.spec.dtype)),
                              method=XModal.image_keys_values)
    return jnp.moveaxis(keys_values, 2, 0).astype(jnp.float32)  # (B, C, 2, H, Dh, N): an index's rows

  def match_keys_values(flat, text_tokens, text_mask, text_index, *keys_values):
    # T texts, pair i reading text `text_index[i]` (a query's pairs share it); keys_0, values_0, keys_1, ...: each
    # layer's its own input, which the attention reads as it lies (sliced out of one array, it would be copied).
    dtype = jnp.dtype(model.spec.dtype)
    pairs = tuple((k.astype(dtype), v.astype(dtype)) for k, v in zip(keys_values[::2], keys_values[1::2]))
    logits = model.apply(variables(flat), text_tokens.astype(dtype), text_mask, None, keys_values=pairs,
                         text_index=text_index, method=XModal.match)
    return logits.astype(jnp.float32)

  return {'encode_image': encode_image, 'encode_text': encode_text, 'match': match, 'explain': explain,
          'image_keys_values': image_keys_values, 'match_keys_values': match_keys_values}


def _signatures(model: XModal, flat_specs: dict[str, jax.ShapeDtypeStruct]):
  """Input specs with symbolic batch 'b' (and text length 'l', distinct texts 't') per function, as (name, shape,
  dtype) lists."""
  b, l, t = jax.export.symbolic_shape('b, l, t')
  spec = model.spec
  size, length = spec.image_size, spec.max_text_len
  variables = {'params': traverse_util.unflatten_dict(flat_specs, sep='/')}
  image_tokens = jax.eval_shape(lambda p, x: model.apply(p, x, method=XModal.encode_image), variables,
                                jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))[0]
  keys_values = jax.eval_shape(lambda p, x: model.apply(p, x, method=XModal.image_keys_values), variables,
                               image_tokens)
  num_patches, vision_width = image_tokens.shape[1:]
  f32, i32 = jnp.float32, jnp.int32
  image_input = ('image_tokens', (b, num_patches, vision_width), f32)
  # The matches take texts of any length up to the model's: a search cuts each query to its own (padding is masked).
  texts = [('text_tokens', (b, l, spec.text.width), f32), ('text_mask', (b, l), i32)]
  return {
      'encode_image': [('images', (b, size, size, 3), f32)],
      'encode_text': [('ids', (b, length), i32), ('mask', (b, length), i32)],
      'match': [*texts, image_input],
      'explain': [('text_tokens', (b, length, spec.text.width), f32), ('text_mask', (b, length), i32), image_input],
      'image_keys_values': [image_input],
      'match_keys_values': [('text_tokens', (t, l, spec.text.width), f32), ('text_mask', (t, l), i32),
                            ('text_index', (b,), i32),
                            *[(f'{kind}_{layer}', (b, *keys_values.shape[3:]), f32)
                              for layer in range(keys_values.shape[0]) for kind in ('keys', 'values')]],
  }


def _describe(shape, dtype) -> dict[str, Any]:
  return {'shape': [d if isinstance(d, int) else str(d) for d in shape], 'dtype': jnp.dtype(dtype).name}


def export_functions(model: XModal, flat_params: dict[str, np.ndarray],
                     platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, tuple[bytes, dict[str, Any]]]:
  """{name: (serialized StableHLO, manifest entry)} for every function of `bundle_lib.FUNCTIONS` and
  `bundle_lib.OPTIONAL_FUNCTIONS`."""
  flat_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat_params.items()}
  signatures = _signatures(model, flat_specs)
  out = {}
  for name, fn in _model_functions(model).items():
    inputs = signatures[name]
    exported = jax.export.export(jax.jit(fn), platforms=tuple(platforms))(
        flat_specs, *(jax.ShapeDtypeStruct(shape, dtype) for _, shape, dtype in inputs))
    outputs = exported.out_avals
    entry = {'file': bundle_lib.function_file(name), 'platforms': list(exported.platforms),
             'calling_convention_version': exported.calling_convention_version,
             'inputs': {n: _describe(shape, dtype) for n, shape, dtype in inputs},
             'outputs': [_describe(a.shape, a.dtype) for a in outputs]}
    out[name] = (bytes(exported.serialize()), entry)
  return out


def export_bundle(config: ml_collections.ConfigDict, params, tokenizer: Tokenizer | str, out_dir: str | pathlib.Path,
                  dtype: str = 'float32', platforms: Sequence[str] = DEFAULT_PLATFORMS,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes an inference bundle of `params` (see bundle/format.py for the layout); returns its manifest.

  Args:
    config: the experiment config (its `model` and `data` sections are used).
    params: the parameter tree (`state.params`, boxed or not); only parameters are written.
    tokenizer: a loaded Tokenizer or a `load_tokenizer` spec; its files are copied.
    out_dir: the bundle directory; must not exist or be empty. Written beside it and renamed, so a failed export
      leaves nothing half-written.
    dtype: 'float32' or 'bfloat16' (storage and matmul precision).
    platforms: jax.export lowering platforms ('cpu', 'cuda', 'tpu').
    extra: more manifest fields (e.g. the source workdir and step).
  """
  if dtype not in DTYPES:
    raise ValueError(f'dtype {dtype!r} is not one of {DTYPES}')
  out_dir = pathlib.Path(out_dir)
  if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
    raise FileExistsError(f'{out_dir} exists and is not an empty directory')
  return write_bundle(stage_bundle(config, params, tokenizer, dtype, platforms, extra), out_dir)


@dataclasses.dataclass(frozen=True)
class StagedBundle:
  """A bundle complete and checked in memory: each file's content by its path in the bundle."""
  params: dict[str, np.ndarray]  # params.safetensors: flat names, in the bundle's dtype
  texts: dict[str, str]  # the JSON files: model config, preprocessing, tokenizer spec
  blobs: dict[str, bytes]  # the serialized functions
  copies: dict[str, str]  # files copied as they are (the tokenizer's), from their source path
  manifest: dict[str, Any]  # the manifest's fields; writing adds the size and sha256 of every file


def stage_bundle(config: ml_collections.ConfigDict, params, tokenizer: Tokenizer | str, dtype: str = 'float32',
                 platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 extra: dict[str, Any] | None = None) -> StagedBundle:
  """Everything a bundle holds, exported and checked, with nothing written yet (arguments as `export_bundle`'s)."""
  tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
  model_config = ml_collections.ConfigDict(config.model.to_dict())
  model_config.dtype = dtype
  if tokenizer.vocab_size > model_config.text.vocab_size:
    raise ValueError(f'tokenizer has {tokenizer.vocab_size} ids but model.text.vocab_size is '
                     f'{model_config.text.vocab_size}')
  model = build(model_config)
  flat = {k: v.astype(jnp.dtype(dtype)) for k, v in flatten_params(params).items()}
  functions = export_functions(model, flat, platforms)
  data = config.data
  preprocess = bundle_lib.preprocess_spec(data.image_size, data.mean, data.std)
  if preprocess['image_size'] != model_config.image_size:
    raise ValueError(f'data.image_size {data.image_size} != model.image_size {model_config.image_size}')
  names = [pathlib.Path(source).name for source in tokenizer.files]
  tokenizer_spec = {'file': names[0], 'max_text_len': int(model_config.max_text_len),
                    'vocab_size': int(tokenizer.vocab_size)}
  return StagedBundle(
      params=flat,
      texts={bundle_lib.MODEL_CONFIG: model_config.to_json_best_effort(indent=2, sort_keys=True) + '\n',
             bundle_lib.PREPROCESS: json.dumps(preprocess, indent=2) + '\n',
             bundle_lib.TOKENIZER_SPEC: json.dumps(tokenizer_spec, indent=2) + '\n'},
      blobs={entry['file']: blob for blob, entry in functions.values()},
      copies={f'{bundle_lib.TOKENIZER_DIR}/{name}': source for name, source in zip(names, tokenizer.files)},
      manifest={
          'xmodal_version': xmodal.__version__, 'jax_version': jax.__version__,
          'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'dtype': dtype, 'parameters': {'count': int(sum(v.size for v in flat.values())), 'tensors': len(flat),
                                         'passed_as_argument': True},
          'functions': {name: entry for name, (_, entry) in functions.items()},
          'embed_dim': int(model_config.embed_dim), **(extra or {})})


def write_bundle(staged: StagedBundle, out_dir: pathlib.Path) -> dict[str, Any]:
  """Writes `staged` into a folder beside `out_dir` and renames it into place; returns the manifest.

  A failure removes the half-written folder, so `out_dir` is either a whole bundle or as it was.
  """
  out_dir.parent.mkdir(parents=True, exist_ok=True)
  staging = pathlib.Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.', dir=out_dir.parent))

  def path(name: str) -> pathlib.Path:
    (staging / name).parent.mkdir(parents=True, exist_ok=True)
    return staging / name

  try:
    bundle_lib.save_safetensors(staged.params, path(bundle_lib.PARAMS))
    for name, text in staged.texts.items():
      path(name).write_text(text)
    for name, source in staged.copies.items():
      shutil.copyfile(source, path(name))
    for name, blob in staged.blobs.items():
      path(name).write_bytes(blob)
    manifest = bundle_lib.write_manifest(staging, staged.manifest)
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
    if out_dir.exists():
      out_dir.rmdir()
    staging.rename(out_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return manifest


def export_workdir(workdir: str | pathlib.Path, out_dir: str | pathlib.Path, step: int | None = None,
                   dtype: str = 'float32', platforms: Sequence[str] = DEFAULT_PLATFORMS) -> dict[str, Any]:
  """Restores a checkpoint of a training workdir (the latest, or `step`) and exports it with `export_bundle`."""
  from xmodal import sharding  # pylint: disable=g-import-not-at-top
  from xmodal.train.run import load_run_config, restore_state  # pylint: disable=g-import-not-at-top

  workdir = pathlib.Path(workdir)
  config = load_run_config(workdir, None, [])
  # One device holds everything: export traces unsharded functions, whatever mesh the run trained on.
  mesh = sharding.make_mesh((1, 1, 1), jax.devices()[:1])
  _, state, _ = restore_state(config, workdir, step, mesh)
  return export_bundle(config, state.params, config.data.tokenizer, out_dir, dtype=dtype, platforms=platforms,
                       extra={'source': {'workdir': str(workdir.resolve()), 'step': int(state.step)}})
