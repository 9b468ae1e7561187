"""The safetensors format, read and written with numpy alone (bfloat16 included, which `safetensors.numpy` lacks).

8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw little-endian data.
Used by inference bundles and by the pretrained-checkpoint reader; no torch, no TensorFlow.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

# safetensors dtype names <-> numpy; bfloat16 comes from ml_dtypes (what jax uses), which safetensors.numpy lacks.
_DTYPES = {'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16), 'BF16': np.dtype(ml_dtypes.bfloat16),
           'I32': np.dtype(np.int32), 'I64': np.dtype(np.int64), 'I16': np.dtype(np.int16),
           'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_)}
_NAMES = {v: k for k, v in _DTYPES.items()}


def save_safetensors(arrays: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
  """Writes named arrays in the safetensors format (8-byte header length, JSON header, raw little-endian data)."""
  header, offset, blobs = {}, 0, []
  for name in sorted(arrays):
    array = np.asarray(arrays[name])  # not ascontiguousarray: it turns scalars into (1,)
    if array.dtype not in _NAMES:
      raise ValueError(f'{name}: dtype {array.dtype} has no safetensors name here; valid: {sorted(_NAMES.values())}')
    blob = array.astype(array.dtype.newbyteorder('<'), copy=False).tobytes()
    header[name] = {'dtype': _NAMES[array.dtype], 'shape': list(array.shape), 'data_offsets': [offset,
                                                                                              offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # the spec pads the header to 8 bytes so that data stays aligned
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for blob in blobs:
      f.write(blob)


def load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a safetensors file into {name: array}; raises ValueError naming the file on any malformed part."""
  data = pathlib.Path(path).read_bytes()
  try:
    (length,) = struct.unpack('<Q', data[:8])
    header = json.loads(data[8:8 + length])
    header.pop('__metadata__', None)
    body = memoryview(data)[8 + length:]
    arrays = {}
    for name, entry in header.items():
      dtype = _DTYPES[entry['dtype']]
      begin, end = entry['data_offsets']
      shape = tuple(entry['shape'])
      if end > len(body) or end - begin != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f'tensor {name!r} runs past the data or has the wrong size')
      arrays[name] = np.frombuffer(body[begin:end], dtype.newbyteorder('<')).astype(dtype).reshape(shape)
  except (struct.error, ValueError, KeyError, TypeError) as e:
    raise ValueError(f'{path}: not a readable safetensors file ({e})') from e
  return arrays
