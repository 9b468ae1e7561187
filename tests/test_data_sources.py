"""Each real source read end to end on tiny files written here; bad input skipped and counted exactly."""

import os
import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import WordTokenizer, caption, image_bytes, small_config, write_folder, write_tfrecord, write_wds
from xmodal.data import pipeline, sources

TOKENIZER = WordTokenizer()


def eval_all(config, **kwargs):
  iterator = pipeline.eval_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1, **kwargs)
  batches = list(iterator)
  return batches, iterator.stats()


def valid_ids(batches):
  return [int(i) for b in batches for i, v in zip(b['image_ids'], b['valid']) if v]


def train_batches(config, n):
  iterator = pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1)
  return [next(iterator) for _ in range(n)], iterator


def assert_train_layout(batch, config):
  b, s, l = config.batch_size, config.image_size, config.max_text_len
  assert batch['images'].shape == (b, s, s, 3) and batch['images'].dtype == np.float32
  assert batch['text_ids'].shape == (b, l) and batch['text_ids'].dtype == np.int32
  assert batch['text_mask'].shape == (b, l) and batch['text_mask'].dtype == np.int32
  assert batch['image_ids'].shape == (b,) and batch['image_ids'].dtype == np.int64


def test_wds_shards_yield_every_example_once_and_train_batches(tmp_path):
  for s in range(3):
    write_wds(tmp_path / f'shard{s}.tar', range(s * 5, s * 5 + 5))
  config = small_config(source='wds', train_shards=str(tmp_path / '*.tar'), eval_shards=str(tmp_path / '*.tar'))
  batches, stats = eval_all(config)
  assert sorted(valid_ids(batches)) == list(range(15))
  assert stats == {'consumed': 15, 'yielded': 15, 'truncated': 0, 'empty_caption': 0, 'bad_image': 0}
  train, _ = train_batches(config, 5)
  assert_train_layout(train[0], config)
  assert set(np.concatenate([b['image_ids'] for b in train])) <= set(range(15))


def test_wds_json_members_carry_several_captions(tmp_path):
  write_wds(tmp_path / 'a.tar', range(6), json_captions=3)
  config = small_config(source='wds', eval_shards=str(tmp_path / '*.tar'))
  batches, _ = eval_all(config)
  for b in batches:
    assert (b['text_valid'].sum(1) == np.where(b['valid'], 3, 0)).all()
  expected = TOKENIZER.encode([caption(4, 2)], config.max_text_len)[0][0]
  row = [(b, i) for b in batches for i in range(4) if b['valid'][i] and b['image_ids'][i] == 4][0]
  np.testing.assert_array_equal(row[0]['text_ids'][row[1], 2], expected)


def test_tfrecord_shards_group_captions_with_their_image(tmp_path):
  for s in range(2):
    write_tfrecord(tmp_path / f'part{s}.tfrecord', range(s * 7, s * 7 + 7), captions=2)
  config = small_config(source='tfrecord', train_shards=str(tmp_path / '*.tfrecord'),
                        eval_shards=str(tmp_path / '*.tfrecord'))
  batches, stats = eval_all(config)
  assert sorted(valid_ids(batches)) == list(range(14))
  assert stats['yielded'] == 14 and stats['consumed'] == 14
  for b in batches:
    assert b['text_ids'].shape == (4, config.max_captions, config.max_text_len)
    for i in np.flatnonzero(b['valid']):
      ids = TOKENIZER.encode([caption(int(b['image_ids'][i]), k) for k in range(2)], config.max_text_len)[0]
      np.testing.assert_array_equal(b['text_ids'][i, :2], ids)
      assert list(b['text_valid'][i]) == [True, True, False, False, False]
  assert not batches[-1]['valid'][2:].any()  # 14 = 3 * 4 + 2: the last batch is padded
  train, _ = train_batches(config, 4)
  assert_train_layout(train[0], config)


