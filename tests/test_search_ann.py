"""Search at gallery scale: FAISS candidates against exact search (equal for 'flat', a recall bound for HNSW/IVF), FAISS
save/load, a query with an ANN reading only its candidates' rows, a Milvus Lite gallery reopened in a new process
searching and re-ranking as the in-memory index does (float32 tokens) or close to it (float16), and `--milvus`
reusing its collection, following a sync and copying none of the index's files."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from helpers import ROOT, xla_flags
from test_export import exported, random_images, write_pngs  # noqa: F401  # exported: the micro bundle, a module fixture

faiss = pytest.importorskip('faiss')
try:
  # Imported at collection, not first inside a test: importing pymilvus runs logging.config.dictConfig, which closes
  # every logging handler, and absl's closes its stream, pytest's capture file while capsys has replaced sys.stderr
  # (the session then loses its report).
  import pymilvus  # noqa: F401  # pylint: disable=unused-import
except ImportError:
  pass

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


def test_the_ann_benchmark_runs_on_the_index_format_it_measures(retriever):
  """benchmarks/ann_search.py (docs/search.md's table) on a small gallery: with an exact 'flat' index its recall
  and its text queries' agreement are 1, which a benchmark comparing the wrong rows would not give."""
  from xmodal.inference.faiss_index import FaissIndex
  sys.path.insert(0, str(ROOT / 'benchmarks'))
  import ann_search  # pylint: disable=g-import-not-at-top  (outside the package on purpose)
  index = ann_search.random_index(retriever, 2000)
  assert len(index) == 2000
  np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-5)
  flat = FaissIndex.build(index.embeddings, 'flat')
  assert ann_search.recall_near_items(index, flat, 10, count=50) == 1.0
  row = ann_search.measure(retriever, index, flat, list(QUERIES) * 2, 10)
  assert row['text_query_agreement'] == 1.0 and row['exact_qps'] > 0 and row['ann_qps'] > 0


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
    print(json.dumps({'dtype': str(index.tokens.dtype), 'tokens_file': str(index.tokens.filename),
                      'hits': [[[h.index, h.name, h.itc, h.itm] for h in row] for row in hits]}))
