"""Pure ranking: exact ITC top-k and ITM re-ranking of the first candidates (the ALBEF search protocol).

For each query the candidates are the gallery items with the highest ITC similarity; the first `rerank` of them are
scored by the fusion encoder (ITM logit of "match") and placed first in that order, the rest follow by ITC. numpy
only, so that it runs wherever a bundle does. `top_k` and `text_lengths` are also the evaluation's
(xmodal.evaluation.rerank): search and the recalls it is measured by choose their candidates, and the lengths ITM runs
at, with one function each.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

# (query indices (P,), gallery indices (P,)) -> ITM scores (P,) of those pairs.
PairScorer = Callable[[np.ndarray, np.ndarray], np.ndarray]

_ROWS_PER_STEP = 1024  # rows per argpartition: bounds the transposed copy that a block of columns needs

# Texts are cut to their length rounded up to a multiple of this: few lengths, so few compiled programs.
LENGTH_MULTIPLE = 8


@dataclasses.dataclass(frozen=True)
class Hit:
  """One result: gallery position, its name (path) and scores; `itm` is None when it was not re-ranked."""
  index: int
  name: str
  itc: float
  itm: float | None


def top_k(scores: np.ndarray, k: int, axis: int = 1) -> np.ndarray:
  """Indices of the k highest scores of each row (axis=1) or of each column (axis=0), best first.

  Args:
    scores: (R, C), e.g. (queries, gallery) similarities.
    k: capped at the length of `axis`.
    axis: 1 -> (R, k) column indices per row; 0 -> (C, k) row indices per column.

  Equal scores are listed lower index first. Which of several items tied at the k-th place make the cut is numpy's
  selection: deterministic for a given matrix, not by index.
  """
  scores = np.asarray(scores)
  lines = scores.shape[1 - axis]
  k = min(k, scores.shape[axis])
  out = np.empty((lines, k), np.int64)
  for start in range(0, lines, _ROWS_PER_STEP):
    part = slice(start, start + _ROWS_PER_STEP)
    # Columns are transposed one block at a time: a whole (I, T) transpose is slow and doubles the memory.
    out[part] = _top_k_of_rows(scores[part] if axis == 1 else np.ascontiguousarray(scores[:, part].T), k)
  return out


def _top_k_of_rows(scores: np.ndarray, k: int) -> np.ndarray:
  """(R, C) scores → (R, k) column indices, best first, k <= C."""
  if k == 0:
    return np.zeros((scores.shape[0], 0), np.int64)
  part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1] else np.tile(
      np.arange(scores.shape[1]), (scores.shape[0], 1))
  picked = np.take_along_axis(scores, part, axis=1)
  # lexsort's last key is the primary one: score descending, then index ascending.
  order = np.lexsort((part, -picked), axis=1)
  return np.take_along_axis(part, order, axis=1)


def text_lengths(text_mask: np.ndarray, multiple: int = LENGTH_MULTIPLE) -> np.ndarray:
  """(T, L) mask -> (T,) int: each text's last unmasked position + 1, rounded up to `multiple` and at most L.

  The fusion encoder's [CLS] does not read the tokens past a text's mask (padding keys are masked, the word window
  looks back only), so ITM may run on texts cut to this length: the same scores up to the arithmetic's order.
  """
  mask = np.asarray(text_mask) != 0
  full = mask.shape[1]
  last = np.where(mask.any(axis=1), full - np.argmax(mask[:, ::-1], axis=1), 1)
  return np.minimum(-(-last // multiple) * multiple, full)


def score_candidates(query_emb: np.ndarray, embeddings: np.ndarray,
                     candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Exact ITC scores of each query's candidates, and the candidates re-ordered by them.

  Args:
    query_emb: (Q, E) unit-norm query embeddings.
    embeddings: (G, E) gallery embeddings; only the candidates' rows are read (`embeddings[ids]`), so a memory-mapped
      array costs O(Q·C) rows, never O(G).
    candidates: (Q, C) gallery positions from any generator (exact top-k, FAISS, Milvus); -1 marks a missing one.

  Returns:
    (scores (Q, C) float32, candidates (Q, C)): best first, equal scores lower position first, missing ones last
    with score -inf. Every generator's candidates are scored and ordered by this one computation, so an exact ANN
    returns exactly what exact search does, and an approximate one (quantized distances) still reports cosines.
  """
  candidates = np.asarray(candidates, np.int64)
  valid = candidates >= 0
  rows = np.asarray(embeddings[np.where(valid, candidates, 0).ravel()], np.float32)
  scores = np.einsum('qe,qce->qc', np.asarray(query_emb, np.float32),
                     rows.reshape(*candidates.shape, -1)).astype(np.float32)
  scores[~valid] = -np.inf
  # lexsort's last key is the primary one: score descending, then position ascending (missing ones at the end).
  order = np.lexsort((np.where(valid, candidates, np.iinfo(np.int64).max), -scores), axis=1)
  return np.take_along_axis(scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def rank(scores: np.ndarray, candidates: np.ndarray, k: int, rerank: int,
         scorer: PairScorer | None) -> list[list[tuple[int, float, float | None]]]:
  """Final ranking of each query's candidates.

  Args:
    scores: (Q, C) ITC similarities of the candidates, `scores[q, j]` that of `candidates[q, j]`.
    candidates: (Q, C) gallery indices in ITC order, C >= min(k, G); -1 marks a missing one (skipped).
    k: results per query.
    rerank: how many of the first candidates the fusion encoder re-ranks (0 = ITC only).
    scorer: scores (query, gallery) pairs; needed when rerank > 0.

  Returns:
    Per query, up to k (gallery index, itc, itm or None) tuples, best first.
  """
  num_queries, num_candidates = candidates.shape
  rerank = min(rerank, num_candidates)
  itm = np.full((num_queries, rerank), np.nan, np.float32)
  valid = candidates[:, :rerank] >= 0  # an approximate index marks missing results with -1
  if rerank > 0 and valid.any():
    queries = np.repeat(np.arange(num_queries), rerank).reshape(num_queries, rerank)
    itm[valid] = scorer(queries[valid], candidates[:, :rerank][valid])
  results = []
  for q in range(num_queries):
    head = [(int(g), float(s), float(m)) for g, s, m in zip(candidates[q, :rerank], scores[q], itm[q]) if g >= 0]
    # Stable sort: equal ITM scores keep their ITC order.
    head.sort(key=lambda h: -h[2])
    tail = [(int(g), float(s), None) for g, s in zip(candidates[q, rerank:], scores[q, rerank:]) if g >= 0]
    results.append((head + tail)[:k])
  return results
