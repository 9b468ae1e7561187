"""Throughput of a bundle: indexing (images/s) and text queries (queries/s) with and without ITM re-ranking.

Synthetic inputs: random uint8 images at the bundle's image size (so preprocessing is a normalisation, no resize)
and captions assembled from a few words. Every timed phase runs once untimed first, so compilation is left out.
Queries are issued one at a time, as a search service receives them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from xmodal.inference.retriever import Retriever

_WORDS = ('a', 'red', 'blue', 'green', 'small', 'large', 'circle', 'square', 'triangle', 'left', 'of', 'above')


def synthetic_queries(count: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(_WORDS, size=6)) for _ in range(count)]


def _rate(count: int, fn) -> float:
  start = time.perf_counter()
  fn()
  return count / (time.perf_counter() - start)


def run(retriever: Retriever, gallery_size: int = 512, queries: int = 32, k: int = 10, rerank: int = 64,
        batch_size: int | None = None) -> dict[str, Any]:
  """Measures index and query throughput; returns a JSON-ready dict of rates and settings."""
  size = retriever.preprocess_spec['image_size']
  rng = np.random.default_rng(0)
  images = list(rng.integers(0, 256, (gallery_size, size, size, 3), dtype=np.uint8))
  batch_size = batch_size or retriever.batch_size
  retriever.index(images[:batch_size], batch_size=batch_size, progress=False)  # compiles the batch shape
  index = None

  def build():
    nonlocal index
    index = retriever.index(images, batch_size=batch_size, progress=False)

  index_rate = _rate(gallery_size, build)
  texts = synthetic_queries(queries)
  results = {'gallery_size': gallery_size, 'queries': queries, 'k': k, 'rerank': rerank, 'batch_size': batch_size,
             'index_images_per_s': index_rate}
  for name, depth in (('itc', 0), ('itc+itm', rerank)):
    retriever.search(texts[0], index, k=k, rerank=depth)  # compiles the query and re-ranking shapes
    results[f'queries_per_s_{name}'] = _rate(queries, lambda d=depth: [retriever.search(t, index, k=k, rerank=d)
                                                                       for t in texts])
  results['dtype'] = retriever.manifest['dtype']
  return results
