"""Each real source read end to end on tiny files written here; bad input skipped and counted exactly."""

import io
import os
import tarfile
import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from helpers import WordTokenizer, caption, image_bytes, small_config, write_folder, write_tfrecord, write_wds
from xmodal.data import faults, pipeline, sources

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


def numbers(ids, shards):
  """The sample numbers write_wds gave the images of `ids`; `shards`: {shard path: its sample numbers}."""
  known = {sources.wds_image_id(str(path), f'{i:06d}'): i for path, samples in shards.items() for i in samples}
  return [known[int(i)] for i in ids]


def assert_train_layout(batch, config):
  b, s, l = config.batch_size, config.image_size, config.max_text_len
  assert batch['images'].shape == (b, s, s, 3) and batch['images'].dtype == np.float32
  assert batch['text_ids'].shape == (b, l) and batch['text_ids'].dtype == np.int32
  assert batch['text_mask'].shape == (b, l) and batch['text_mask'].dtype == np.int32
  assert batch['image_ids'].shape == (b,) and batch['image_ids'].dtype == np.int64


def test_wds_shards_yield_every_example_once_and_train_batches(tmp_path):
  shards = {tmp_path / f'shard{s}.tar': range(s * 5, s * 5 + 5) for s in range(3)}
  for path, samples in shards.items():
    write_wds(path, samples)
  config = small_config(source='wds', train_shards=str(tmp_path / '*.tar'), eval_shards=str(tmp_path / '*.tar'))
  batches, stats = eval_all(config)
  assert sorted(numbers(valid_ids(batches), shards)) == list(range(15))
  assert stats == {'consumed': 15, 'yielded': 15, 'truncated': 0, 'empty_caption': 0, 'bad_image': 0}
  train, _ = train_batches(config, 5)
  assert_train_layout(train[0], config)
  assert set(numbers(np.concatenate([b['image_ids'] for b in train]), shards)) <= set(range(15))


def test_wds_json_members_carry_several_captions(tmp_path):
  write_wds(tmp_path / 'a.tar', range(6), json_captions=3)
  config = small_config(source='wds', eval_shards=str(tmp_path / '*.tar'))
  batches, _ = eval_all(config)
  for b in batches:
    assert (b['text_valid'].sum(1) == np.where(b['valid'], 3, 0)).all()
  expected = TOKENIZER.encode([caption(4, 2)], config.max_text_len)[0][0]
  four = sources.wds_image_id(str(tmp_path / 'a.tar'), '000004')
  row = [(b, i) for b in batches for i in range(4) if b['valid'][i] and b['image_ids'][i] == four][0]
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
  shards = {tmp_path / 'a.tar': range(10), tmp_path / 'b.tar': range(10, 20)}
  batches, stats = eval_all(config)
  assert sorted(numbers(valid_ids(batches), shards)) == [0, 1, 3, 4, 6, 8, 9, 10, 11, 12]
  assert stats == {'consumed': 14, 'yielded': 10, 'truncated': 1, 'empty_caption': 1, 'bad_image': 2}
  train, iterator = train_batches(config, 5)  # 20 examples = exactly two epochs of 10 good ones
  assert iterator.stats() == {'consumed': 28, 'yielded': 20, 'truncated': 2, 'empty_caption': 2, 'bad_image': 4}
  assert not {2, 5, 7, 13} & set(numbers(np.concatenate([b['image_ids'] for b in train]), shards))


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
  assert stats == {'consumed': 6, 'yielded': 4, 'truncated': 0, 'empty_caption': 1, 'bad_image': 1,
                   'malformed_row': 0, 'bad_caption': 0, 'invalid_utf8': 0}  # the last three: captions file lines


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
  assert isinstance(outcome[0], faults.ReaderError) and 'reader broke' in str(outcome[0])


def _raised(fn):
  try:
    fn()
  except Exception as e:  # noqa: BLE001  (any error ends the wait; the test inspects it)
    return e
  return None


def _shards_from_zero(tmp_path, shards=3, per_shard=4):
  """WebDataset shards whose keys restart at 000000 in each, as many writers number them."""
  for s in range(shards):
    with tarfile.open(tmp_path / f'{s}.tar', 'w') as tar:
      for i in range(per_shard):
        for ext, payload in (('png', image_bytes(s * per_shard + i)), ('txt', caption(s * per_shard + i).encode())):
          info = tarfile.TarInfo(f'{i:06d}.{ext}')
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))
  return str(tmp_path / '*.tar')


def test_wds_keys_numbered_from_zero_in_every_shard_give_distinct_image_ids(tmp_path):
  config = small_config(source='wds', eval_shards=_shards_from_zero(tmp_path), batch_size=12)
  batches, stats = eval_all(config)
  ids = valid_ids(batches)
  assert stats['yielded'] == 12 and len(set(ids)) == 12  # key 000000 of three shards: three images, three ids