@pytest.mark.parametrize('fmt', ['csv', 'jsonl'])
def test_folder_rows_are_grouped_per_image(tmp_path, fmt):
  path = write_folder(tmp_path / 'images', 9, captions_per_image=3, fmt=fmt)
  config = small_config(source='folder', folder=str(tmp_path / 'images'), train_captions=path, eval_captions=path)
  batches, stats = eval_all(config)
  assert sorted(valid_ids(batches)) == list(range(9))  # image id = order of first appearance
  assert stats['yielded'] == 9
  for b in batches:
    assert (b['text_valid'].sum(1) == np.where(b['valid'], 3, 0)).all()
  train, _ = train_batches(config, 3)
  assert_train_layout(train[0], config)


def coco_like_examples(self, split, decoders=None, read_config=None, **kwargs):
  """COCO-captions-shaped examples ('image/id' a flat key, 'captions/text' nested), image left encoded.

  tfds' own random mock gives COCO's 'captions' sub-fields different lengths, which tfds then rejects.
  """
  del self, split, decoders, read_config, kwargs
  examples = {'image': [image_bytes(i) for i in range(10)], 'image/id': np.arange(100, 110, dtype=np.int64),
              'captions': {'id': np.arange(50).reshape(10, 5), 'text': [[caption(i, k) for k in range(5)]
                                                                        for i in range(10)]}}
  return tf.data.Dataset.from_tensor_slices(examples)


def test_tfds_coco_captions_with_mock_data():
  config = small_config(source='tfds', tfds_name='coco_captions', captions_key='captions/text', id_key='image/id',
                        train_split='train', eval_split='val', tfds_access='stream')
  with tfds.testing.mock_data(num_examples=10, as_dataset_fn=coco_like_examples):
    batches, stats = eval_all(config)
    train, _ = train_batches(config, 3)
  assert sorted(valid_ids(batches)) == list(range(100, 110))
  assert stats['yielded'] == 10 and all((b['text_valid'].sum(1) == 5 * b['valid']).all() for b in batches)
  assert_train_layout(train[0], config)


def test_tfds_array_record_shapes_reads_by_index(tmp_path):
  from xmodal.data.shapes import builder as shapes
  builder = shapes.XmodalShapes(config=shapes.shapes_config(train_size=12, validation_size=6, test_size=2,
                                                             test_hard_size=2, validation_hard_size=2),
                                data_dir=str(tmp_path))
  builder.download_and_prepare()
  config = small_config(source='tfds', tfds_name=str(builder.data_dir), eval_split='validation')
  batches, stats = eval_all(config)
  assert sorted(valid_ids(batches)) == list(range(6))
  assert stats['consumed'] == 6 and stats['yielded'] == 6
  assert all((b['text_valid'].sum(1) == np.where(b['valid'], 5, 0)).all() for b in batches)
  train, _ = train_batches(config, 6)  # 24 examples: two epochs of 12
  ids = np.concatenate([b['image_ids'] for b in train])
  assert sorted(ids[:12]) == list(range(12)) and sorted(ids[12:]) == list(range(12))


# ---------------------------------------------------------------------------------------------------- bad input


def test_wds_corrupt_image_empty_caption_and_truncated_shard_are_counted(tmp_path):
  write_wds(tmp_path / 'a.tar', range(10), bad={2, 5}, empty={7})
  write_wds(tmp_path / 'b.tar', range(10, 20))
  data = (tmp_path / 'b.tar').read_bytes()
  # Cut inside the data of record 13's image: records 10-12 survive, 13 is truncated, 14-19 are lost.
  member_offset = data.index(b'000013.png')
  (tmp_path / 'b.tar').write_bytes(data[:member_offset + 512 + 20])
  config = small_config(source='wds', eval_shards=str(tmp_path / '*.tar'), train_shards=str(tmp_path / '*.tar'))
  batches, stats = eval_all(config)
  assert sorted(valid_ids(batches)) == [0, 1, 3, 4, 6, 8, 9, 10, 11, 12]
  assert stats == {'consumed': 14, 'yielded': 10, 'truncated': 1, 'empty_caption': 1, 'bad_image': 2}
  train, iterator = train_batches(config, 5)  # 20 examples = exactly two epochs of 10 good ones
  assert iterator.stats() == {'consumed': 28, 'yielded': 20, 'truncated': 2, 'empty_caption': 2, 'bad_image': 4}
  assert not {2, 5, 7, 13} & set(np.concatenate([b['image_ids'] for b in train]))


