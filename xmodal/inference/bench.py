"""Throughput of a bundle: indexing (images/s) and text queries (queries/s) with and without ITM re-ranking.

Synthetic inputs: random uint8 images at the bundle's image size (so preprocessing is a normalisation, no resize)
and captions assembled from a few words. Every timed phase runs once untimed first, so compilation is left out.
Queries are issued one at a time, as a search service receives them. The index keeps each image's keys and values
where the bundle can compute them, so that re-ranking runs as fast as the bundle allows.

With `compare`, re-ranking is timed in one process under the path of older bundles and indexes (full text length,
image tokens: `Reranking(False, False)`) and the default one, alternating round by round (A B A B ...) so that both
see the same machine; each rate's median, their ratio, and the largest difference between the two paths' ITM
scores of the same pairs are reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import numpy as np

from xmodal.inference.ranking import Hit
from xmodal.inference.retriever import Reranking, Retriever, check_count

OLD_PATH = Reranking(query_length=False, keys_values=False)  # what bundles and indexes from before it ran

_WORDS = ('a', 'red', 'blue', 'green', 'small', 'large', 'circle', 'square', 'triangle', 'left', 'of', 'above')


def synthetic_queries(count: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(_WORDS, size=6)) for _ in range(count)]


def _rate(count: int, fn) -> float:
  start = time.perf_counter()
  fn()
  return count / (time.perf_counter() - start)


def run(retriever: Retriever, gallery_size: int = 512, queries: int = 32, k: int = 10, rerank: int = 64,
        batch_size: int | None = None, compare: bool = False, rounds: int = 3) -> dict[str, Any]:
  """Measures index and query throughput; returns a JSON-ready dict of rates and settings (with `compare`, also
  'compare': the old and the default re-ranking's rates over `rounds` alternating rounds, their medians and ratio,
  and how far their ITM scores and rankings differ)."""
  rounds = check_count('rounds', rounds, 1)
  size = retriever.preprocess_spec['image_size']
  rng = np.random.default_rng(0)
  images = list(rng.integers(0, 256, (gallery_size, size, size, 3), dtype=np.uint8))
  batch_size = batch_size or retriever.batch_size
  keys_values = retriever.can_keep_keys_values
  # Compiles the batch shape.
  retriever.index(images[:batch_size], batch_size=batch_size, progress=False, keep_keys_values=keys_values)
  index = None

  def build():
    nonlocal index
    index = retriever.index(images, batch_size=batch_size, progress=False, keep_keys_values=keys_values)

  index_rate = _rate(gallery_size, build)
  texts = synthetic_queries(queries)
  results = {'gallery_size': gallery_size, 'queries': queries, 'k': k, 'rerank': rerank, 'batch_size': batch_size,
             'index_images_per_s': index_rate, 'keys_values': keys_values}
  search = lambda depth, count=k: [retriever.search(t, index, k=count, rerank=depth) for t in texts]
  search(0)  # compiles the query shapes
  results['queries_per_s_itc'] = _rate(queries, lambda: search(0))
  if compare:
    # Compared on every re-ranked candidate (k = rerank), timed as asked.
    results['compare'] = _compare(retriever, lambda: search(rerank, max(k, rerank)), lambda: search(rerank), queries,
                                  rounds, keys_values)
    results['queries_per_s_itc+itm'] = results['compare']['new']['median']
  else:
    search(rerank)  # compiles every length bucket the queries fall in
    results['queries_per_s_itc+itm'] = _rate(queries, lambda: search(rerank))
  results['dtype'] = retriever.manifest['dtype']
  return results


def _compare(retriever: Retriever, compared, timed, queries: int, rounds: int, kept: bool) -> dict[str, Any]:
  """Re-ranking's queries/s (`timed`) under OLD_PATH and the retriever's own settings, alternating, and how far the
  hits of `compared` differ between them; see the module docstring. `kept`: the index keeps keys and values."""
  settings = {'old': OLD_PATH, 'new': retriever.reranking}
  hits, rates = {}, {name: [] for name in settings}
  try:
    for name, setting in settings.items():  # untimed: compiles every length bucket, and gives the hits compared
      retriever.reranking = setting
      hits[name] = compared()
    for _ in range(rounds):
      for name, setting in settings.items():
        retriever.reranking = setting
        rates[name].append(_rate(queries, timed))
  finally:
    retriever.reranking = settings['new']
  # What each way did: a setting the bundle or index cannot follow is not followed (`Retriever._score_pairs`).
  out = {}
  for name, setting in settings.items():
    keys_values = setting.keys_values and kept
    out[name] = {'query_length': setting.query_length and (keys_values or retriever.match_any_length),
                 'keys_values': keys_values, 'queries_per_s': rates[name], 'median': statistics.median(rates[name])}
  out['ratio'] = out['new']['median'] / out['old']['median']
  out['max_itm_difference'], out['same_rankings'] = _differences(hits['old'], hits['new'])
  return out


def _differences(old: list[list[Hit]], new: list[list[Hit]]) -> tuple[float, bool]:
  """(largest |ITM score difference| of a pair both re-ranked, whether every query's hits come in the same order)."""
  largest = 0.0
  for old_hits, new_hits in zip(old, new):
    new_scores = {hit.index: hit.itm for hit in new_hits if hit.itm is not None}
    largest = max([largest, *(abs(hit.itm - new_scores[hit.index]) for hit in old_hits
                              if hit.itm is not None and hit.index in new_scores)])
  same = all([h.index for h in a] == [h.index for h in b] for a, b in zip(old, new))
  return largest, same