def test_a_shard_glob_matching_a_folder_is_an_error_naming_it(tmp_path):
  write_wds(tmp_path / 'a.tar', range(4))
  (tmp_path / 'b.tar.d').mkdir()
  with pytest.raises(IsADirectoryError, match='b.tar.d'):
    pipeline.eval_iterator(small_config(source='wds', eval_shards=str(tmp_path / '*')), tokenizer=TOKENIZER,
                           process_index=0, process_count=1)


def test_a_wrong_tfrecord_key_fails_before_reading_naming_the_keys_found(tmp_path):
  write_tfrecord(tmp_path / 'a.tfrecord', range(8))
  config = small_config(source='tfrecord', train_shards=str(tmp_path / '*.tfrecord'), tfrecord_caption_key='text')
  with pytest.raises(faults.UnusableSourceError, match=r"tfrecord_caption_key='text'.*caption \(bytes_list\)"):
    train_batches(config, 1)


def _write_examples(path, features):
  with tf.io.TFRecordWriter(str(path)) as writer:
    for feature in features:
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString())


def _example(i, caption_feature=None):
  text = caption_feature or tf.train.Feature(bytes_list=tf.train.BytesList(value=[caption(i).encode()]))
  return {'image/encoded': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes(i)])),
          'caption': text, 'image/id': tf.train.Feature(int64_list=tf.train.Int64List(value=[i]))}


def _first_error(iterator):
  """The error that ends `iterator`, waited for with a hard limit (a hang fails the test instead of the suite)."""
  outcome = []
  worker = threading.Thread(target=lambda: outcome.append(_raised(lambda: [next(iterator) for _ in range(100)])),
                            daemon=True)
  worker.start()
  worker.join(timeout=120)
  assert outcome, 'the pipeline neither yielded nor failed within 120 s'
  return outcome[0]


def test_a_caption_stored_as_int64_past_the_first_records_fails_naming_shard_record_and_type(tmp_path):
  number = tf.train.Feature(int64_list=tf.train.Int64List(value=[7]))
  _write_examples(tmp_path / 'a.tfrecord', [_example(i, number if i == 40 else None) for i in range(60)])
  config = small_config(source='tfrecord', train_shards=str(tmp_path / '*.tfrecord'))
  error = _first_error(pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1))
  assert isinstance(error, faults.ReaderError), error
  assert f"{tmp_path / 'a.tfrecord'}: record 40 (byte " in str(error)
  assert "feature 'caption' (data.tfrecord_caption_key) holds int64_list, not bytes_list" in str(error)


def test_a_corrupted_record_fails_naming_shard_record_and_offset(tmp_path):
  write_tfrecord(tmp_path / 'a.tfrecord', range(20))
  frames, _ = sources.tfrecord_frames(str(tmp_path / 'a.tfrecord'))
  data = bytearray((tmp_path / 'a.tfrecord').read_bytes())
  offset, _ = frames[13]
  data[offset + 40] ^= 0xFF  # inside record 13's payload: its CRC no longer matches
  (tmp_path / 'a.tfrecord').write_bytes(bytes(data))
  config = small_config(source='tfrecord', eval_shards=str(tmp_path / '*.tfrecord'))
  error = _first_error(pipeline.eval_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1))
  assert isinstance(error, faults.ReaderError), error
  assert f"{tmp_path / 'a.tfrecord'}: record 13 (byte {offset})" in str(error) and 'corrupted record' in str(error)


def test_a_python_reader_error_names_the_shard_and_offset(tmp_path, monkeypatch):
  write_wds(tmp_path / 'a.tar', range(6))
  config = small_config(source='wds', train_shards=str(tmp_path / '*.tar'))
  iterator = pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1)
  def fail(*args):
    raise PermissionError('the storage went away')
  monkeypatch.setattr(sources, '_wds_texts', fail)  # read by the reader thread: after the checks, at the first sample
  error = _first_error(iterator)
  assert isinstance(error, faults.ReaderError), error
  assert str(error).startswith(f"{tmp_path / 'a.tar'}: near byte 0: PermissionError: the storage went away")


def test_a_shard_with_no_usable_record_is_an_error_naming_it(tmp_path):
  write_wds(tmp_path / 'a.tar', range(6))
  write_wds(tmp_path / 'b.tar', range(6, 10), empty=set(range(6, 10)))
  config = small_config(source='wds', train_shards=str(tmp_path / '*.tar'))
  error = _first_error(pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1))
  assert isinstance(error, faults.UnusableSourceError), error
  assert str(error).startswith(f"{tmp_path / 'b.tar'}: none of its 4 records")
  assert "the first 16 samples of " + str(tmp_path / 'b.tar') + " have member extensions ['png', 'txt']" in str(error)


def test_records_that_never_decode_stop_training_after_the_limit(tmp_path):
  path = write_folder(tmp_path / 'images', 6, captions_per_image=1, bad=set(range(6)))
  config = small_config(source='folder', folder=str(tmp_path / 'images'), train_captions=path, unusable_limit=100)
  error = _first_error(pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1))
  assert isinstance(error, faults.UnusableSourceError), error
  assert 'no usable example in' in str(error) and 'data.unusable_limit=100' in str(error)


