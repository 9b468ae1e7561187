"""The shipped `shapes` vocabulary (xmodal/tokenizer/assets/shapes_vocab.txt), generated from the caption templates.

The tokenizer reads the file; this module writes it, so that the tokenizer never imports the dataset.
"""

from __future__ import annotations

import os
import pathlib

from xmodal.data.shapes import captions as shapes_captions
from xmodal.tokenizer import SHAPES_VOCAB, SPECIAL_TOKENS


def shapes_vocab() -> list[str]:
  """The shipped `shapes` vocabulary, in id order: special tokens, characters, then every caption word.

  Single characters and their '##' continuations let any lowercase ASCII word (a user's query) decompose into
  known pieces rather than [UNK]; the caption words make every shapes caption whole words.
  """
  chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
  words = [w for w in shapes_captions.vocabulary() if w not in chars]
  pieces = ['##' + c for c in chars if c.isalnum()]
  return list(SPECIAL_TOKENS) + chars + words + pieces


def write_shapes_vocab(path: str | os.PathLike = SHAPES_VOCAB) -> str:
  """Writes `shapes_vocab()` as a vocab.txt (how assets/shapes_vocab.txt was made); returns the path."""
  pathlib.Path(path).write_text(''.join(f'{t}\n' for t in shapes_vocab()), encoding='utf-8')
  return str(path)
