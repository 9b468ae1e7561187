"""Optional FAISS candidate search over an `Index`'s embeddings (`pip install faiss-cpu`, the 'faiss' extra).

  ann = FaissIndex.build(index.embeddings, kind='ivf')
  ann.save('photos.index')                                         # ann.faiss + ann.json beside the index's files
  ann = FaissIndex.load('photos.index', count=len(index))          # refuses an index of another size
  hits = retriever.search(query, index, k=10, rerank=64, ann=ann)  # FAISS candidates, exact ITC + ITM scores

Embeddings are unit norm, so inner product is the ITC cosine similarity. Kinds: 'flat' (exact, IndexFlatIP),
'hnsw' (graph, IndexHNSWFlat with inner product), 'ivf' (inverted lists, IndexIVFFlat; trained by k-means on the
gallery). Approximate kinds trade recall for speed; docs/search.md has the measured trade at 20k-500k.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import numpy as np

KINDS = ('flat', 'hnsw', 'ivf')
INDEX_FILE = 'ann.faiss'
META_FILE = 'ann.json'
# k-means needs a few dozen points per list to place it; more only slows training (FAISS warns below 39).
_TRAIN_POINTS_PER_LIST = 64


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('FAISS search needs faiss-cpu: pip install "xmodal[faiss]" (or faiss-cpu)') from e
  return faiss


def default_nlist(count: int) -> int:
  """IVF lists for `count` vectors: ~4·sqrt(count), the usual rule, so a list holds ~sqrt(count)/4 vectors."""
  return max(1, min(count // _TRAIN_POINTS_PER_LIST, int(4 * math.sqrt(count))))


@dataclasses.dataclass
class FaissIndex:
  """A FAISS index over (G, E) embeddings; positions are the gallery's. `params` are the build settings."""
  index: Any
  kind: str
  params: dict[str, int] = dataclasses.field(default_factory=dict)

  @classmethod
  def build(cls, embeddings: np.ndarray, kind: str = 'flat', nlist: int | None = None, nprobe: int = 16,
            hnsw_m: int = 32, ef_search: int = 64, seed: int = 0) -> FaissIndex:
    """Builds an index of kind 'flat' | 'hnsw' | 'ivf'.

    Args:
      embeddings: (G, E) unit-norm gallery embeddings (any array; read once, as float32).
      kind: 'flat' exact; 'hnsw' with hnsw_m links per node and ef_search candidates kept while searching; 'ivf' with
        nlist inverted lists (default `default_nlist(G)`) of which nprobe are scanned per query.
      seed: k-means seed and training sample (IVF), so that a rebuild is the same index.
    """
    faiss = _faiss()
    if kind not in KINDS:
      raise ValueError(f'unknown FAISS kind {kind!r}; valid: {KINDS}')
    x = np.ascontiguousarray(embeddings, np.float32)
    count, dim = x.shape
    if kind == 'flat':
      index, params = faiss.IndexFlatIP(dim), {}
    elif kind == 'hnsw':
      index, params = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT), {'hnsw_m': hnsw_m}
    else:
      nlist = nlist or default_nlist(count)
      index, params = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT), {
          'nlist': nlist}
      index.cp.seed = seed
      index.cp.spherical = True  # unit-norm centroids: inner product then picks the nearest list, as L2 would
      index.train(_training_sample(x, nlist, seed))
    index.add(x)
    ann = cls(index, kind, params)
    ann.tune(nprobe=nprobe, ef_search=ef_search)
    return ann

  def tune(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
    """Search-time settings (IVF lists scanned, HNSW candidate list): recall against speed, no rebuild."""
    if self.kind == 'ivf' and nprobe:
      self.index.nprobe = min(nprobe, self.index.nlist)
      self.params['nprobe'] = int(self.index.nprobe)
    if self.kind == 'hnsw' and ef_search:
      self.index.hnsw.efSearch = ef_search
      self.params['ef_search'] = ef_search

  def __len__(self) -> int:
    return int(self.index.ntotal)

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, E) queries → (scores (Q, k), gallery positions (Q, k)), best first; -1 marks a missing result."""
    scores, ids = self.index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, ids.astype(np.int64)

  # ------------------------------------------------------------------------------------------- on disk
  def save(self, folder: str | os.PathLike) -> pathlib.Path:
    """Writes folder/ann.faiss (FAISS's own format) and folder/ann.json (kind, settings, count)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _faiss().write_index(self.index, str(folder / INDEX_FILE))
    meta = {'kind': self.kind, 'params': self.params, 'count': len(self)}
    (folder / META_FILE).write_text(json.dumps(meta, indent=1) + '\n')
    return folder

  @classmethod
  def load(cls, folder: str | os.PathLike, count: int | None = None) -> FaissIndex:
    """Reads what `save` wrote; with `count` (the gallery's size) refuses an index built over another gallery."""
    folder = pathlib.Path(folder)
    try:
      meta = json.loads((folder / META_FILE).read_text())
      index = _faiss().read_index(str(folder / INDEX_FILE))
    except (OSError, ValueError, RuntimeError) as e:  # FAISS reports a bad file as RuntimeError
      raise ValueError(f'{folder}: no readable FAISS index ({e})') from e
    if index.ntotal != meta['count'] or (count is not None and index.ntotal != count):
      raise ValueError(f'{folder / INDEX_FILE}: holds {index.ntotal} vectors, the gallery has '
                       f'{meta["count"] if count is None else count}; rebuild it (xmodal search --ann KIND)')
    ann = cls(index, meta['kind'], dict(meta['params']))
    ann.tune(nprobe=ann.params.get('nprobe'), ef_search=ann.params.get('ef_search'))
    return ann


def _training_sample(x: np.ndarray, nlist: int, seed: int) -> np.ndarray:
  """At most _TRAIN_POINTS_PER_LIST points per list, drawn without replacement: k-means cost bounded, lists placed."""
  size = min(len(x), nlist * _TRAIN_POINTS_PER_LIST)
  if size == len(x):
    return x
  return x[np.sort(np.random.default_rng(seed).choice(len(x), size, replace=False))]
