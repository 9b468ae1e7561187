"""Search with an exported bundle: a trained micro model finds a test caption's image, indexes round-trip and grow
without recomputing, FAISS agrees with exact search, and `xmodal search` prints and draws its results."""

import numpy as np
import pytest

# Module fixtures, found by pytest under these names: the shapes build, gallery, trained bundle and its retriever.
from search_fixtures import bundle, gallery, retriever, shapes  # noqa: F401  # pylint: disable=unused-import

# The micro model reads 10 tokens, as it was trained on: the gallery's captions are cut on purpose; not reported.
_CAPTIONS_CUT = pytest.mark.filterwarnings('ignore:query .* cut to the model')

# Every test searches with the bundle of a model trained search_fixtures.TRAIN_STEPS steps in a subprocess.
pytestmark = pytest.mark.slow


def test_xmodal_search_prints_the_retrievers_top_10_and_writes_a_contact_sheet(bundle, retriever, gallery, tmp_path,
                                                                                capsys):
  from PIL import Image
  from xmodal.cli.main import main
  folder, captions = gallery
  query = captions[3][0]
  out = tmp_path / 'sheet'
  assert main(['search', '--bundle', str(bundle), '--images', str(folder), '--query', query, '--k', '10',
                   '--rerank', '10', '--out', str(out), '--no-progress']) == 0
  printed = capsys.readouterr().out
  ranked = [line.split()[-1] for line in printed.splitlines() if line.split()[:1] and line.split()[0].isdigit()
            and line.endswith('.png')]
  # The command is the API's search, in the API's order (ITC picks the 10, ITM orders them).
  expected = [hit.name for hit in retriever.search(query, retriever.index(folder, progress=False), k=10, rerank=10)]
  assert ranked == expected, printed
  page = (out / 'results.html').read_text()
  assert page.count('<img ') == 10 and 'ITM' in page
  with Image.open(out / 'results.png') as sheet:
    assert sheet.size == (5 * 128, 2 * (128 + 28))


@_CAPTIONS_CUT
def test_text_queries_rank_their_images_better_than_chance(retriever, gallery):
  folder, captions = gallery
  index = retriever.index(folder, progress=False)
  # ITC alone: what 200 micro steps teach. Re-ranking's correctness is tested against a reference in
  # test_evaluate.py; this micro model's ITM has not left its prior, so re-ranked lists would test its noise.
  hits = retriever.search([c[0] for c in captions], index, k=10, rerank=0)
  found = [str(folder / f'test{i:03d}.png') in [h.name for h in row] for i, row in enumerate(hits)]
  # Chance is 10 / search_fixtures.GALLERY = 25 %.
  assert np.mean(found) >= 0.5, np.mean(found)


def test_index_round_trips_through_disk(retriever, gallery, tmp_path):
  folder, _ = gallery
  index = retriever.index(folder, progress=False)
  index.save(tmp_path / 'idx')
  loaded = retriever.load_index(tmp_path / 'idx')
  assert loaded.names == index.names
  np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
  np.testing.assert_array_equal(loaded.tokens, index.tokens)
  query = 'a red circle'
  assert retriever.search(query, loaded, k=5, rerank=5) == retriever.search(query, index, k=5, rerank=5)
  # Without kept tokens the candidates' tokens are recomputed from their paths: the same ranking.
  light = retriever.index(folder, progress=False, keep_tokens=False)
  light.save(tmp_path / 'light')
  light = retriever.load_index(tmp_path / 'light')
  assert light.tokens is None
  assert [(h.index, round(h.itm, 4)) for h in retriever.search(query, light, k=5, rerank=5)] == [
      (h.index, round(h.itm, 4)) for h in retriever.search(query, index, k=5, rerank=5)]


