"""The inference bundle on disk: layout, safetensors I/O, manifest, checksums. Writer and reader share this file.

  BUNDLE/
    manifest.json          format version, xmodal/jax versions, dtype, function signatures, sha256 of every file
    model_config.json      the `model` config section the bundle was exported from
    preprocess.json        image_size, mean, std, resize and crop method (see inference/preprocess.py)
    params.safetensors     parameters only, flat names 'vision/.../kernel' (no optimizer state)
    tokenizer/             the tokenizer files, copied; tokenizer.json names the one to load and max_text_len
    encode_image.stablehlo jax.export, symbolic batch 'b'; parameters are the first argument (not baked in)
    encode_text.stablehlo
    match.stablehlo        and symbolic text length 'l' (older bundles: the model's fixed length)
    explain.stablehlo      per-token heatmaps over the patches (xmodal.models.explain); absent from older bundles
    image_keys_values.stablehlo  each cross-attention's keys and values of image tokens, for an index to keep;
    match_keys_values.stablehlo  the match that reads them (both absent from older bundles)

Nothing here unpickles or executes Python from a bundle: JSON, raw little-endian arrays in safetensors framing,
tokenizer files read by the `tokenizers`/`sentencepiece` libraries, and serialized StableHLO that jax deserializes.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_dtypes  # noqa: F401  registers 'bfloat16' with numpy: safetensors.numpy looks bfloat16 up by name
import numpy as np
import safetensors
import safetensors.numpy

FORMAT = 'xmodal-inference-bundle'
FORMAT_VERSION = 1  # bump on any change a version-1 reader cannot read; readers refuse other majors
MANIFEST = 'manifest.json'
MODEL_CONFIG = 'model_config.json'
PREPROCESS = 'preprocess.json'
PARAMS = 'params.safetensors'
TOKENIZER_DIR = 'tokenizer'
TOKENIZER_SPEC = 'tokenizer/tokenizer_spec.json'
FUNCTIONS = ('encode_image', 'encode_text', 'match')  # every bundle has these
# Functions that bundles of later exports add; a reader runs a bundle without them, minus what they serve.
OPTIONAL_FUNCTIONS = ('explain', 'image_keys_values', 'match_keys_values')
# What the training pipeline's evaluation preprocessing (xmodal.data.preprocess.eval_image) does, by name: the values
# of preprocess.json's 'resize' and 'crop', which a reader (xmodal.inference.preprocess) implements.
RESIZE = 'shorter_side_bilinear_antialias'
CROP = 'center'


class BundleError(ValueError):
  """A bundle file is missing, corrupted, fails its checksum or comes from an incompatible format version."""


def function_file(name: str) -> str:
  return f'{name}.stablehlo'


def sha256_file(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- safetensors
def save_safetensors(arrays: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
  """Writes the parameters file with the safetensors library (bfloat16 as `ml_dtypes.bfloat16`, what jax uses)."""
  # The library writes each array's buffer as it lies in memory, so views (a transpose) must be made C-ordered first;
  # np.asarray(order='C') keeps scalars 0-d where np.ascontiguousarray would make them (1,).
  safetensors.numpy.save_file({name: np.asarray(a, order='C') for name, a in arrays.items()}, str(path))


def load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads the parameters file; raises BundleError naming the file on any malformed part."""
  try:
    return safetensors.numpy.load_file(str(path))
  except safetensors.SafetensorError as e:
    raise BundleError(f'{path}: not a readable safetensors file ({e})') from e


def preprocess_spec(image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
  """The preprocess.json of a bundle: every number the model's inputs were prepared with."""
  return {'image_size': int(image_size), 'mean': [float(m) for m in mean], 'std': [float(s) for s in std],
          'resize': RESIZE, 'crop': CROP, 'pixel_range': [0, 255], 'channels': 'RGB'}


# ---------------------------------------------------------------------------------------------------- manifest
def write_manifest(out_dir: pathlib.Path, fields: dict[str, Any]) -> dict[str, Any]:
  """Writes manifest.json: `fields` plus the format, and the sha256 and size of every other file in out_dir."""
  files = {}
  for path in sorted(p for p in out_dir.rglob('*') if p.is_file() and p.name != MANIFEST):
    files[path.relative_to(out_dir).as_posix()] = {'sha256': sha256_file(path), 'bytes': path.stat().st_size}
  manifest = {'format': FORMAT, 'format_version': FORMAT_VERSION, **fields, 'files': files}
  (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + '\n')
  return manifest


def read_json(bundle: pathlib.Path, name: str) -> Any:
  path = bundle / name
  if not path.is_file():
    raise BundleError(f'{path}: missing from the bundle')
  try:
    return json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError) as e:
    raise BundleError(f'{path}: not valid JSON ({e})') from e


def verify(bundle: str | pathlib.Path, checksums: bool = True) -> dict[str, Any]:
  """Reads manifest.json and checks the format version and every listed file (presence, size, sha256).

  Args:
    bundle: the bundle directory.
    checksums: False skips hashing (sizes are still checked), for a bundle already verified.

  Returns:
    The manifest.

  Raises:
    BundleError naming the first file that is missing, the wrong size or fails its checksum, or the manifest when
    its format or version is not one this reader knows.
  """
  bundle = pathlib.Path(bundle)
  if not bundle.is_dir():
    raise BundleError(f'{bundle}: not a bundle directory')
  manifest = read_json(bundle, MANIFEST)
  where = bundle / MANIFEST
  if not isinstance(manifest, dict) or manifest.get('format') != FORMAT:
    raise BundleError(f'{where}: not an {FORMAT} manifest')
  version = manifest.get('format_version')
  if version != FORMAT_VERSION:
    raise BundleError(f'{where}: bundle format version {version} is not supported by this reader (version '
                      f'{FORMAT_VERSION}); re-export it with this xmodal, or load it with the xmodal that wrote it')
  files = manifest.get('files', {})
  optional = [name for name in OPTIONAL_FUNCTIONS if name in manifest.get('functions', {})]
  required = [MODEL_CONFIG, PREPROCESS, PARAMS, TOKENIZER_SPEC, *map(function_file, (*FUNCTIONS, *optional))]
  for name in required:
    if name not in files:
      raise BundleError(f'{bundle / name}: not listed in {MANIFEST}')
  for name, entry in files.items():
    path = bundle / name
    if not path.is_file():
      raise BundleError(f'{path}: missing from the bundle')
    if path.stat().st_size != entry['bytes']:
      raise BundleError(f'{path}: {path.stat().st_size} bytes, the manifest says {entry["bytes"]} (truncated or '
                        'replaced)')
    if checksums and sha256_file(path) != entry['sha256']:
      raise BundleError(f'{path}: sha256 mismatch (the file was modified or corrupted)')
  return manifest