def test_tfrecord_corrupt_and_truncated_records_are_counted(tmp_path):
  write_tfrecord(tmp_path / 'a.tfrecord', range(8), bad={1}, empty={4})
  write_tfrecord(tmp_path / 'b.tfrecord', range(8, 12))
  data = (tmp_path / 'b.tfrecord').read_bytes()
  (tmp_path / 'b.tfrecord').write_bytes(data[:-30])  # the last record loses its tail
  assert sources.count_complete_tfrecords(str(tmp_path / 'b.tfrecord')) == (3, True)
  config = small_config(source='tfrecord', eval_shards=str(tmp_path / '*.tfrecord'))
  batches, stats = eval_all(config)
  assert sorted(valid_ids(batches)) == [0, 2, 3, 5, 6, 7, 8, 9, 10]
  assert stats == {'consumed': 12, 'yielded': 9, 'truncated': 1, 'empty_caption': 1, 'bad_image': 1}


def test_folder_undecodable_image_and_empty_caption_are_counted(tmp_path):
  path = write_folder(tmp_path / 'images', 6, captions_per_image=2, bad={1}, empty={3})
  config = small_config(source='folder', folder=str(tmp_path / 'images'), eval_captions=path)
  batches, stats = eval_all(config)
  assert sorted(valid_ids(batches)) == [0, 2, 4, 5]
  assert stats == {'consumed': 6, 'yielded': 4, 'truncated': 0, 'empty_caption': 1, 'bad_image': 1}


def test_missing_paths_are_errors_naming_them(tmp_path):
  pattern = str(tmp_path / 'nothing-*.tar')
  with pytest.raises(FileNotFoundError, match='nothing-'):
    pipeline.eval_iterator(small_config(source='wds', eval_shards=pattern), tokenizer=TOKENIZER,
                           process_index=0, process_count=1)
  missing = str(tmp_path / 'no-such.csv')
  (tmp_path / 'images').mkdir()
  with pytest.raises(FileNotFoundError, match='no-such.csv'):
    pipeline.eval_iterator(small_config(source='folder', folder=str(tmp_path / 'images'), eval_captions=missing),
                           tokenizer=TOKENIZER, process_index=0, process_count=1)
  path = write_folder(tmp_path / 'images', 2)
  os.remove(tmp_path / 'images' / 'img1.png')
  with pytest.raises(FileNotFoundError, match='img1.png'):
    pipeline.eval_iterator(small_config(source='folder', folder=str(tmp_path / 'images'), eval_captions=path),
                           tokenizer=TOKENIZER, process_index=0, process_count=1)


def test_a_reader_failing_on_every_record_is_an_error_not_an_endless_skip(tmp_path, monkeypatch):
  # Only undecodable images are skipped: an error of the reader itself must reach the caller.
  def fail(meta):
    with tf.control_dependencies([tf.debugging.assert_less(meta['index'], tf.constant(-1, tf.int64),
                                                           message='reader broke')]):
      return {**{k: tf.identity(v) for k, v in meta.items()}, 'encoded': tf.constant(image_bytes(0)),
              'texts': tf.constant(['a caption']), 'image_id': meta['index'],
              'status': tf.constant(sources.STATUS_OK)}

  def failing_read(indices):
    return indices.unbatch().map(fail)

  monkeypatch.setattr(pipeline, 'build_source',
                      lambda *args, **kwargs: sources.IndexedSource(size=10, read=failing_read))
  config = small_config(source='folder', folder=str(tmp_path), train_captions='unused.csv')
  iterator = pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1)
  outcome = []
  worker = threading.Thread(target=lambda: outcome.append(_raised(lambda: next(iterator))), daemon=True)
  worker.start()
  worker.join(timeout=120)
  assert outcome, 'the pipeline kept skipping a reader error instead of raising it'
  assert isinstance(outcome[0], tf.errors.InvalidArgumentError) and 'reader broke' in str(outcome[0])


def _raised(fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001  (any error ends the wait; the test inspects it)
    return e
  return None