''')


def reopen_and_search(bundle, folder):
  """Opens the Milvus gallery in a fresh process (nothing shared with this one but the files) and searches."""
  env = dict(os.environ, XLA_FLAGS=xla_flags(1), PYTHONPATH=str(ROOT))
  result = subprocess.run([sys.executable, '-c', REOPEN, str(bundle), str(folder), json.dumps(QUERIES)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_milvus_lite_gallery_reopened_in_a_new_process_searches_and_reranks_as_the_in_memory_index(
    bundle, retriever, image_index, tmp_path):
  pytest.importorskip('pymilvus')
  pytest.importorskip('milvus_lite')
  from xmodal.inference import Index
  from xmodal.inference.milvus_store import save_gallery
  expected = retriever.search(QUERIES, image_index, k=8, rerank=8)
  # float32 tokens: an index never saved, which the gallery saves into its folder; float16 tokens: an index saved in
  # its own folder, which the gallery (a folder inside it, as the CLI's DIR/milvus) references.
  unsaved = Index.from_arrays(image_index.names, image_index.embeddings, image_index.tokens, image_index.weights_sha256)
  half = retriever.index(random_images(24), progress=False, tokens_dtype='float16', path=tmp_path / 'half.index')
  folders = {'float32': tmp_path / 'float32', 'float16': tmp_path / 'half.index' / 'milvus'}
  for dtype, index in (('float32', unsaved), ('float16', half)):
    store = save_gallery(folders[dtype], index)
    assert len(store) == len(image_index)
    store.close()  # Milvus Lite holds its file until closed: the new process must open it itself
  assert (folders['float32'] / 'gallery.db').exists()  # a real Milvus Lite file, not an in-memory stand-in

  got = reopen_and_search(bundle, folders['float32'])
  assert (got['dtype'], got['tokens_file']) == ('float32', str(folders['float32'] / 'tokens.npy'))
  assert [[h[0] for h in row] for row in got['hits']] == positions(expected)
  assert [[h[1] for h in row] for row in got['hits']] == [[h.name for h in row] for row in expected]
  np.testing.assert_allclose([[h[2] for h in row] for row in got['hits']],
                             [[h.itc for h in row] for row in expected], rtol=0, atol=1e-6)
  np.testing.assert_allclose([[h[3] for h in row] for row in got['hits']],
                             [[h.itm for h in row] for row in expected], rtol=0, atol=1e-5)

  # float16 tokens, the index's own file memory-mapped: the same candidates (ITC does not read tokens), ITM scores
  # within float16's rounding.
  half_got = reopen_and_search(bundle, folders['float16'])
  assert (half_got['dtype'], half_got['tokens_file']) == ('float16', str(tmp_path / 'half.index' / 'tokens.npy'))
  assert not list(folders['float16'].glob('*.npy'))
  assert [sorted(h[0] for h in row) for row in half_got['hits']] == [sorted(h.index for h in row) for row in expected]
  itm_exact = np.array([[h.itm for h in sorted(row, key=lambda h: h.index)] for row in expected])
  itm_half = np.array([[h[3] for h in sorted(row, key=lambda h: h[0])] for row in half_got['hits']])
  spread = np.ptp(itm_exact)
  assert np.max(np.abs(itm_half - itm_exact)) <= max(1e-2 * spread, 1e-3), (itm_half - itm_exact, spread)


class StoreWrites:
  """Records every MilvusStore call that writes to Milvus, as (method, rows given or the argument), and passes it on
  to the real method."""

  def __init__(self, monkeypatch):
    from xmodal.inference.milvus_store import MilvusStore
    self.calls = []
    for name in ('create', 'insert', 'upsert', 'truncate'):
      def spy(store, first, *args, _method=getattr(MilvusStore, name), _name=name, **kwargs):
        self.calls.append((_name, len(first) if _name in ('insert', 'upsert') else first))
        return _method(store, first, *args, **kwargs)
      monkeypatch.setattr(MilvusStore, name, spy)

  def take(self):
    calls, self.calls = self.calls, []
    return calls


def milvus_vectors(uri):
  """(ids, vectors (N, E)) of everything the Milvus collection at `uri` holds, read back from Milvus, by id."""
  from xmodal.inference.milvus_store import MilvusStore
  store = MilvusStore.connect(uri)
  try:
    store.load()
    rows = store.client.query(store.collection, filter='id >= 0', output_fields=['id', 'vector'], limit=1000)
  finally:
    store.close()
  rows = sorted(rows, key=lambda r: r['id'])
  return [r['id'] for r in rows], np.array([r['vector'] for r in rows], np.float32).reshape(len(rows), -1)


def test_milvus_cli_reuses_its_collection_follows_a_sync_and_copies_none_of_the_index_files(
    bundle, tmp_path, monkeypatch, capsys):
  pytest.importorskip('pymilvus')
  pytest.importorskip('milvus_lite')
  import shutil
  from xmodal.cli.main import main
  from xmodal.inference import Index
  folder, index_dir, db = tmp_path / 'photos', tmp_path / 'photos.index', tmp_path / 'gallery.db'
  originals = write_pngs(random_images(13, seed=5), tmp_path / 'originals')  # query copies outside the gallery
  folder.mkdir()
  for i in range(12):
    shutil.copy(originals / f'img{i:03d}.png', folder)
  writes = StoreWrites(monkeypatch)

  def search(name, milvus=True):
    """The names and ITC scores of `xmodal search --query-image` over the synced folder."""
    argv = ['search', '--bundle', str(bundle), '--images', str(folder), '--index', str(index_dir), '--query-image',
            str(originals / name), '--k', '5', '--json', '--no-progress'] + (['--milvus', str(db)] if milvus else [])
    assert main(argv) == 0
    hits = json.loads(capsys.readouterr().out)['results'][0]['hits']
    return [h['name'] for h in hits], [h['itc'] for h in hits]

  def assert_milvus_holds_the_index_and_searches_as_exact(name, names):
    embeddings = Index.load(index_dir).embeddings
    ids, vectors = milvus_vectors(str(db))
    assert ids == list(range(len(embeddings)))
    np.testing.assert_array_equal(vectors, embeddings)
    assert names == search(name, milvus=False)[0]

  first = search('img003.png')
  dim = Index.load(index_dir).embeddings.shape[1]
  assert writes.take() == [('create', dim), ('insert', 12)]
  assert first[0][0] == str(folder / 'img003.png')
  assert_milvus_holds_the_index_and_searches_as_exact('img003.png', first[0])
  # The gallery references the index folder's arrays: one embeddings.npy and one tokens.npy under DIR, none in
  # DIR/milvus.
  assert sorted(p.relative_to(index_dir).as_posix() for p in index_dir.rglob('*.npy')) == ['embeddings.npy',
                                                                                           'tokens.npy']
  assert json.loads((index_dir / 'milvus' / 'milvus.json').read_text())['index'] == '..'

  # Unchanged index: the collection is reused, nothing written to Milvus, the same results.
  again = search('img003.png')
  assert writes.take() == []
  assert again[0] == first[0]
  np.testing.assert_allclose(again[1], first[1], rtol=0, atol=1e-6)

  # One image added: sync appends it, only its row is written, and it is found.
  shutil.copy(originals / 'img012.png', folder)
  names, _ = search('img012.png')
  assert writes.take() == [('upsert', 1)]
  assert names[0] == str(folder / 'img012.png')
  assert_milvus_holds_the_index_and_searches_as_exact('img012.png', names)

  # One removed near the end: the 4 rows after it move up one position and the last position goes.
  (folder / 'img008.png').unlink()
  names, _ = search('img008.png')
  assert writes.take() == [('upsert', 4), ('truncate', 12)]
  assert str(folder / 'img008.png') not in names
  assert_milvus_holds_the_index_and_searches_as_exact('img008.png', names)

  # One removed near the start: most rows move, so the collection is rebuilt.
  (folder / 'img001.png').unlink()
  names, _ = search('img001.png')
  assert writes.take() == [('create', dim), ('insert', 11)]
  assert str(folder / 'img001.png') not in names
  assert_milvus_holds_the_index_and_searches_as_exact('img001.png', names)
