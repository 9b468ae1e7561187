"""Caption grounding (data.caption_grounding): which words of a caption name which region, from the caption grammar
to character spans, to token labels in the tokenizer's layout, to the training batch's `text_regions`."""

import pathlib

import numpy as np
import pytest

from helpers import micro_config
from xmodal import config as config_lib
from xmodal import tokenizer as tok_lib
from xmodal.config.data import CAPTION_GROUNDINGS, validate_data_config
from xmodal.data.shapes import captions as shapes_captions

REGIONS = ['a small gray square', 'a large blue star', 'a small red circle']


def _named(text, spans):
  return [(text[start:end], region) for start, end, region in spans]


def test_each_phrase_of_a_caption_names_the_region_of_its_colour_and_shape():
  # Synonyms ('grey box' is the gray square, 'disk' the circle), sizes or none, any order of the slots.
  text = 'there is a small grey box, and one red disk is left of a blue star'
  assert _named(text, shapes_captions.ground_caption(text, REGIONS)) == [
      ('a small grey box', 0), ('one red disk', 2), ('a blue star', 1)]
  text = 'three shapes, a big blue star, a little red circle and a gray block'
  assert _named(text, shapes_captions.ground_caption(text, REGIONS + [''])) == [
      ('a big blue star', 1), ('a little red circle', 2), ('a gray block', 0)]


def test_phrases_without_a_region_and_unreadable_captions_are_not_grounded():
  # The green cross is no region of these; padding phrases ('') name nothing.
  text = 'a green cross left of a red circle'
  assert _named(text, shapes_captions.ground_caption(text, REGIONS)) == [('a red circle', 2)]
  assert shapes_captions.ground_caption(text, ['', '']) == []
  # A caption the templates cannot read (a grey example's, its colour words dropped) gives no spans.
  assert shapes_captions.ground_caption('a circle left of a square', REGIONS) == []


def _labels_by_loop(tokenizer, text, spans, max_len):
  """The reference: walk the text's tokens in order, find each one's characters in the text by hand (a SentencePiece
  token's '▁' is the space before it), and label it by the span that holds its last character."""
  labels = [-1] * max_len
  cursor = 0
  for position, token in enumerate(tokenizer.tokenize(text)[:max_len - 2], start=1):
    if token.startswith('▁') and text[cursor:cursor + 1] == ' ':
      cursor += 1
    word = token.removeprefix('##').lstrip('▁')
    if word:
      cursor = text.lower().index(word, cursor) + len(word)
    last = cursor - 1
    labels[position] = next((label for s, e, label in spans if s <= last < e), -1)
  return labels


@pytest.fixture(scope='module')
def sentencepiece(tmp_path_factory):
  folder = tmp_path_factory.mktemp('sp')
  captions = folder / 'captions.txt'
  captions.write_text('\n'.join(['a red circle, left of a blue box', 'two objects: a grey disk and a small star'] * 40))
  return tok_lib.load_tokenizer(tok_lib.train_tokenizer(captions, 60, folder / 'model', kind='sentencepiece'))


@pytest.mark.parametrize('kind', ['shapes', 'sentencepiece'])
def test_span_labels_mark_the_tokens_of_each_span_in_the_encoded_layout(kind, sentencepiece):
  tokenizer = tok_lib.load_tokenizer('shapes') if kind == 'shapes' else sentencepiece
  texts = ['two objects: a red circle, and a blue box', 'a red circle left of a blue box']
  spans = [[(13, 25, 1), (31, 41, 0)], [(0, 12, 0)]]
  for max_len in (24, 6):  # the second cuts the first text's tokens
    labels = tokenizer.span_labels(texts, spans, max_len)
    assert labels.shape == (2, max_len) and labels.dtype == np.int32
    for text, row, text_spans in zip(texts, labels, spans):
      assert row.tolist() == _labels_by_loop(tokenizer, text, text_spans, max_len)
  if kind == 'shapes':  # [CLS] two objects : [a red circle] , and [a blue box] [SEP]
    assert tokenizer.span_labels(texts[:1], spans[:1], 14)[0].tolist() == [-1] * 4 + [1] * 3 + [-1] * 2 + [0] * 3 + [
        -1] * 2


def test_every_grounding_name_has_a_grounder():
  from xmodal.data import pipeline
  assert set(pipeline.GROUNDERS) == set(CAPTION_GROUNDINGS) - {''}


def test_the_training_pipeline_grounds_each_caption_in_its_regions(shapes_dir):
  from xmodal.config.data import data_config
  from xmodal.data import pipeline
  config = data_config(tfds_name=shapes_dir, image_size=32, max_text_len=24, batch_size=16, crop_scale=(1.0, 1.0),
                       region_boxes_key='regions/bbox', region_phrases_key='regions/phrase', max_regions=3,
                       max_phrase_len=8, caption_grounding='shapes')
  tokenizer = pipeline.load_tokenizer(config)
  batch = next(pipeline.train_iterator(config, tokenizer=tokenizer))
  vocab = pathlib.Path(tok_lib.SHAPES_VOCAB).read_text().split('\n')
  assert batch['text_regions'].shape == (16, 24)
  grounded = 0
  for ids, named, phrases, valid in zip(batch['text_ids'], batch['text_regions'], batch['region_ids'],
                                        batch['region_valid']):
    words = [vocab[i] for i in ids]
    for position in np.flatnonzero(named >= 0):
      region = named[position]
      assert valid[region]
      # Every grounded word is part of a phrase whose colour and shape are its region's (synonyms aside).
      colour, shape = (vocab[i] for i in phrases[region][3:5])
      phrase = _phrase_around(words, position)
      canonical = shapes_captions.Phrase('a', None, phrase[-2], phrase[-1]).canonical()
      assert canonical[:2] == (colour, shape), (words, position, colour, shape)
      grounded += 1
    # Each caption names at least one of its image's objects, all of them grounded ([CLS] and [SEP] never).
    assert (named >= 0).any() and named[0] == -1
  assert grounded > 16 * 3


def _phrase_around(words, position):
  """The noun phrase (determiner ... shape word) that holds the word at `position`."""
  end = position
  while words[end] not in {w for ws in shapes_captions.SHAPE_WORDS.values() for w in ws}:
    end += 1
  start = position
  while words[start] not in shapes_captions.DETERMINERS:
    start -= 1
  return words[start:end + 1]


@pytest.mark.parametrize('change, message', [
    ({'data.caption_grounding': 'flickr'}, "'flickr' is not one of"),
    ({'data.region_boxes_key': '', 'data.region_phrases_key': ''}, 'set data.region_boxes_key'),
    ({'loss.locate_weight': 0.0}, 'set loss.locate_weight > 0'),
])
def test_caption_grounding_fails_early_on_what_it_needs(change, message):
  config = micro_config()
  config.data.update(crop_scale=(1.0, 1.0), region_boxes_key='regions/bbox', region_phrases_key='regions/phrase',
                     caption_grounding='shapes')
  config.model.fusion_locator = True
  config.loss.locate_weight = 1.0
  check = lambda: (validate_data_config(config.data), config_lib.validate(config))
  check()
  for field, value in change.items():
    section, name = field.split('.')
    config[section][name] = value
  with pytest.raises(ValueError, match=message):
    check()
