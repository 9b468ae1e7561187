"""Optional FAISS candidate search over an `Index`'s embeddings (`pip install faiss-cpu`, the 'faiss' extra).

  ann = FaissIndex.build(index.embeddings, kind='hnsw')
  hits = retriever.search(query, index, k=10, rerank=64, ann=ann)   # FAISS candidates, exact ITC + ITM scores

Embeddings are unit norm, so inner product is the ITC cosine similarity. Kinds: 'flat' (exact, IndexFlatIP),
'hnsw' (graph, IndexHNSWFlat with inner product), 'ivf' (inverted lists, IndexIVFFlat; needs >= nlist vectors to
train). Approximate kinds trade recall for speed on large galleries; in-process exact search is fine to ~10^6.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ('flat', 'hnsw', 'ivf')


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('FAISS search needs faiss-cpu: pip install "xmodal[faiss]" (or faiss-cpu)') from e
  return faiss


@dataclasses.dataclass
class FaissIndex:
  """A FAISS index over (G, E) embeddings; positions are the gallery's."""
  index: Any
  kind: str

  @classmethod
  def build(cls, embeddings: np.ndarray, kind: str = 'flat', nlist: int = 16, nprobe: int = 4, hnsw_m: int = 16,
            ef_search: int = 32) -> FaissIndex:
    """Builds an index of kind 'flat' | 'hnsw' | 'ivf' (nlist lists, nprobe searched; hnsw_m links, ef_search)."""
    faiss = _faiss()
    if kind not in KINDS:
      raise ValueError(f'unknown FAISS kind {kind!r}; valid: {KINDS}')
    x = np.ascontiguousarray(embeddings, np.float32)
    dim = x.shape[1]
    if kind == 'flat':
      index = faiss.IndexFlatIP(dim)
    elif kind == 'hnsw':
      index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
      index.hnsw.efSearch = ef_search
    else:
      index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
      index.train(x)
      index.nprobe = nprobe
    index.add(x)
    return cls(index, kind)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, E) queries → (scores (Q, k), gallery positions (Q, k)), best first; -1 marks a missing result."""
    scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, ids.astype(np.int64)
