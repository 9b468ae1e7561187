"""Tokenizers: ids against a hand-computed reference, the [CLS]/[SEP]/padding contract, every file kind, no TF."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tokenizers

from xmodal import tokenizer as tok_lib
from xmodal.data.shapes import captions as shapes_captions
from xmodal.data.shapes import render as shapes_render
from xmodal.data.shapes import vocab as shapes_vocab

# A vocabulary small enough to tokenize by hand (ids = line numbers).
TINY_VOCAB = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'a', 'red', 'circle', '##s', 'blue', 'box', ',', 'left',
              'of', 'c', '##a', '##t', 'cafe']


def _captions(n_scenes, seed=0):
  out = []
  for i in range(n_scenes):
    rng = np.random.default_rng([seed, i])
    out += shapes_captions.captions(shapes_render.sample_scene(rng), rng)
  return out


@pytest.fixture(scope='module')
def captions_file(tmp_path_factory):
  path = tmp_path_factory.mktemp('captions') / 'captions.txt'
  path.write_text('\n'.join(_captions(100)) + '\n')
  return path


@pytest.fixture
def tiny_tokenizer(tmp_path):
  path = tmp_path / 'vocab.txt'
  path.write_text('\n'.join(TINY_VOCAB) + '\n')
  return tok_lib.load_tokenizer(path)


def _check_contract(tok, texts, max_len):
  """[CLS] first, [SEP] last real token, pad after, mask 1 exactly on real tokens."""
  ids, mask = tok.encode(texts, max_len)
  assert ids.shape == mask.shape == (len(texts), max_len) and ids.dtype == mask.dtype == np.int32
  lengths = mask.sum(1)
  assert np.all(mask == (np.arange(max_len) < lengths[:, None]))
  assert np.all(ids[:, 0] == tok.cls_id)
  assert np.all(ids[np.arange(len(texts)), lengths - 1] == tok.sep_id)
  assert np.all(ids[mask == 0] == tok.pad_id)
  return ids, mask


def test_wordpiece_ids_match_hand_tokenization(tiny_tokenizer):
  ids, mask = tiny_tokenizer.encode(['A Red circles, left of a cat', 'Café BLUE box!', ''], 16)
  expected = [[2, 5, 6, 7, 8, 11, 12, 13, 5, 14, 15, 16, 3],  # circles = circle ##s; cat = c ##a ##t
              [2, 17, 9, 10, 1, 3],  # lowercased, accent stripped; '!' is not in the vocabulary
              [2, 3]]
  for row, m, want in zip(ids, mask, expected):
    assert row.tolist() == want + [0] * (16 - len(want))
    assert m.tolist() == [1] * len(want) + [0] * (16 - len(want))
  assert (tiny_tokenizer.vocab_size, tiny_tokenizer.pad_id, tiny_tokenizer.unk_id, tiny_tokenizer.cls_id,
          tiny_tokenizer.sep_id) == (len(TINY_VOCAB), 0, 1, 2, 3)


def test_truncation_keeps_sep_last(tiny_tokenizer):
  ids, mask = tiny_tokenizer.encode(['A Red circles, left of a cat'], 5)
  assert ids.tolist() == [[2, 5, 6, 7, 3]] and mask.tolist() == [[1] * 5]
  _check_contract(tiny_tokenizer, ['a red box', 'a red circles, left of a cat' * 3], 7)
  with pytest.raises(ValueError, match='max_len'):
    tiny_tokenizer.encode(['a'], 1)


def test_shapes_vocabulary_covers_every_caption_and_is_shipped():
  tok = tok_lib.load_tokenizer('shapes')
  assert tok.vocab_size <= 1024  # the tiny model's embedding table
  assert tok_lib.SHAPES_VOCAB.read_text().splitlines() == shapes_vocab.shapes_vocab()  # shipped file is up to date
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id) == (0, 1, 2, 3)
  texts = _captions(400, seed=3)
  ids, mask = _check_contract(tok, texts, 32)
  assert not np.any(ids == tok.unk_id)
  assert mask.sum(1).max() < 32  # no shapes caption is truncated at the tiny model's length
  # Every word of the grammar is one whole token; an unseen word falls back to characters, not [UNK].
  for word in shapes_captions.vocabulary():
    assert tok.tokenize(word) == [word]
  assert tok.tokenize('zebra') == ['z', '##e', '##b', '##r', '##a']


def test_trained_wordpiece_and_tokenizer_json_agree(captions_file, tmp_path):
  vocab_path = tok_lib.train_tokenizer(captions_file, 200, tmp_path / 'wp')
  assert pathlib.Path(vocab_path).name == 'vocab.txt'
  wp = tok_lib.load_tokenizer(tmp_path / 'wp')  # a folder holding vocab.txt
  assert wp.files == [vocab_path]
  assert wp.vocab_size <= 200 and (wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id) == (0, 1, 2, 3)
  texts = captions_file.read_text().splitlines()
  ids, _ = _check_contract(wp, texts, 24)
  assert not np.any(ids == wp.unk_id)
  # The same vocabulary saved as a Hugging Face tokenizer.json, built here with the library's own BERT pipeline.
  hf = tokenizers.Tokenizer(tokenizers.models.WordPiece.from_file(vocab_path, unk_token='[UNK]'))
  hf.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True, strip_accents=True)
  hf.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  json_path = tmp_path / 'hf' / 'tokenizer.json'
  json_path.parent.mkdir()
  hf.save(str(json_path))
  from_json = tok_lib.load_tokenizer(json_path)
  assert from_json.files == [str(json_path)]
  np.testing.assert_array_equal(from_json.encode(texts, 24)[0], ids)


def test_trained_sentencepiece(captions_file, tmp_path):
  model_path = tok_lib.train_tokenizer(captions_file, 120, tmp_path / 'sp', kind='sentencepiece')
  assert model_path.endswith('.model')
  sp = tok_lib.load_tokenizer(tmp_path / 'sp')  # a folder holding one .model
  assert (sp.pad_id, sp.unk_id, sp.cls_id, sp.sep_id) == (0, 1, 2, 3) and sp.vocab_size <= 120
  texts = captions_file.read_text().splitlines()
  ids, mask = _check_contract(sp, texts + ['A RED Circle'], 24)
  assert not np.any(ids == sp.unk_id)
  # Case-folded: upper case gives the lower-case ids.
  np.testing.assert_array_equal(ids[-1], sp.encode(['a red circle'], 24)[0][0])


def test_missing_paths_are_named(tmp_path):
  missing = tmp_path / 'nowhere' / 'vocab.txt'
  with pytest.raises(FileNotFoundError, match=str(missing)):
    tok_lib.load_tokenizer(missing)
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    tok_lib.load_tokenizer(tmp_path)  # a folder without a tokenizer file
  with pytest.raises(FileNotFoundError, match='captions.txt'):
    tok_lib.train_tokenizer(tmp_path / 'captions.txt', 100, tmp_path / 'out')
  with pytest.raises(ValueError, match='wordpiece'):
    tok_lib.train_tokenizer(tmp_path / 'captions.txt', 100, tmp_path / 'out', kind='bpe')


def test_tokenizer_imports_without_tensorflow():
  code = ('import sys, xmodal.tokenizer as t; t.load_tokenizer("shapes").encode(["a red box"], 8); '
          'assert not [m for m in sys.modules if m.startswith("tensorflow")], "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True)
