"""Embedding an evaluation split: image and text tokens and embeddings, once per item, padding dropped.

Evaluation batches (host numpy, one per step):
  'images'     (B, H, W, 3) float32, normalised
  'text_ids'   (B, C, L) int, C captions per image, padded
  'text_mask'  (B, C, L)
  'text_valid' (B, C) bool, False for padded captions
  'valid'      (B,) bool, False for the padding examples of the last batch
  'image_ids'  (B,) int, the dataset's image id (kept for reference)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from xmodal.models.model import XModal
from xmodal.sharding import BATCH_AXES, batch_sharding


@dataclasses.dataclass(frozen=True)
class Texts:
  """Texts through the text tower: tokens (T, L, Dt), mask (T, L), emb (T, E) unit norm."""
  tokens: np.ndarray
  mask: np.ndarray
  emb: np.ndarray


@dataclasses.dataclass(frozen=True)
class Embedded:
  """A split through both towers, host numpy, padding dropped.

  image_emb (I, E), image_tokens (I, 1+N, Dv), image_ids (I,), text_emb (T, E), text_tokens (T, L, Dt),
  text_mask (T, L), text_to_image (T,) int: the row of `image_emb` each text describes (not the dataset's image id).
  """
  image_emb: np.ndarray
  image_tokens: np.ndarray
  image_ids: np.ndarray
  text_emb: np.ndarray
  text_tokens: np.ndarray
  text_mask: np.ndarray
  text_to_image: np.ndarray

  @property
  def texts(self) -> Texts:
    return Texts(self.text_tokens, self.text_mask, self.text_emb)


def embed_dataset(model: XModal, variables, batches: Iterable[Mapping[str, np.ndarray]],
                  mesh: Mesh | None = None) -> Embedded:
  """Runs both towers over evaluation batches (module docstring) and keeps the valid images and captions.

  Args:
    model: the XModal module.
    variables: its variables, as they are: uncommitted, or placed on the mesh's devices (replicated or sharded, as
      training leaves them); jit follows their placement.
    batches: an iterable of evaluation batches, all of one shape (one compilation per tower).
    mesh: optional mesh with axes ('data', 'fsdp', 'tensor'); each batch is split over ('data', 'fsdp'), so B must
      divide by their product. The result equals the single-device one.

  Returns:
    The `Embedded` split, in batch order.
  """
  encode_image, encode_text = _jitted_encoders(model)
  put = (lambda x: x) if mesh is None else _sharded_put(mesh)
  parts = {k: [] for k in ('image_emb', 'image_tokens', 'image_ids', 'text_emb', 'text_tokens', 'text_mask',
                           'text_to_image')}
  num_images = 0
  for batch in batches:
    valid = np.asarray(batch['valid'], bool)
    text_valid = np.asarray(batch['text_valid'], bool) & valid[:, None]  # (B, C)
    ids, mask = np.asarray(batch['text_ids']), np.asarray(batch['text_mask'])
    b, c, length = ids.shape
    image_tokens, image_emb = encode_image(variables, put(np.asarray(batch['images'])))
    # Captions flattened image-major: row b * C + c is caption c of image b.
    text_tokens, text_emb = encode_text(variables, put(ids.reshape(b * c, length)), put(mask.reshape(b * c, length)))
    keep_text = text_valid.reshape(-1)
    parts['image_tokens'].append(np.asarray(image_tokens)[valid])
    parts['image_emb'].append(np.asarray(image_emb)[valid])
    parts['image_ids'].append(np.asarray(batch['image_ids'])[valid])
    parts['text_tokens'].append(np.asarray(text_tokens)[keep_text])
    parts['text_emb'].append(np.asarray(text_emb)[keep_text])
    parts['text_mask'].append(mask.reshape(b * c, length)[keep_text])
    # Row of each valid image among the valid images so far: padding images take no row.
    image_row = num_images + np.cumsum(valid) - 1
    parts['text_to_image'].append(np.repeat(image_row, c)[keep_text])
    num_images += int(valid.sum())
  if not parts['image_emb']:
    raise ValueError('embed_dataset got no batches')
  return Embedded(**{k: np.concatenate(v) for k, v in parts.items()})


@functools.lru_cache(maxsize=4)
def _jitted_encoders(model: XModal):
  # One pair of jitted towers per model (modules hash by their fields): a run that evaluates every N steps compiles
  # them once.
  return (jax.jit(lambda v, x: model.apply(v, x, method=XModal.encode_image)),
          jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=XModal.encode_text)))


def _sharded_put(mesh: Mesh):
  sharding = batch_sharding(mesh)
  shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

  def put(x: np.ndarray) -> jax.Array:
    if x.shape[0] % shards:
      raise ValueError(f'batch of {x.shape[0]} does not split over the {shards} devices of mesh axes {BATCH_AXES}; '
                       f'use an evaluation batch size divisible by {shards}')
    # Each process hands in its own rows; with one process that is the whole batch.
    return jax.make_array_from_process_local_data(sharding, x)

  return put
