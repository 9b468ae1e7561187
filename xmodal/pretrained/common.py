"""Reading checkpoints (safetensors or a torch pickle), finding tokenizer files, checking sizes against the model.

Nothing here imports torch or transformers at module level: safetensors is read with its numpy API, and a
`pytorch_model.bin` pickle is read with torch only when torch is installed (imported inside the function).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable

import ml_dtypes  # noqa: F401  registers 'bfloat16' with numpy: safetensors.numpy looks bfloat16 up by name
import numpy as np
import safetensors.numpy

from xmodal.models.model import ModelSpec

# Weight files in the order they are preferred: safetensors cannot run code on load; a pickle can.
_WEIGHT_FILES = ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin')
# Tokenizer files in the order they are preferred: tokenizer.json carries its normaliser (lower-casing, accents),
# vocab.txt only the WordPiece vocabulary.
_TOKENIZER_FILES = ('tokenizer.json', 'vocab.txt', 'spiece.model', 'sentencepiece.bpe.model')
# Keys under which training scripts nest a state dict inside the pickle they save.
_NESTED_STATE_KEYS = ('model', 'state_dict', 'module')


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded into this model; the message says what differs and what to change."""


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint's config.json (empty when it has none) and its tensors, named as in the file."""
  path: pathlib.Path
  config: dict
  tensors: dict[str, np.ndarray]


def read_checkpoint(path: str | pathlib.Path) -> Checkpoint:
  """Reads a Hugging Face directory (config.json + weights) or a single weight file.

  Args:
    path: a directory holding config.json and model.safetensors (or a sharded index, or pytorch_model.bin), or a
      .safetensors / .bin / .pth / .pt file (its directory's config.json is read if there is one).

  Returns:
    The checkpoint with every tensor as a numpy array (bfloat16 as `ml_dtypes.bfloat16`).
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f'checkpoint path {str(path)!r} does not exist')
  if path.is_dir():
    found = [path / name for name in _WEIGHT_FILES if (path / name).is_file()]
    if not found:
      raise FileNotFoundError(f'checkpoint directory {str(path)!r} holds none of {list(_WEIGHT_FILES)}')
    weights, config_file = found[0], path / 'config.json'
  else:
    weights, config_file = path, path.parent / 'config.json'
  config = json.loads(config_file.read_text()) if config_file.is_file() else {}
  return Checkpoint(path=path, config=config, tensors=_read_weights(weights))


def _read_weights(file: pathlib.Path) -> dict[str, np.ndarray]:
  if file.name.endswith('.index.json'):
    shards = sorted(set(json.loads(file.read_text())['weight_map'].values()))
    return {k: v for shard in shards for k, v in _read_safetensors(file.parent / shard).items()}
  if file.suffix == '.safetensors':
    return _read_safetensors(file)
  return _read_torch_pickle(file)


def _read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
  return safetensors.numpy.load_file(str(file))  # bfloat16 tensors come back as ml_dtypes.bfloat16


def _read_torch_pickle(file: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # Only for pickled checkpoints; xmodal itself never needs torch.
  except ImportError as e:
    raise CheckpointError(f'{str(file)!r} is a torch pickle and torch is not installed: install torch, or convert '
                          'the checkpoint to model.safetensors') from e
  state = torch.load(file, map_location='cpu', weights_only=True)
  if isinstance(state, dict):
    for key in _NESTED_STATE_KEYS:
      if isinstance(state.get(key), dict):
        state = state[key]
        break
  out = {}
  for name, tensor in state.items():
    if not isinstance(tensor, torch.Tensor):
      continue
    # numpy has no bfloat16: widen it (the model's parameters are float32 anyway).
    tensor = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
    out[name] = tensor.detach().cpu().numpy()
  return out


def find_tokenizer(path: str | pathlib.Path | None) -> str | None:
  """The tokenizer file of a checkpoint directory (tokenizer.json, else vocab.txt, else a sentencepiece model)."""
  if not path:
    return None
  directory = pathlib.Path(path)
  directory = directory if directory.is_dir() else directory.parent
  for name in _TOKENIZER_FILES:
    if (directory / name).is_file():
      return str(directory / name)
  return None


def find_prefix(names: Iterable[str], anchor: str) -> str:
  """The prefix before `anchor` in the one tensor name ending with it ('bert.', 'vit.', '' ...).

  Checkpoints nest a tower under a task head ('bert.' in BertForMaskedLM, 'deit.' in DeiTForImageClassification,
  'visual_encoder.' in ALBEF); finding the prefix from one known tensor handles them all.
  """
  hits = sorted(n[:-len(anchor)] for n in names if n.endswith(anchor) and (n == anchor or n[-len(anchor) - 1] == '.'))
  if len(hits) != 1:
    raise CheckpointError(f'expected exactly one tensor named "*{anchor}", found {len(hits)}: {hits[:5]}')
  return hits[0]


@dataclasses.dataclass(frozen=True)
class Field:
  """A checkpoint config value that a model config field must equal."""
  checkpoint_key: str  # key in the checkpoint's config.json (or how the value was read)
  model_key: str  # dotted key under the `model` config section, e.g. 'text.width'
  value: object


def model_value(spec: ModelSpec, model_key: str) -> object:
  """`spec`'s value for a dotted model-config key such as 'vision.patch_size'."""
  node = spec
  for part in model_key.split('.'):
    node = getattr(node, part)
  return node


def check_fields(fields: Iterable[Field], spec: ModelSpec, source: pathlib.Path, what: str) -> None:
  """Raises one CheckpointError listing every field whose checkpoint value differs from the model config's."""
  wrong = [f for f in fields if model_value(spec, f.model_key) != f.value]
  if wrong:
    lines = [f'  checkpoint {f.checkpoint_key}={f.value!r} but model.{f.model_key}={model_value(spec, f.model_key)!r}'
             for f in wrong]
    fix = ' '.join(f'--config.model.{f.model_key}={f.value}' for f in wrong)
    raise CheckpointError(f'{what} checkpoint {str(source)!r} does not match the model config:\n' + '\n'.join(lines)
                          + f'\nchoose a preset that matches, or set: {fix}')


def require(config: dict, key: str, allowed: tuple, source: pathlib.Path, what: str, default=None) -> None:
  """Raises unless the checkpoint config's `key` (or `default` when absent) is one of `allowed`."""
  value = config.get(key, default)
  if value not in allowed:
    raise CheckpointError(f'{what} checkpoint {str(source)!r} has {key}={value!r}; xmodal supports {list(allowed)}')
