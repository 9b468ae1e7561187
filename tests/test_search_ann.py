"""Search at gallery scale: FAISS candidates against exact search (equal for 'flat', a recall bound for HNSW/IVF), FAISS
save/load, a query with an ANN reading only its candidates' rows, and a Milvus Lite gallery reopened in a new process
searching and re-ranking as the in-memory index does (float32 tokens) or close to it (float16)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import ROOT
from test_export import exported, random_images  # noqa: F401  # the randomly initialised micro bundle, a module fixture

faiss = pytest.importorskip('faiss')

QUERIES = ['a red circle', 'a small blue square left of a green triangle', 'two shapes', 'a large yellow star',
           'a purple circle above a red square', 'green']


@pytest.fixture(scope='module')
def bundle(exported):
  """ANN and storage properties need no training: the randomly initialised micro bundle."""
  return exported[2]


@pytest.fixture(scope='module')
def retriever(bundle):
  from xmodal.inference import Retriever
  return Retriever.load(bundle, batch_size=16)


@pytest.fixture(scope='module')
def image_index(retriever):
  """24 random images with their tokens kept."""
  return retriever.index(random_images(24), progress=False)


def unit_vectors(count, dim, seed=0):
  x = np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def vector_index(retriever, count, seed=0):
  """An ITC-only index of random unit vectors at the bundle's embedding size."""
  from xmodal.inference import Index
  return Index.from_arrays([f'array:{i}' for i in range(count)], unit_vectors(count, int(retriever.manifest['embed_dim']), seed),
               None, retriever.weights_sha256)


def positions(hits):
  return [[h.index for h in row] for row in hits]


def test_flat_ann_search_equals_exact_search_with_and_without_reranking(retriever, image_index):
  from xmodal.inference.faiss_index import FaissIndex
  big = vector_index(retriever, 3000)
  flat = FaissIndex.build(big.embeddings, 'flat')
  assert retriever.search(QUERIES, big, k=10, rerank=0, ann=flat) == retriever.search(QUERIES, big, k=10, rerank=0)
  flat = FaissIndex.build(image_index.embeddings, 'flat')
  assert retriever.search(QUERIES, image_index, k=5, rerank=8, ann=flat) == retriever.search(QUERIES, image_index,
                                                                                           k=5, rerank=8)


