"""A gallery persisted in Milvus (`pip install "xmodal[milvus]"`): Milvus Lite in a local file by default, a Milvus
server or cluster by URI with no code change.

  store = save_gallery('photos.index/milvus', index)                            # Milvus Lite: .../milvus/gallery.db
  store = save_gallery('photos.index/milvus', index, uri='http://host:19530')   # a Milvus server holds the vectors
  index, store = open_gallery('photos.index/milvus')                            # in any later process
  hits = retriever.search(query, index, k=10, rerank=64, ann=store)

A Milvus gallery is an index folder (`Index.save`: index.json, embeddings.npy, tokens.npy) plus a gallery folder
with milvus.json: the index folder's path relative to it, the Milvus URI, collection and vector index, and a digest
of every embedding row Milvus holds. Milvus stores and searches the embeddings (id = gallery position). Everything
else comes from the index folder's own files, which the gallery references and never copies: the names, the
embeddings for the exact ITC score of every candidate (`ranking.score_candidates`, whatever index Milvus runs) and
the image tokens for ITM re-ranking, `tokens.npy` memory-mapped in the dtype the index chose (`tokens_dtype=`,
`--tokens-dtype`). An index that has no folder is saved into the gallery folder first.

`save_gallery` (which `xmodal search --index DIR --milvus URI` calls before every search, gallery folder DIR/milvus)
compares the index's row digests with milvus.json's and writes only what changed:
- same URI, collection, vector index and digests, and Milvus holding the recorded number of rows: reused as it is;
- some rows differ: an incremental update, those positions upserted and positions past the new count deleted.
  `Index.sync` keeps unchanged rows in order and appends new and re-embedded images, so adding images writes only
  the new rows; removing or re-embedding one shifts the rows after it, which are rewritten;
- more than half the rows differ, other settings, no readable milvus.json, or a row count that is not the recorded
  one (a collection changed by something else, an update cut short: milvus.json is marked before Milvus is
  touched): a full rebuild, the collection dropped, re-created and filled.
`open_gallery` calls it with the recorded settings, so a gallery whose index was synced since is brought up to date.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Any

import numpy as np

from xmodal.inference.index import Index, write_json

META_FILE = 'milvus.json'
LITE_FILE = 'gallery.db'
COLLECTION = 'xmodal_gallery'
_INSERT_ROWS = 4096  # rows per insert or upsert request


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
    # Strong: a search right after an update sees it (a server's default may serve slightly older data).
    self.client.create_collection(self.collection, schema=schema, index_params=params, consistency_level='Strong')

  def exists(self) -> bool:
    return bool(self.client.has_collection(self.collection))

  def insert(self, embeddings: np.ndarray, start: int = 0) -> None:
    """Stores (N, E) embeddings as positions start..start+N-1."""
    self._write(self.client.insert, embeddings, np.arange(start, start + len(embeddings)))

  def upsert(self, embeddings: np.ndarray, positions: np.ndarray) -> None:
    """Stores (P, E) embeddings at positions (P,), replacing the vectors there."""
    self._write(self.client.upsert, embeddings, np.asarray(positions))

  def _write(self, method: Any, embeddings: np.ndarray, positions: np.ndarray) -> None:
    """Calls insert or upsert a bounded batch at a time: a request stays far below gRPC's message limit."""
    for offset in range(0, len(positions), _INSERT_ROWS):
      rows = np.asarray(embeddings[offset:offset + _INSERT_ROWS], np.float32)
      method(self.collection, [{'id': int(p), 'vector': v.tolist()}
                               for p, v in zip(positions[offset:offset + _INSERT_ROWS], rows)])

  def truncate(self, count: int) -> None:
    """Deletes the vectors at positions count and beyond."""
    self.client.delete(self.collection, filter=f'id >= {int(count)}')

  def load(self) -> None:
    """Milvus searches only a loaded collection (held in the server's memory); a reopened one starts released."""
    self.client.load_collection(self.collection)

  def __len__(self) -> int:
    """Vectors in the loaded collection, deletions counted (a server's collection statistics lag behind them)."""
    return int(self.client.query(self.collection, filter='', output_fields=['count(*)'])[0]['count(*)'])

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
                 index_type: str = 'FLAT', index_params: dict[str, Any] | None = None) -> MilvusStore:
  """Makes `folder` the Milvus gallery of `index`, writing only what changed since it last was (module docstring:
  reused, updated incrementally or rebuilt), and returns its store, loaded for search.

  Args:
    folder: created if needed; holds milvus.json (and gallery.db at the default URI).
    index: referenced where it is saved (`index.folder`), never copied; an index without a folder is saved into
      `folder` first, which becomes its folder.
    uri: a Milvus server ('http://host:19530') or a .db path (Milvus Lite); default folder/gallery.db.
    collection, index_type, index_params: the collection and Milvus's vector index (`MilvusStore.create`).
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if index.folder is None:
    index.save(folder)
  settings = {'uri': uri or str(folder.resolve() / LITE_FILE), 'collection': collection, 'index_type': index_type,
              'index_params': index_params or {}, 'dim': int(index.embeddings.shape[1])}
  meta = {'index': os.path.relpath(index.folder.resolve(), folder.resolve()), **settings}
  rows = row_digests(index.embeddings)
  old = _read_meta(folder)
  store = MilvusStore.connect(settings['uri'], collection)
  recorded = old.get('rows') if all(old.get(k) == v for k, v in settings.items()) and store.exists() else None
  if recorded is not None:
    store.load()
    recorded = recorded if len(store) == len(recorded) else None
  if recorded != rows:
    # Until Milvus is updated: an update cut short is rebuilt by the next call.
    write_json(folder / META_FILE, {**meta, 'rows': None})
    changed = np.array([i for i, digest in enumerate(rows) if recorded is None or i >= len(recorded)
                        or recorded[i] != digest], np.int64)
    if recorded is None or len(changed) > len(rows) // 2:
      store.create(settings['dim'], index_type, index_params)
      store.insert(index.embeddings)
    else:
      store.upsert(index.embeddings[changed], changed)
      if len(recorded) > len(rows):
        store.truncate(len(rows))
    store.load()
  if old != {**meta, 'rows': rows}:
    write_json(folder / META_FILE, {**meta, 'rows': rows})
  return store


def open_gallery(folder: str | os.PathLike, uri: str | None = None) -> tuple[Index, MilvusStore]:
  """(index, its store loaded for search) of a gallery folder `save_gallery` wrote, Milvus brought up to date with
  the index folder as it is now. `uri` overrides the recorded one (the gallery then lives there)."""
  folder = pathlib.Path(folder)
  meta = _read_meta(folder)
  if 'index' not in meta:
    raise ValueError(f'{folder}: no readable {META_FILE} naming an index folder; make the gallery with save_gallery')
  index = Index.load(folder / meta['index'])
  store = save_gallery(folder, index, uri or meta['uri'], meta['collection'], meta['index_type'],
                       meta['index_params'])
  return index, store


def row_digests(embeddings: np.ndarray) -> list[str]:
  """A 64-bit digest (16 hex digits) of each row of (G, E) embeddings as the float32 bytes Milvus is given."""
  return [hashlib.blake2b(row.tobytes(), digest_size=8).hexdigest() for row in np.asarray(embeddings, np.float32)]


def _read_meta(folder: pathlib.Path) -> dict[str, Any]:
  """milvus.json, or {} when there is none readable (the gallery is then rebuilt)."""
  try:
    return json.loads((folder / META_FILE).read_text())
  except (OSError, ValueError):
    return {}
