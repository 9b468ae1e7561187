"""Indexing at gallery scale: the index follows its folder (sync), bad files and bad arguments are named, tokens live
on disk memory-mapped, image-to-image search, and `xmodal search`'s --json, repeated --query and one-line errors.

The bundle is a randomly initialised micro model (test_export's): these properties need no training."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
from PIL import Image

from test_export import exported  # noqa: F401  # the randomly initialised micro bundle, a module fixture
from xmodal.inference.index import Entry, walk_images

slow = pytest.mark.slow  # the tests that embed images use the exported micro bundle (about 5 s to export)
IMAGES = 12


@pytest.fixture(scope='module')
def bundle(exported):
  return exported[2]


@pytest.fixture(scope='module')
def retriever(bundle):
  from xmodal.inference import Retriever
  return Retriever.load(bundle, batch_size=8)


def write_image(path, seed):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
  return str(path)


@pytest.fixture
def gallery(tmp_path):
  folder = tmp_path / 'gallery'
  for i in range(IMAGES):
    write_image(folder / f'img{i:02d}.png', i)
  return folder


def counting(retriever, monkeypatch):
  """A list that records how many images each image-tower call embeds."""
  calls = []
  original = retriever.encode_pixels
  monkeypatch.setattr(retriever, 'encode_pixels', lambda pixels: (calls.append(len(pixels)), original(pixels))[1])
  return calls


# ---------------------------------------------------------------------------------------------- bad input
def bad_files(folder):
  """A fake .png, an empty .jpg and a truncated PNG, with their expected reasons."""
  (folder / 'fake.png').write_text('not an image')
  (folder / 'empty.jpg').write_bytes(b'')
  good = (folder / 'img00.png').read_bytes()
  (folder / 'truncated.png').write_bytes(good[:len(good) // 2])
  return {str(folder / 'fake.png'): 'not an image', str(folder / 'empty.jpg'): 'empty',
          str(folder / 'truncated.png'): 'truncated'}


@slow
def test_unreadable_images_are_skipped_counted_and_listed_with_their_path(retriever, gallery):
  expected = bad_files(gallery)
  index = retriever.index(gallery, progress=False)
  assert len(index) == IMAGES
  assert index.report.counts()['unreadable'] == 3
  assert {path for path, _ in index.report.unreadable} == set(expected)
  for path, reason in index.report.unreadable:
    assert expected[path] in reason, (path, reason)
  assert not set(expected) & set(index.names)


@slow
def test_strict_fails_on_the_first_unreadable_image_naming_it_and_leaves_the_index_alone(retriever, gallery):
  from xmodal.inference.preprocess import UnreadableImage
  index = retriever.index(gallery, progress=False, path=gallery.parent / 'idx')
  before = index.embeddings.copy()
  (gallery / 'zz_new.png').write_bytes(b'')
  with pytest.raises(UnreadableImage, match='zz_new.png: unreadable image'):
    retriever.sync(index, gallery, strict=True)
  assert len(index) == IMAGES
  np.testing.assert_array_equal(index.embeddings, before)
  assert len(retriever.load_index(gallery.parent / 'idx')) == IMAGES


@slow
@pytest.mark.parametrize('arguments, message', [({'k': -1}, 'k must be'), ({'k': 2.5}, 'k must be'),
                                                ({'k': True}, 'k must be'), ({'rerank': -5}, 'rerank must be')])
def test_k_and_rerank_are_validated(retriever, gallery, arguments, message):
  index = retriever.index(sorted(gallery.glob('*.png'))[:4], progress=False)
  with pytest.raises(ValueError, match=message):
    retriever.search('a red circle', index, **arguments)
  with pytest.raises(ValueError, match=message):
    retriever.search_captions(str(gallery / 'img00.png'), ['a red circle'], **arguments)


@slow
def test_batch_size_is_validated(retriever, gallery):
  with pytest.raises(ValueError, match='batch_size must be'):
    retriever.index(gallery, batch_size=-2, progress=False)


@slow
@pytest.mark.parametrize('query', ['', '   ', ['a red circle', '\n']])
def test_empty_queries_are_refused(retriever, gallery, query):
  index = retriever.index(sorted(gallery.glob('*.png'))[:4], progress=False)
  with pytest.raises(ValueError, match='empty'):
    retriever.search(query, index)


@slow
def test_unknown_and_truncated_queries_return_results_with_a_query_warning(retriever, gallery):
  from xmodal.inference.retriever import QueryWarning
  index = retriever.index(sorted(gallery.glob('*.png'))[:4], progress=False)
  with pytest.warns(QueryWarning, match='not in the vocabulary'):
    assert len(retriever.search('红色的圆圈', index, k=3, rerank=0)) == 3
  with pytest.warns(QueryWarning, match='cut to'):
    assert len(retriever.search(' '.join(['a red circle'] * 50), index, k=3, rerank=0)) == 3
  with warnings.catch_warnings():
    warnings.simplefilter('error', QueryWarning)  # a plain short query in the vocabulary warns about nothing
    retriever.search('a red circle left of a blue square', index, k=3, rerank=0)


# ----------------------------------------------------------------------------------------------------- sync
@slow
def test_sync_embeds_added_and_changed_files_drops_deleted_ones_and_equals_a_fresh_index(retriever, gallery,
                                                                                         monkeypatch):
  index = retriever.index(gallery, progress=False, keep_keys_values=True)
  calls = counting(retriever, monkeypatch)
  report = retriever.sync(index, gallery)
  assert sum(calls) == 0 and report.counts()['unchanged'] == IMAGES and len(index) == IMAGES

  os.remove(gallery / 'img03.png')
  added = write_image(gallery / 'sub' / 'new.png', 100)
  changed = write_image(gallery / 'img05.png', 101)
  stat = os.stat(changed)
  os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new mtime even on a coarse clock
  report = retriever.sync(index, gallery)
  assert (report.added, report.changed, report.removed) == ([added], [changed], [str(gallery / 'img03.png')])
  assert report.unchanged == IMAGES - 2 and sum(calls) == 2  # only the new and the changed file were embedded
  fresh = retriever.index(gallery, progress=False, keep_keys_values=True)
  assert sorted(index.names) == sorted(fresh.names)
  order = [fresh.names.index(name) for name in index.names]
  np.testing.assert_allclose(index.embeddings, fresh.embeddings[order], atol=1e-5)
  np.testing.assert_allclose(index.tokens, fresh.tokens[order], atol=1e-4)
  np.testing.assert_allclose(index.keys_values, fresh.keys_values[order], atol=1e-4)


@slow
def test_adding_the_same_file_again_is_a_no_op_and_duplicates_are_reported(retriever, gallery, monkeypatch):
  paths = sorted(str(p) for p in gallery.glob('*.png'))
  index = retriever.index(paths[:5], progress=False)
  calls = counting(retriever, monkeypatch)
  retriever.add(index, paths[:5])
  assert len(index) == 5 and sum(calls) == 0 and index.report.unchanged == 5
  retriever.add(index, [paths[0], paths[0]])
  assert len(index) == 5 and sum(calls) == 0
  shutil.copy(paths[1], gallery / 'copy_of_img01.png')
  report = retriever.sync(index, gallery)
  assert [paths[1], str(gallery / 'copy_of_img01.png')] in report.duplicates  # in index order
  assert report.counts()['duplicates'] == 1


def test_symlinked_folders_are_followed_once_and_loops_are_skipped(tmp_path):
  outside = tmp_path / 'elsewhere'
  write_image(outside / 'far.png', 0)
  gallery = tmp_path / 'gallery'
  write_image(gallery / 'a.png', 1)
  os.symlink(outside, gallery / 'linked')
  os.symlink(outside, gallery / 'linked_again')
  os.symlink(gallery, gallery / 'loop')
  listing = walk_images(gallery)
  # A link to a folder outside is followed; the file keeps the link's path.
  assert listing.paths == [str(gallery / 'a.png'), str(gallery / 'linked' / 'far.png')]
  skipped = dict(listing.skipped_links)
  assert set(skipped) == {str(gallery / 'linked_again'), str(gallery / 'loop')}
  assert skipped[str(gallery / 'loop')] == f'already walked as {gallery}'


def test_plan_update_compares_size_and_mtime_not_just_the_path(tmp_path):
  from xmodal.inference.index import file_stamp, plan_update
  path = write_image(tmp_path / 'a.png', 0)
  size, mtime = file_stamp(path)
  same = plan_update([Entry(path, size, mtime, 'x')], [path], remove_missing=False)
  moved = plan_update([Entry(path, size, mtime - 1, 'x')], [path], remove_missing=False)
  assert (same.unchanged, same.todo, list(same.keep)) == (1, [], [0])
  assert (moved.changed, list(moved.keep)) == ([path], [])


# --------------------------------------------------------------------------------------------- tokens on disk
@slow
def test_memory_mapped_tokens_equal_the_towers_and_float16_within_its_rounding(retriever, gallery, tmp_path):
  paths = sorted(str(p) for p in gallery.glob('*.png'))
  _, tokens = retriever.encode_images(paths)
  index = retriever.index(gallery, progress=False, path=tmp_path / 'f32')
  assert isinstance(index.tokens, np.memmap)
  np.testing.assert_allclose(index.tokens, tokens, rtol=1e-5, atol=1e-5)
  loaded = retriever.load_index(tmp_path / 'f32')
  assert isinstance(loaded.tokens, np.memmap) and loaded.names == index.names
  np.testing.assert_array_equal(loaded.tokens[[3, 1]], index.tokens[[3, 1]])
  half = retriever.index(gallery, progress=False, tokens_dtype='float16', path=tmp_path / 'f16')
  assert half.tokens.dtype == np.float16
  assert os.path.getsize(tmp_path / 'f16' / 'tokens.npy') < 0.51 * os.path.getsize(tmp_path / 'f32' / 'tokens.npy')
  # float16 keeps 11 significant bits: relative error at most 2^-11, plus subnormals' absolute 2^-24.
  np.testing.assert_allclose(half.tokens.astype(np.float32), tokens, rtol=2.0 ** -11, atol=2.0 ** -24 + 1e-5)
  query = 'a red circle'
  full, approx = retriever.search(query, index, k=5, rerank=5), retriever.search(query, half, k=5, rerank=5)
  np.testing.assert_allclose([h.itm for h in approx], [h.itm for h in full], atol=1e-2)


@slow
def test_kept_keys_and_values_are_memory_mapped_cost_what_the_help_says_and_spare_the_image_tower(
    retriever, gallery, tmp_path, monkeypatch):
  index = retriever.index(gallery, progress=False, keep_tokens=False, keep_keys_values=True, path=tmp_path / 'kv')
  assert isinstance(index.keys_values, np.memmap) and index.tokens is None
  # The micro model: 2 cross-attention layers x keys and values x 2 heads x 16 wide x (16 patches + [CLS]).
  assert index.keys_values.shape == (IMAGES, 2, 2, 2, 16, 17)
  per_image = retriever.keys_values_bytes()
  assert per_image == 2 * 2 * 17 * 32 * 4  # layers x 2 x (1+N) x text width x 4 bytes, as `--help` says
  assert IMAGES * per_image < os.path.getsize(tmp_path / 'kv' / 'keys_values.npy') <= IMAGES * per_image + 128
  loaded = retriever.load_index(tmp_path / 'kv')
  assert loaded.keep_keys_values and isinstance(loaded.keys_values, np.memmap)
  np.testing.assert_array_equal(loaded.keys_values, index.keys_values)
  # Re-ranking reads them: no image tokens kept, none recomputed, the scores of an index that keeps tokens.
  with_tokens = retriever.index(gallery, progress=False)
  calls = counting(retriever, monkeypatch)
  query = 'a red circle left of a blue square'
  hits, expected = retriever.search(query, loaded, k=6, rerank=6), retriever.search(query, with_tokens, k=6, rerank=6)
  assert sum(calls) == 0
  assert [h.index for h in hits] == [h.index for h in expected]
  np.testing.assert_allclose([h.itm for h in hits], [h.itm for h in expected], atol=1e-5)


@slow
def test_an_index_written_before_keys_and_values_reads_as_one_that_keeps_none(retriever, gallery, tmp_path):
  retriever.index(sorted(gallery.glob('*.png'))[:3], progress=False, path=tmp_path / 'idx')
  meta = json.loads((tmp_path / 'idx' / 'index.json').read_text())
  del meta['keys_values_shape']
  (tmp_path / 'idx' / 'index.json').write_text(json.dumps(meta))
  index = retriever.load_index(tmp_path / 'idx')
  assert not index.keep_keys_values and index.keys_values is None
  assert len(retriever.search('a red circle', index, k=3, rerank=3)) == 3


@slow
def test_an_index_of_another_format_version_is_refused_clearly(retriever, gallery, tmp_path):
  from xmodal.inference.index import IndexFormatError
  retriever.index(sorted(gallery.glob('*.png'))[:2], progress=False, path=tmp_path / 'idx')
  meta = json.loads((tmp_path / 'idx' / 'index.json').read_text())
  meta['format_version'] = 1
  (tmp_path / 'idx' / 'index.json').write_text(json.dumps(meta))
  with pytest.raises(IndexFormatError, match='format version 1; this xmodal reads version 2. Rebuild it'):
    retriever.load_index(tmp_path / 'idx')


# ---------------------------------------------------------------------------------------------- image queries
@slow
def test_an_image_query_finds_itself_first(retriever, gallery):
  index = retriever.index(gallery, progress=False)
  paths = [str(gallery / f'img{i:02d}.png') for i in (2, 7)]
  for path, hits in zip(paths, retriever.search_images(paths, index, k=3)):
    assert hits[0].name == path and hits[0].itc == pytest.approx(1.0, abs=1e-5)
    assert len(hits) == 3 and hits[1].itc <= hits[0].itc and all(h.itm is None for h in hits)


# ---------------------------------------------------------------------------------------------------- the CLI
@slow
def test_cli_json_answers_every_query_text_and_image(bundle, retriever, gallery, capsys):
  from xmodal.cli.main import main
  bad_files(gallery)
  queries = ['a red circle', 'a blue square left of a green triangle']
  image = str(gallery / 'img04.png')
  assert main(['search', '--bundle', str(bundle), '--images', str(gallery), '--query', queries[0], '--query',
               queries[1], '--query-image', image, '--k', '4', '--rerank', '4', '--json']) == 0
  document = json.loads(capsys.readouterr().out)
  assert [(r['kind'], r['query']) for r in document['results']] == [('text', q) for q in queries] + [('image', image)]
  index = retriever.index(gallery, progress=False)
  expected = retriever.search(queries, index, k=4, rerank=4)
  for result, hits in zip(document['results'], expected):
    assert [h['name'] for h in result['hits']] == [h.name for h in hits]
  assert document['results'][2]['hits'][0]['name'] == image
  assert document['index']['images'] == IMAGES and document['index']['unreadable'] == 3
  assert {f['path'] for f in document['index']['unreadable_files']} == set(bad_files(gallery))


@slow
def test_cli_sync_prints_the_counts(bundle, gallery, tmp_path, capsys):
  from xmodal.cli.main import main
  command = ['search', 'sync', '--bundle', str(bundle), '--images', str(gallery), '--index', str(tmp_path / 'i'),
             '--no-progress']
  assert main(command) == 0
  assert f'index: {IMAGES} images (added {IMAGES}, removed 0, changed 0, unchanged 0' in capsys.readouterr().out
  os.remove(gallery / 'img00.png')
  assert main(command) == 0
  assert f'index: {IMAGES - 1} images (added 0, removed 1, changed 0, unchanged {IMAGES - 1}' in (
      capsys.readouterr().out)


@slow
@pytest.mark.parametrize('extra, message', [
    (['--query', 'red', '--k', '-1'], 'k must be an integer >= 1; got -1'),
    (['--query', 'red', '--rerank', '-5'], 'rerank must be an integer >= 0; got -5'),
    (['--query', '  '], 'text 0 is empty'),
    (['--query', 'red', '--strict'], 'fake.png: unreadable image'),
    (['--query-image', '/no/such.png'], '/no/such.png: unreadable image'),
])
def test_cli_bad_input_is_one_line_and_exit_2(bundle, gallery, capsys, extra, message):
  from xmodal.cli.main import main
  (gallery / 'fake.png').write_text('not an image')
  assert main(['search', '--bundle', str(bundle), '--images', str(gallery), '--no-progress', *extra]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [err[0]] and err[0].startswith('xmodal search: ') and message in err[0], err


@slow
def test_cli_keys_values_keeps_them_in_the_index_and_answers_as_without(bundle, gallery, tmp_path, capsys):
  from xmodal.cli.main import main
  answers = {}
  for name, extra in (('kv', ['--keys-values']), ('tokens', [])):
    assert main(['search', '--bundle', str(bundle), '--images', str(gallery), '--index', str(tmp_path / name),
                 '--query', 'a red circle', '--k', '4', '--rerank', '4', '--json', *extra]) == 0
    answers[name] = json.loads(capsys.readouterr().out)['results'][0]['hits']
  assert (tmp_path / 'kv' / 'keys_values.npy').exists() and not (tmp_path / 'tokens' / 'keys_values.npy').exists()
  assert [h['index'] for h in answers['kv']] == [h['index'] for h in answers['tokens']]
  np.testing.assert_allclose([h['itm'] for h in answers['kv']], [h['itm'] for h in answers['tokens']], atol=1e-5)


@slow
def test_search_bench_compares_the_old_and_new_reranking_in_one_run(bundle, capsys):
  from xmodal.cli.main import main
  assert main(['search', 'bench', '--bundle', str(bundle), '--gallery-size', '24', '--queries', '4', '--k', '3',
               '--rerank', '8', '--batch-size', '8', '--compare', '--rounds', '2']) == 0
  printed = capsys.readouterr().out.splitlines()
  results = json.loads(printed[-1])
  assert {'index_images_per_s', 'queries_per_s_itc', 'queries_per_s_itc+itm', 'dtype'} <= set(results)
  compare = results['compare']
  assert (compare['old']['query_length'], compare['old']['keys_values']) == (False, False)
  assert (compare['new']['query_length'], compare['new']['keys_values']) == (True, True)
  assert len(compare['old']['queries_per_s']) == len(compare['new']['queries_per_s']) == 2
  assert compare['ratio'] == pytest.approx(compare['new']['median'] / compare['old']['median'])
  assert compare['max_itm_difference'] < 1e-4 and compare['same_rankings']
  assert any(line.startswith('ratio new/old') for line in printed)


@slow
def test_cli_prints_query_warnings(bundle, gallery, capsys):
  from xmodal.cli.main import main
  assert main(['search', '--bundle', str(bundle), '--images', str(gallery), '--no-progress', '--query',
               '红色的圆圈', '--k', '2']) == 0
  assert 'xmodal search: warning: query' in capsys.readouterr().err