@_CAPTIONS_CUT
def test_reranking_at_each_querys_length_on_kept_keys_values_scores_and_ranks_as_the_full_length_match(
    retriever, gallery):
  """Re-ranking as it runs now (each query cut to its length bucket, several queries' pairs in one call, the index's
  kept keys and values) against the path of older bundles and indexes (the full-length match on image tokens), on
  every pair of the gallery: the same ITM scores up to float rounding, so the same rankings."""
  from xmodal.inference.ranking import text_lengths
  from xmodal.inference.retriever import Reranking
  folder, captions = gallery
  index = retriever.index(folder, progress=False, keep_keys_values=True)
  queries = ['a red circle', *(c[0] for c in captions[:6]), 'a small blue square left of a large green triangle']
  assert len(set(text_lengths(retriever.tokenize(queries)[1]))) == 2  # buckets of 8 and 12 (the model's 12)
  everything = len(index)  # every image of the gallery re-ranked
  search = lambda: retriever.search(queries, index, k=everything, rerank=everything)
  try:
    retriever.reranking = Reranking(query_length=False, keys_values=False)
    old = search()
    for setting in (Reranking(query_length=True, keys_values=False), Reranking(query_length=False), Reranking()):
      retriever.reranking = setting
      one_by_one = [retriever.search(q, index, k=everything, rerank=everything) for q in queries]
      for new in (search(), one_by_one):
        for new_hits, old_hits in zip(new, old):
          assert [h.index for h in new_hits] == [h.index for h in old_hits], setting
          np.testing.assert_allclose([h.itm for h in new_hits], [h.itm for h in old_hits], atol=1e-4)
  finally:
    retriever.reranking = Reranking()


def test_add_embeds_only_the_new_images(retriever, gallery, monkeypatch):
  folder, _ = gallery
  paths = sorted(str(p) for p in folder.glob('*.png'))
  encoded = []
  original = retriever.encode_pixels
  monkeypatch.setattr(retriever, 'encode_pixels', lambda pixels: (encoded.append(len(pixels)), original(pixels))[1])
  index = retriever.index(paths[:12], progress=False)
  before = index.embeddings.copy()
  retriever.add(index, paths[12:17])
  assert sum(encoded) == 17 and len(index) == 17
  np.testing.assert_array_equal(index.embeddings[:12], before)
  full = retriever.index(paths[:17], progress=False)
  np.testing.assert_allclose(index.embeddings, full.embeddings, rtol=1e-5, atol=1e-6)


def test_image_query_ranks_captions(retriever, gallery):
  folder, captions = gallery
  texts = [c[0] for c in captions[:20]]
  hits = retriever.search_captions([str(folder / f'test{i:03d}.png') for i in range(20)], texts, k=10, rerank=10)
  assert all(len(row) == 10 and row[0].itm is not None for row in hits)
  assert np.mean([i in [h.index for h in row] for i, row in enumerate(hits)]) >= 0.5


@_CAPTIONS_CUT
def test_faiss_flat_equals_exact_search_and_approximate_recall(retriever, gallery, capsys):
  from xmodal.inference import ranking
  from xmodal.inference.faiss_index import FaissIndex
  folder, captions = gallery
  index = retriever.index(folder, progress=False)
  queries = [c[0] for c in captions]
  flat = FaissIndex.build(index.embeddings, 'flat')
  assert retriever.search(queries, index, k=10, rerank=0, ann=flat) == retriever.search(queries, index, k=10,
                                                                                         rerank=0)
  # Approximate kinds on a gallery big enough for them to differ from exact search (unit vectors, dim 16).
  rng = np.random.default_rng(0)
  gallery_emb = rng.normal(size=(4000, 16)).astype(np.float32)
  gallery_emb /= np.linalg.norm(gallery_emb, axis=1, keepdims=True)
  query_emb = gallery_emb[:100] + 0.3 * rng.normal(size=(100, 16)).astype(np.float32)
  exact = ranking.top_k(query_emb @ gallery_emb.T, 10)
  recalls = {}
  for kind in ('hnsw', 'ivf'):
    _, ids = FaissIndex.build(gallery_emb, kind, nlist=32, nprobe=4).search(query_emb, 10)
    recalls[kind] = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, exact)])
  with capsys.disabled():
    print(f'\nFAISS recall@10 vs exact (4000 x 16): {recalls}')
  assert recalls['hnsw'] >= 0.8 and recalls['ivf'] >= 0.5
