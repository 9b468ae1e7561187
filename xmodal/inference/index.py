"""`Index`: a gallery's ITC embeddings and (optionally) the image tokens that ITM re-ranking needs. Plain data: the
`Retriever` makes, extends and searches it.

  index = retriever.index('photos/')          # or retriever.load_index('photos.index')
  retriever.add(index, ['new.png'])           # embeds only the new images
  index.save('photos.index')                  # a folder: index.json (names, settings) + index.npz (arrays)

On disk nothing is pickled: arrays in an .npz read with allow_pickle=False, everything else in JSON. An index
records the sha256 of the weights it was computed with; a retriever with other weights refuses it.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

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


def gallery_items(gallery: Gallery, start: int) -> tuple[list[Any], list[str]]:
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

  def __init__(self, names: list[str], embeddings: np.ndarray, tokens: np.ndarray | None, weights_sha256: str):
    self.names = names
    self.embeddings = embeddings
    self.tokens = tokens
    self.weights_sha256 = weights_sha256

  def __len__(self) -> int:
    return len(self.names)

  @property
  def keep_tokens(self) -> bool:
    return self.tokens is not None

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
  def load(cls, path: str | os.PathLike) -> Index:
    """Reads an index folder (`Retriever.load_index` also checks it against the retriever's weights)."""
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
    return cls(list(meta['names']), arrays['embeddings'], arrays.get('tokens'), meta['weights_sha256'])
