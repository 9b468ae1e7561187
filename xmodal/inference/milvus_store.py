"""A gallery persisted in Milvus (`pip install "xmodal[milvus]"`): Milvus Lite in a local file by default, a Milvus
server or cluster by URI with no code change.

  save_gallery('photos.milvus', index)                         # Milvus Lite: photos.milvus/gallery.db
  save_gallery('photos.milvus', index, uri='http://host:19530') # a Milvus server: the vectors live there
  index, store = open_gallery('photos.milvus')                  # in any later process
  hits = retriever.search(query, index, k=10, rerank=64, ann=store)

Milvus stores and searches the embeddings (position → vector). ITM re-ranking needs each candidate's image tokens,
which Milvus does not hold: they go to a side store in the gallery folder, `tokens.npy`, opened memory-mapped so that
a query reads only its candidates' rows (float16 halves it; docs/search.md compares it with float32). The folder also
keeps the names, settings, and `embeddings.npy` (E floats per image, memory-mapped too): every candidate generator's
candidates are scored by one exact computation (`ranking.score_candidates`), whatever index Milvus runs.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from xmodal.inference.index import TOKENS_DTYPES, Index, TokenWriter

META_FILE = 'milvus.json'
LITE_FILE = 'gallery.db'
EMBEDDINGS_FILE = 'embeddings.npy'
TOKENS_FILE = 'tokens.npy'
COLLECTION = 'xmodal_gallery'
_INSERT_ROWS = 4096  # rows per insert: a request stays far below gRPC's message limit at any embedding size


def _pymilvus():
  try:
    import pymilvus  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError('Milvus search needs pymilvus (and milvus-lite for a local file): pip install "xmodal[milvus]"'
                      ) from e
  return pymilvus


class MilvusStore:
  """Embeddings in a Milvus collection, ids = gallery positions; a candidate generator for `Retriever.search`."""

  def __init__(self, client: Any, collection: str = COLLECTION, uri: str = ''):
    self.client = client
    self.collection = collection
    self.uri = uri

  @classmethod
  def connect(cls, uri: str, collection: str = COLLECTION, token: str = '') -> MilvusStore:
    """A path ending in .db is Milvus Lite (embedded, started by pymilvus); anything else a server URI."""
    return cls(_pymilvus().MilvusClient(uri=str(uri), token=token), collection, str(uri))

  def close(self) -> None:
    """Closes the connection; for Milvus Lite also stops the embedded server, which holds the .db file until then
    (another process can open the gallery only after this, or after this process exits)."""
    self.client.close()
    if self.uri.endswith('.db'):
      from milvus_lite.server_manager import server_manager_instance  # pylint: disable=g-import-not-at-top
      server_manager_instance.release_server(self.uri)

  def create(self, dim: int, index_type: str = 'FLAT', index_params: dict[str, Any] | None = None) -> None:
    """Creates the collection (replacing one of that name): int64 id = position, float vector, inner product.

    'FLAT' is exact (the in-memory index's results); 'HNSW' / 'IVF_FLAT' with `index_params` (e.g. {'M': 32,
    'efConstruction': 200}) for galleries where a scan is too slow.
    """
    pymilvus = _pymilvus()
    if self.client.has_collection(self.collection):
      self.client.drop_collection(self.collection)
    schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field('id', pymilvus.DataType.INT64, is_primary=True)
    schema.add_field('vector', pymilvus.DataType.FLOAT_VECTOR, dim=dim)
    params = self.client.prepare_index_params()
    params.add_index(field_name='vector', index_type=index_type, metric_type='IP', params=index_params or {})
    self.client.create_collection(self.collection, schema=schema, index_params=params)

  def insert(self, embeddings: np.ndarray, start: int = 0) -> None:
    """Stores (N, E) embeddings as positions start..start+N-1, a bounded batch at a time."""
    for offset in range(0, len(embeddings), _INSERT_ROWS):
      rows = np.asarray(embeddings[offset:offset + _INSERT_ROWS], np.float32)
      self.client.insert(self.collection, [{'id': start + offset + i, 'vector': v.tolist()}
                                           for i, v in enumerate(rows)])

  def load(self) -> None:
    """Milvus searches only a loaded collection (held in the server's memory); a reopened one starts released."""
    self.client.load_collection(self.collection)

  def __len__(self) -> int:
    return int(self.client.get_collection_stats(self.collection)['row_count'])

  def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, E) queries → (scores (Q, k), gallery positions (Q, k)), best first; -1 pads a short result."""
    queries = np.asarray(queries, np.float32)
    results = self.client.search(self.collection, data=[q.tolist() for q in queries], limit=k,
                                 anns_field='vector', search_params={'metric_type': 'IP'}, output_fields=['id'])
    scores = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    for q, row in enumerate(results):
      for j, hit in enumerate(row[:k]):
        ids[q, j], scores[q, j] = hit['id'], hit['distance']
    return scores, ids


def save_gallery(folder: str | os.PathLike, index: Index, uri: str | None = None, collection: str = COLLECTION,
                 token_dtype: str = 'float16', index_type: str = 'FLAT',
                 index_params: dict[str, Any] | None = None) -> MilvusStore:
  """Writes `index` to Milvus (default: Milvus Lite at folder/gallery.db) and its side store to `folder`.

  Args:
    folder: created if needed; holds milvus.json, embeddings.npy, tokens.npy (and gallery.db for Milvus Lite).
    index: an index with kept tokens (re-ranking reads them from the side store).
    uri: a Milvus server ('http://host:19530') or another .db path; the folder records it for `open_gallery`.
    token_dtype: 'float16' (half the disk; ITM scores within ~1e-2 of float32) or 'float32'.
    index_type, index_params: Milvus's vector index (`MilvusStore.create`).
  """
  if token_dtype not in TOKENS_DTYPES:
    raise ValueError(f'token_dtype {token_dtype!r}; valid: {TOKENS_DTYPES}')
  if not index.keep_tokens:
    raise ValueError('a Milvus gallery keeps the image tokens for re-ranking: index with keep_tokens=True')
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  uri = uri or str(folder.resolve() / LITE_FILE)
  store = MilvusStore.connect(uri, collection)
  store.create(index.embeddings.shape[1], index_type, index_params)
  store.insert(index.embeddings)
  _write_rows(folder / EMBEDDINGS_FILE, index.embeddings, np.float32)
  _write_rows(folder / TOKENS_FILE, index.tokens, np.dtype(token_dtype))
  meta = {'uri': uri, 'collection': collection, 'count': len(index), 'weights_sha256': index.weights_sha256,
          'token_dtype': token_dtype, 'index_type': index_type, 'names': index.names}
  (folder / META_FILE).write_text(json.dumps(meta, indent=1) + '\n')
  return store


def open_gallery(folder: str | os.PathLike, uri: str | None = None) -> tuple[Index, MilvusStore]:
  """(index with memory-mapped embeddings and tokens, its Milvus store) of a folder `save_gallery` wrote.

  `uri` overrides the recorded one (the same collection served elsewhere). Refuses a collection whose size is not
  the folder's.
  """
  folder = pathlib.Path(folder)
  try:
    meta = json.loads((folder / META_FILE).read_text())
    embeddings = np.load(folder / EMBEDDINGS_FILE, mmap_mode='r')
    tokens = np.load(folder / TOKENS_FILE, mmap_mode='r')
  except (OSError, ValueError) as e:
    raise ValueError(f'{folder}: not a readable Milvus gallery ({e})') from e
  store = MilvusStore.connect(uri or meta['uri'], meta['collection'])
  store.load()
  if len(store) != meta['count'] or len(embeddings) != meta['count'] or len(tokens) != meta['count']:
    raise ValueError(f'{folder}: Milvus holds {len(store)} vectors, the side store {len(embeddings)} embeddings and '
                     f'{len(tokens)} tokens for {meta["count"]} names; rebuild it')
  return Index.from_arrays(meta['names'], embeddings, tokens, meta['weights_sha256']), store


def _write_rows(path: pathlib.Path, array: np.ndarray, dtype: np.dtype) -> None:
  """Writes an (N, ...) array as a .npy a bounded block at a time (a memory-mapped source is never read whole), with
  the index's writer; a failed write leaves no partial file."""
  writer = TokenWriter(path, array.shape[1:], dtype)
  try:
    for start in range(0, len(array), _INSERT_ROWS):
      writer.write(array[start:start + _INSERT_ROWS])
  except BaseException:
    writer.abort()
    raise
  writer.close()
