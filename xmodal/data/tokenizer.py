"""Text tokenizers behind one interface: BERT WordPiece `vocab.txt`, Hugging Face `tokenizer.json`, SentencePiece.

  tok = load_tokenizer('shapes')                    # or a path to vocab.txt / tokenizer.json / *.model / a folder
  ids, mask = tok.encode(['a red circle'], 32)       # int32 (N, 32) each: [CLS] tokens [SEP] [PAD]...

Everything is read from local files with the `tokenizers` and `sentencepiece` libraries: no TensorFlow, so an
inference server can tokenize queries without it. `tok.files` lists what was loaded, for export bundles.
"""

from __future__ import annotations

import abc
import os
import pathlib
from typing import Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers

SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')  # ids 0-4 in every vocabulary xmodal writes
SHAPES_VOCAB = pathlib.Path(__file__).parent / 'assets' / 'shapes_vocab.txt'
KINDS = ('wordpiece', 'sentencepiece')


class Tokenizer(abc.ABC):
  """Turns texts into fixed-length id and mask arrays; subclasses only split a text into vocabulary ids."""

  def __init__(self, files: list[str], vocab_size: int, pad_id: int, cls_id: int, sep_id: int, unk_id: int):
    self.files = files
    self.vocab_size = vocab_size
    self.pad_id, self.cls_id, self.sep_id, self.unk_id = pad_id, cls_id, sep_id, unk_id

  @abc.abstractmethod
  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    """Vocabulary ids of each text, without special tokens."""

  def encode(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`[CLS] tokens [SEP]`, truncated to max_len (keeping [SEP] last) and right-padded with pad_id.

    Args:
      texts: N strings.
      max_len: the output length L, >= 2.

    Returns:
      ids: int32 (N, L); mask: int32 (N, L), 1 on [CLS], the tokens and [SEP], 0 on padding.
    """
    if max_len < 2:
      raise ValueError(f'max_len must leave room for [CLS] and [SEP]; got {max_len}')
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)
    lengths = np.empty(len(texts), np.int64)
    for i, tokens in enumerate(self.token_ids(list(texts))):
      n = min(len(tokens), max_len - 2)
      ids[i, 1:n + 1] = tokens[:n]
      ids[i, n + 1] = self.sep_id
      lengths[i] = n + 2
    ids[:, 0] = self.cls_id
    mask = (np.arange(max_len)[None, :] < lengths[:, None]).astype(np.int32)
    return ids, mask


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer`: a WordPiece vocab.txt wrapped like bert-base-uncased, or any tokenizer.json."""

  def __init__(self, tok: tokenizers.Tokenizer, files: list[str], cls: str, sep: str, pad: str, unk: str):
    ids = {t: tok.token_to_id(t) for t in (cls, sep, pad, unk)}
    missing = [t for t in (cls, sep, pad) if ids[t] is None]
    if missing:
      raise ValueError(f'{files[0]}: vocabulary lacks special tokens {missing}')
    super().__init__(files, tok.get_vocab_size(with_added_tokens=True), ids[pad], ids[cls], ids[sep],
                     ids[unk] if ids[unk] is not None else -1)
    # A tokenizer.json may carry its own padding/truncation settings: they would count pads as real tokens.
    tok.no_padding()
    tok.no_truncation()
    self._tok = tok
    # The Rust batch encoder without offsets: several times faster than `encode_batch` on short captions.
    self._encode_batch = getattr(tok, 'encode_batch_fast', tok.encode_batch)

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._encode_batch(texts, add_special_tokens=False)]

  def tokenize(self, text: str) -> list[str]:
    """The word pieces of one text (for inspection and tests)."""
    return self._tok.encode(text, add_special_tokens=False).tokens


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model`; [CLS]/[SEP]/[PAD] are its pieces of those names, else its bos/eos/pad ids."""

  def __init__(self, path: str):
    sp = spm.SentencePieceProcessor(model_file=path)

    def piece_or(piece: str, fallback: int) -> int:
      i = sp.piece_to_id(piece)
      return i if sp.id_to_piece(i) == piece else fallback

    cls, sep = piece_or('[CLS]', sp.bos_id()), piece_or('[SEP]', sp.eos_id())
    if cls < 0 or sep < 0:
      raise ValueError(f'{path}: model has neither [CLS]/[SEP] pieces nor bos/eos ids')
    pad = piece_or('[PAD]', sp.pad_id())
    # Without a pad piece any id will do: the mask, not the id, marks padding.
    super().__init__([path], sp.get_piece_size(), pad if pad >= 0 else 0, cls, sep, sp.unk_id())
    self._sp = sp

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts))

  def tokenize(self, text: str) -> list[str]:
    return self._sp.encode(text, out_type=str)


def _wordpiece(vocab: dict[str, int] | str) -> tokenizers.Tokenizer:
  """bert-base-uncased's pipeline around a WordPiece vocabulary (a vocab.txt path or a token → id dict)."""
  model = models.WordPiece.from_file(vocab, unk_token='[UNK]') if isinstance(vocab, str) else models.WordPiece(
      vocab, unk_token='[UNK]')
  tok = tokenizers.Tokenizer(model)
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                              lowercase=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece()
  return tok


def _load_file(path: pathlib.Path) -> Tokenizer:
  if path.suffix == '.json':
    tok = tokenizers.Tokenizer.from_file(str(path))
    vocab = tok.get_vocab(with_added_tokens=True)
    # BERT-style names first, then RoBERTa/XLM-style ones.
    names = ('[CLS]', '[SEP]', '[PAD]', '[UNK]') if '[CLS]' in vocab else ('<s>', '</s>', '<pad>', '<unk>')
    return HFTokenizer(tok, [str(path)], *names)
  if path.suffix == '.model':
    return SentencePieceTokenizer(str(path))
  if path.suffix == '.txt':
    return HFTokenizer(_wordpiece(str(path)), [str(path)], '[CLS]', '[SEP]', '[PAD]', '[UNK]')
  raise ValueError(f'{path}: not a tokenizer file; expected vocab.txt, tokenizer.json or a SentencePiece .model')


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
  """'shapes' (the shipped vocabulary) or a vocab.txt / tokenizer.json / .model file, or a folder holding one.

  A folder is searched for tokenizer.json, then vocab.txt, then a single *.model.
  """
  if str(spec) == 'shapes':
    return _load_file(SHAPES_VOCAB)
  path = pathlib.Path(spec).expanduser()
  if not path.exists():
    raise FileNotFoundError(f'tokenizer path does not exist: {path}')
  if path.is_dir():
    models_found = sorted(path.glob('*.model'))
    for candidate in (path / 'tokenizer.json', path / 'vocab.txt'):
      if candidate.is_file():
        return _load_file(candidate)
    if len(models_found) == 1:
      return _load_file(models_found[0])
    raise FileNotFoundError(f'{path}: expected tokenizer.json, vocab.txt or one *.model in it; found '
                            f'{sorted(p.name for p in path.iterdir())}')
  return _load_file(path)


def train_tokenizer(input_path: str | os.PathLike, vocab_size: int, out_dir: str | os.PathLike,
                    kind: str = 'wordpiece') -> str:
  """Trains a vocabulary on a captions file (one caption per line); returns the written vocab.txt or .model path.

  Both kinds put [PAD], [UNK], [CLS], [SEP], [MASK] at ids 0-4 and lowercase (WordPiece also strips accents, like
  bert-base-uncased). SentencePiece stops below vocab_size when the text has fewer distinct pieces.
  """
  if kind not in KINDS:
    raise ValueError(f'unknown tokenizer kind {kind!r}; valid: {KINDS}')
  input_path, out_dir = pathlib.Path(input_path), pathlib.Path(out_dir)
  if not input_path.is_file():
    raise FileNotFoundError(f'captions file does not exist: {input_path}')
  out_dir.mkdir(parents=True, exist_ok=True)
  if kind == 'wordpiece':
    tok = _wordpiece({})
    trainer = tokenizers.trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                                   show_progress=False)
    tok.train([str(input_path)], trainer)
    # vocab.txt lists tokens in id order, one a line: the format BERT checkpoints ship.
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    out = out_dir / 'vocab.txt'
    out.write_text(''.join(f'{t}\n' for t, _ in vocab), encoding='utf-8')
    return str(out)
  prefix = out_dir / 'spm'
  spm.SentencePieceTrainer.train(
      input=str(input_path), model_prefix=str(prefix), vocab_size=vocab_size, model_type='unigram',
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece='[PAD]', unk_piece='[UNK]', bos_piece='[CLS]',
      eos_piece='[SEP]', user_defined_symbols=['[MASK]'], normalization_rule_name='nmt_nfkc_cf',
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  return f'{prefix}.model'


def shapes_vocab() -> list[str]:
  """The shipped `shapes` vocabulary, in id order: special tokens, characters, then every caption word.

  Single characters and their '##' continuations let any lowercase ASCII word (a user's query) decompose into
  known pieces rather than [UNK]; the caption words make every shapes caption whole words.
  """
  from xmodal.data.shapes import captions as shapes_captions  # pylint: disable=g-import-not-at-top  # only when regenerating

  chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
  words = [w for w in shapes_captions.vocabulary() if w not in chars]
  pieces = ['##' + c for c in chars if c.isalnum()]
  return list(SPECIAL_TOKENS) + chars + words + pieces


def write_shapes_vocab(path: str | os.PathLike = SHAPES_VOCAB) -> str:
  """Writes `shapes_vocab()` as a vocab.txt (how assets/shapes_vocab.txt was made); returns the path."""
  pathlib.Path(path).write_text(''.join(f'{t}\n' for t in shapes_vocab()), encoding='utf-8')
  return str(path)
