"""`Index`: a gallery's ITC embeddings and (optionally) the image tokens that ITM re-ranking needs.

  index = retriever.index('photos/')          # or Index.load('photos.index', retriever)
  index.add(['new.png'])                      # embeds only the new images
  index.save('photos.index')                  # a folder: index.json (names, settings) + index.npz (arrays)

On disk nothing is pickled: arrays in an .npz read with allow_pickle=False, everything else in JSON. An index
records the sha256 of the weights it was computed with and refuses a retriever with other weights.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:
  from xmodal.inference.retriever import Retriever

FORMAT = 'xmodal-index'
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif')

Gallery = Union[str, os.PathLike, Sequence[Union[str, os.PathLike, np.ndarray]]]


def list_images(folder: str | os.PathLike) -> list[str]:
  """Image files under `folder` (recursively, by extension), sorted by path."""
  folder = pathlib.Path(folder)
  if not folder.is_dir():
    raise NotADirectoryError(f'{folder}: not a folder of images')
  return sorted(str(p) for p in folder.rglob('*') if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _gallery_items(gallery: Gallery, start: int) -> tuple[list[Any], list[str]]:
  """(images to embed, their names): paths keep their path, arrays are named 'array:<position in the index>'."""
  if isinstance(gallery, (str, os.PathLike)):
    items = list_images(gallery)
    if not items:
      raise ValueError(f'{gallery}: no images ({", ".join(IMAGE_EXTENSIONS)})')
  else:  # a sequence of paths and/or (H, W, 3) arrays, or one (N, H, W, 3) array
    items = list(gallery)
  names = [f'array:{start + i}' if isinstance(x, np.ndarray) else str(x) for i, x in enumerate(items)]
  return items, names


class Index:
  """Gallery embeddings (G, E), names (G,) and, with keep_tokens, image tokens (G, 1+N, Dv), all float32.

  Without kept tokens, re-ranking recomputes the image tokens of the candidates from their paths: an index then
  costs E floats per image instead of (1+N) x Dv, for one image-tower pass per re-ranked candidate.
  """

  def __init__(self, names: list[str], embeddings: np.ndarray, tokens: np.ndarray | None, weights_sha256: str,
               retriever: Retriever | None = None):
    self.names = names
    self.embeddings = embeddings
    self.tokens = tokens
    self.weights_sha256 = weights_sha256
    self.retriever = retriever

  @classmethod
  def empty(cls, retriever: Retriever, keep_tokens: bool = True) -> Index:
    dim = int(retriever.manifest['embed_dim'])
    tokens_shape = retriever.manifest['functions']['encode_image']['outputs'][0]['shape']
    tokens = np.zeros((0, *tokens_shape[1:]), np.float32) if keep_tokens else None
    return cls([], np.zeros((0, dim), np.float32), tokens, retriever.weights_sha256, retriever)

  def __len__(self) -> int:
    return len(self.names)

  @property
  def keep_tokens(self) -> bool:
    return self.tokens is not None

  def check_compatible(self, retriever: Retriever) -> None:
    if retriever.weights_sha256 != self.weights_sha256:
      raise ValueError(f'this index was computed with weights {self.weights_sha256[:12]}…, the retriever holds '
                       f'{retriever.weights_sha256[:12]}… ({retriever.path}); rebuild the index')

  def _retriever(self) -> Retriever:
    if self.retriever is None:
      raise ValueError('this index has no retriever: pass one to Index.load(path, retriever)')
    self.check_compatible(self.retriever)
    return self.retriever

  def add(self, gallery: Gallery, batch_size: int | None = None, progress: bool = False) -> Index:
    """Embeds more images and appends them; existing entries are kept as they are. Returns self."""
    items, names = _gallery_items(gallery, len(self))
    if not self.keep_tokens and any(isinstance(x, np.ndarray) for x in items):
      raise ValueError('an index without kept tokens recomputes them from paths; arrays need keep_tokens=True')
    if not items:
      return self
    emb, tokens = self._retriever().embed_gallery(items, batch_size=batch_size, progress=progress)
    self.names = self.names + names
    self.embeddings = np.concatenate([self.embeddings, emb])
    if self.keep_tokens:
      self.tokens = np.concatenate([self.tokens, tokens])
    return self

  def image_tokens(self, positions: np.ndarray) -> np.ndarray:
    """Image tokens (P, 1+N, Dv) of gallery positions (P,): kept ones, or recomputed once per distinct image."""
    positions = np.asarray(positions)
    if self.keep_tokens:
      return self.tokens[positions]
    unique, inverse = np.unique(positions, return_inverse=True)
    _, tokens = self._retriever().encode_images([self.names[i] for i in unique])
    return tokens[inverse]

  def search(self, query: str | Sequence[str], k: int = 10, rerank: int = 64, ann: Any = None):
    """`Retriever.search` over this index."""
    return self._retriever().search(query, self, k=k, rerank=rerank, ann=ann)

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the folder `path` with index.json and index.npz (replacing an index already there)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    arrays = {'embeddings': self.embeddings}
    if self.keep_tokens:
      arrays['tokens'] = self.tokens
    np.savez(path / 'index.npz', **arrays)
    meta = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'weights_sha256': self.weights_sha256,
            'count': len(self), 'keep_tokens': self.keep_tokens, 'names': self.names}
    (path / 'index.json').write_text(json.dumps(meta, indent=1) + '\n')
    return path

  @classmethod
  def load(cls, path: str | os.PathLike, retriever: Retriever | None = None) -> Index:
    """Reads an index folder; with a retriever, checks that it holds the weights the index was computed with."""
    path = pathlib.Path(path)
    try:
      meta = json.loads((path / 'index.json').read_text())
      with np.load(path / 'index.npz', allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
      raise ValueError(f'{path}: not a readable index ({e})') from e
    if meta.get('format') != FORMAT or meta.get('format_version') != FORMAT_VERSION:
      raise ValueError(f'{path / "index.json"}: not a version-{FORMAT_VERSION} {FORMAT}')
    if len(meta['names']) != arrays['embeddings'].shape[0]:
      raise ValueError(f'{path}: {len(meta["names"])} names for {arrays["embeddings"].shape[0]} embeddings')
    index = cls(list(meta['names']), arrays['embeddings'], arrays.get('tokens'), meta['weights_sha256'], retriever)
    if retriever is not None:
      index.check_compatible(retriever)
    return index
