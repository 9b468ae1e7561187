"""The evaluation image preprocessing of `xmodal.data.preprocess.eval_image`, with PIL and numpy (no TensorFlow).

  decode → RGB uint8 → shorter side to image_size (bilinear, antialiased) → center crop → (pixel - mean) / std

The spec travels in the bundle (preprocess.json, see xmodal.bundle.format) so that a bundle carries how its images
must be prepared; this module is the reader that implements it.
"""

from __future__ import annotations

import hashlib
import io
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from xmodal.bundle.format import CROP, RESIZE

ImageLike = Union[str, os.PathLike, np.ndarray]


class UnreadableImage(ValueError):
  """An image file that cannot be read or decoded; the message starts with its path."""

  def __init__(self, path: str | os.PathLike, reason: str):
    super().__init__(f'{path}: unreadable image ({reason})')
    self.path = str(path)
    self.reason = reason


def load_rgb(image: ImageLike) -> np.ndarray:
  """A path (any format PIL reads) or an array → uint8 (H, W, 3). Grey (H, W) arrays are repeated to 3 channels.

  Alpha is dropped, not composited, like tf.io.decode_image(channels=3). Raises UnreadableImage for a file that is
  missing, empty, not an image or truncated.
  """
  if isinstance(image, np.ndarray):
    array = image
    if array.ndim == 2:
      array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4) or array.dtype != np.uint8:
      raise ValueError(f'image arrays must be uint8 (H, W, 3); got {array.dtype} {array.shape}')
    return np.ascontiguousarray(array[:, :, :3])
  return read_image(image)[0]


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, str]:
  """A file → (uint8 (H, W, 3), sha256 of its bytes): the file is read once for both. Raises UnreadableImage."""
  try:
    data = pathlib.Path(path).read_bytes()
  except OSError as e:
    raise UnreadableImage(path, e.strerror or str(e)) from e
  if not data:
    raise UnreadableImage(path, 'empty file')
  try:
    with Image.open(io.BytesIO(data)) as pil:
      rgb = np.asarray(pil.convert('RGB'), np.uint8)  # convert() decodes: a truncated file fails here
  except UnidentifiedImageError as e:
    raise UnreadableImage(path, 'not an image format PIL can read') from e
  # PIL reports a damaged file as any of these, depending on where in the decoder it notices.
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise UnreadableImage(path, str(e) or type(e).__name__) from e
  return rgb, hashlib.sha256(data).hexdigest()


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(h, w) after scaling the shorter side to `size`, rounded as TF does (float32, half to even), at least size."""
  scale = np.float32(size) / np.float32(min(height, width))
  shape = np.round(np.array([height, width], np.float32) * scale).astype(np.int64)
  return int(max(shape[0], size)), int(max(shape[1], size))


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bilinear, antialiased when shrinking (PIL widens its triangle filter like TF's antialias): float32 (h, w, 3).

  Channels go through PIL's float mode one by one, so no intermediate rounding to uint8.
  """
  if image.shape[:2] == (height, width):
    return image.astype(np.float32)
  channels = [np.asarray(Image.fromarray(np.ascontiguousarray(image[:, :, c], np.float32), mode='F').resize(
      (width, height), Image.Resampling.BILINEAR)) for c in range(3)]
  return np.stack(channels, axis=-1)


def preprocess(image: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
  """uint8 (H, W, 3) → normalised float32 (S, S, 3), S = spec['image_size'], as eval_image prepares it."""
  if spec.get('resize') != RESIZE or spec.get('crop') != CROP:
    raise ValueError(f'unsupported preprocessing {spec.get("resize")!r}/{spec.get("crop")!r}; this reader knows '
                     f'{RESIZE!r}/{CROP!r}')
  size = spec['image_size']
  height, width = resized_shape(image.shape[0], image.shape[1], size)
  resized = _resize(image, height, width)
  top, left = (height - size) // 2, (width - size) // 2
  crop = resized[top:top + size, left:left + size]
  return (crop - np.asarray(spec['mean'], np.float32)) / np.asarray(spec['std'], np.float32)


def preprocess_batch(images: Sequence[ImageLike], spec: dict[str, Any]) -> np.ndarray:
  """Paths or uint8 arrays → float32 (B, S, S, 3)."""
  size = spec['image_size']
  out = np.empty((len(images), size, size, 3), np.float32)
  for i, image in enumerate(images):
    out[i] = preprocess(load_rgb(image), spec)
  return out