@pytest.mark.parametrize('kind', ['hnsw', 'ivf'])
def test_approximate_ann_recall_at_10_against_exact_is_at_least_0_9(kind):
  from xmodal.inference import ranking
  from xmodal.inference.faiss_index import FaissIndex
  # A gallery that groups by content (40 clusters, cosine ~0.7 to their centre) and queries near its items, as real
  # embeddings and queries are; uniform random vectors, with no structure, are an ANN's worst case.
  rng = np.random.default_rng(1)
  gallery = unit_vectors(4000, 32) / np.sqrt(32) + unit_vectors(40, 32, seed=2)[rng.integers(0, 40, 4000)]
  gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
  queries = gallery[:200] + 0.5 * rng.standard_normal((200, 32)).astype(np.float32) / np.sqrt(32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  exact = ranking.top_k(queries @ gallery.T, 10)
  _, ids = FaissIndex.build(gallery, kind).search(queries, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
  assert recall >= 0.9, recall
  # ...and the speed comes from not scanning everything: IVF probes a small share of its lists.
  if kind == 'ivf':
    ann = FaissIndex.build(gallery, kind)
    assert ann.params['nprobe'] / ann.params['nlist'] <= 0.3


@pytest.mark.parametrize('kind', ['flat', 'hnsw', 'ivf'])
def test_faiss_index_saved_and_loaded_gives_identical_results_and_refuses_another_gallery(kind, tmp_path):
  from xmodal.inference.faiss_index import FaissIndex
  gallery = unit_vectors(3000, 16)
  queries = unit_vectors(50, 16, seed=3)
  ann = FaissIndex.build(gallery, kind, nprobe=5, ef_search=20)
  ann.save(tmp_path)
  loaded = FaissIndex.load(tmp_path, count=3000)
  assert (loaded.kind, loaded.params) == (ann.kind, ann.params)
  for a, b in zip(ann.search(queries, 10), loaded.search(queries, 10)):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match='3000 vectors, the gallery has 2999'):
    FaissIndex.load(tmp_path, count=2999)


class RowReader:
  """An (N, ...) array that serves only `array[int positions]` and records the rows read; anything else raises."""

  def __init__(self, array):
    self._array = array
    self.shape, self.dtype = array.shape, array.dtype
    self.rows = []

  def __len__(self):
    return len(self._array)

  def __getitem__(self, key):
    key = np.asarray(key)
    if key.dtype.kind not in 'iu':
      raise AssertionError(f'read other than by row positions: {key!r}')
    self.rows.extend(key.ravel().tolist())
    return self._array[key]

  def __array__(self, *args, **kwargs):
    raise AssertionError('the whole array was read')

  @property
  def T(self):  # pylint: disable=invalid-name
    raise AssertionError('the whole array was read (transposed)')


def test_search_with_an_ann_reads_only_its_candidates_embeddings_and_tokens(retriever, image_index):
  from xmodal.inference import Index
  from xmodal.inference.faiss_index import FaissIndex
  ann = FaissIndex.build(image_index.embeddings, 'hnsw')
  embeddings, tokens = RowReader(image_index.embeddings), RowReader(image_index.tokens)
  watched = Index.from_arrays(image_index.names, embeddings, tokens, image_index.weights_sha256)
  hits = retriever.search(QUERIES[:2], watched, k=3, rerank=4, ann=ann)
  _, candidates = ann.search(retriever.encode_texts(QUERIES[:2])[0], 4)
  # Each query's 4 candidates' embeddings once, the re-ranked 4 candidates' tokens once: 8 rows of 24 each.
  assert sorted(embeddings.rows) == sorted(candidates.ravel().tolist())
  assert sorted(tokens.rows) == sorted(candidates.ravel().tolist())
  assert positions(hits) == positions(retriever.search(QUERIES[:2], image_index, k=3, rerank=4, ann=ann))
  with pytest.raises(AssertionError, match='whole array'):  # the wrapper does catch a full read
    retriever.search(QUERIES[:2], watched, k=3, rerank=0)


# ------------------------------------------------------------------------------------------------- Milvus Lite
REOPEN = textwrap.dedent('''
    import json, sys
    from xmodal.inference import Retriever
    from xmodal.inference.milvus_store import open_gallery
    bundle, folder, queries = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    retriever = Retriever.load(bundle, batch_size=16)
    index, store = open_gallery(folder)
    hits = retriever.search(queries, index, k=8, rerank=8, ann=store)
    print(json.dumps({'dtype': str(index.tokens.dtype), 'mmap': type(index.tokens).__name__,
                      'hits': [[[h.index, h.name, h.itc, h.itm] for h in row] for row in hits]}))
''')


def reopen_and_search(bundle, folder):
  """Opens the Milvus gallery in a fresh process (nothing shared with this one but the files) and searches."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, '-c', REOPEN, str(bundle), str(folder), json.dumps(QUERIES)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_milvus_lite_gallery_reopened_in_a_new_process_searches_and_reranks_as_the_in_memory_index(
    bundle, retriever, image_index, tmp_path):
  pytest.importorskip('pymilvus')
  pytest.importorskip('milvus_lite')
  from xmodal.inference.milvus_store import save_gallery
  expected = retriever.search(QUERIES, image_index, k=8, rerank=8)
  folders = {}
  for dtype in ('float32', 'float16'):
    folders[dtype] = tmp_path / dtype
    store = save_gallery(folders[dtype], image_index, token_dtype=dtype)
    assert len(store) == len(image_index)
    store.close()  # Milvus Lite holds its file until closed: the new process must open it itself
  assert (folders['float32'] / 'gallery.db').exists()  # a real Milvus Lite file, not an in-memory stand-in

  got = reopen_and_search(bundle, folders['float32'])
  assert (got['dtype'], got['mmap']) == ('float32', 'memmap')
  assert [[h[0] for h in row] for row in got['hits']] == positions(expected)
  assert [[h[1] for h in row] for row in got['hits']] == [[h.name for h in row] for row in expected]
  np.testing.assert_allclose([[h[2] for h in row] for row in got['hits']],
                             [[h.itc for h in row] for row in expected], rtol=0, atol=1e-6)
  np.testing.assert_allclose([[h[3] for h in row] for row in got['hits']],
                             [[h.itm for h in row] for row in expected], rtol=0, atol=1e-5)

  # float16 tokens: the same candidates (ITC does not read tokens), ITM scores within float16's rounding.
  half = reopen_and_search(bundle, folders['float16'])
  assert half['dtype'] == 'float16'
  assert [sorted(h[0] for h in row) for row in half['hits']] == [sorted(h.index for h in row) for row in expected]
  itm_exact = np.array([[h.itm for h in sorted(row, key=lambda h: h.index)] for row in expected])
  itm_half = np.array([[h[3] for h in sorted(row, key=lambda h: h[0])] for row in half['hits']])
  spread = np.ptp(itm_exact)
  assert np.max(np.abs(itm_half - itm_exact)) <= max(1e-2 * spread, 1e-3), (itm_half - itm_exact, spread)