def test_a_stream_epoch_without_records_is_an_error(tmp_path):
  with tarfile.open(tmp_path / 'a.tar', 'w'):
    pass  # a valid, empty tar: an epoch of no record at all
  config = small_config(source='wds', train_shards=str(tmp_path / '*.tar'))
  error = _first_error(pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1))
  assert isinstance(error, faults.UnusableSourceError) and 'epoch 0 had no usable example' in str(error), error


def test_an_evaluation_split_with_no_usable_example_is_an_error(tmp_path):
  path = write_folder(tmp_path / 'images', 3, captions_per_image=1, bad={0, 1, 2})
  config = small_config(source='folder', folder=str(tmp_path / 'images'), eval_captions=path)
  with pytest.raises(faults.UnusableSourceError, match="yielded no usable example.*'bad_image': 3"):
    eval_all(config)


def test_different_images_under_one_id_in_a_batch_are_refused(tmp_path):
  _write_examples(tmp_path / 'a.tfrecord', [{**_example(i), 'image/id': tf.train.Feature(
      int64_list=tf.train.Int64List(value=[i % 3]))} for i in range(12)])
  config = small_config(source='tfrecord', train_shards=str(tmp_path / '*.tfrecord'))
  error = _first_error(pipeline.train_iterator(config, tokenizer=TOKENIZER, process_index=0, process_count=1))
  assert isinstance(error, faults.ImageIdCollisionError) and 'names different images' in str(error), error


def test_colliding_ids_finds_ids_shared_by_different_bytes_only():
  ids = np.array([1, 1, 2, 2, 3])
  fingerprints = np.array([10, 10, 20, 21, 30])  # id 1: one image twice (two captions); id 2: two images
  np.testing.assert_array_equal(pipeline.colliding_ids(ids, fingerprints), [2])


# ------------------------------------------------------------------------------------------- captions files


def _parse(text: bytes, name='captions.jsonl'):
  return sources.parse_captions(io.BytesIO(text), name)


def test_captions_file_policy_counts_invalid_utf8_null_captions_and_malformed_rows():
  lines = [b'{"image": "a.png", "caption": "caf\xe9 au lait"}',  # Latin-1: invalid UTF-8, replaced
           b'{"image": "b.png", "caption": null}',  # not a caption: dropped, never "None"
           b'{"image": "b.png", "captions": ["a real one", 5]}',
           b'{"caption": "no image"}',
           b'[1, 2]',
           b'{"image": "c.png", "caption": "x", "image_id": "seven"}',
           b'not json']
  parsed = _parse(b'\n'.join(lines) + b'\n')
  assert [(image, captions) for image, captions, _, _ in parsed.images] == [
      ('a.png', ['caf\ufffd au lait']), ('b.png', ['a real one'])]
  assert parsed.counts == {'malformed_row': 4, 'bad_caption': 2, 'invalid_utf8': 1}
  byte = lines[0].index(b'\xe9')
  assert parsed.notes[0] == f'captions.jsonl:1: invalid UTF-8 at byte {byte} of the line, replaced by U+FFFD'
  assert 'captions.jsonl:2: caption null is not a string: dropped' in parsed.notes


def test_csv_captions_file_skips_rows_with_a_bad_image_id_or_field_count_and_reads_a_bom():
  text = ('\ufeffimage,caption,image_id\n'
          'a.png,"one",1\n'
          'b.png,"two",x\n'
          'c.png,"three",3,extra\n'
          'a.png,"one again",1\n').encode()
  parsed = _parse(text, 'captions.csv')
  assert [(image, captions, image_id) for image, captions, image_id, _ in parsed.images] == [
      ('a.png', ['one', 'one again'], 1)]
  assert parsed.counts['malformed_row'] == 2
  assert parsed.notes == ["captions.csv:3: image_id 'x' is not an integer: skipped",
                          'captions.csv:4: 4 fields, the header has 3: skipped']


def test_a_captions_file_giving_different_images_one_id_is_refused():
  text = b'image,caption,image_id\na.png,one,5\nb.png,two,5\n'
  with pytest.raises(faults.ImageIdCollisionError, match=r"image_id 5 names 2 different images: 'a.png' \(line 2\), "
                                                         r"'b.png' \(line 3\)"):
    _parse(text, 'captions.csv')
  with pytest.raises(faults.ImageIdCollisionError, match="captions.csv:3: image 'a.png' has image_id 2, but line 2 "):
    _parse(b'image,caption,image_id\na.png,one,1\na.png,two,2\n', 'captions.csv')


def test_describe_skips_words_record_and_file_counts():
  assert faults.describe_skips({'consumed': 10, 'yielded': 10, 'bad_image': 0, 'empty_caption': 0,
                                'truncated': 0}) is None
  assert faults.describe_skips({'consumed': 35, 'yielded': 30, 'bad_image': 2, 'empty_caption': 3, 'truncated': 0,
                                'invalid_utf8': 1}) == (
      'skipped 5 of 35 records read (2 bad image, 3 no usable caption); captions file: 1 line with invalid UTF-8 '
      '(bytes replaced by U+FFFD)')
