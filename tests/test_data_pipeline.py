"""Preprocessing properties, determinism, exact resume, evaluation coverage and host→global assembly."""

import json

import jax
import numpy as np
import pytest
import tensorflow as tf

from helpers import WordTokenizer, image_bytes, small_config, write_folder, write_wds
from xmodal.config.data import data_config
from xmodal.data import pipeline, preprocess
from xmodal.sharding import host_to_global

TOKENIZER = WordTokenizer()
MEAN, STD = (10.0, 20.0, 30.0), (2.0, 4.0, 8.0)


def train(config, state=None, process_index=0, process_count=1):
  return pipeline.train_iterator(config, tokenizer=TOKENIZER, state=state, process_index=process_index,
                                 process_count=process_count)


def assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(params=['folder', 'wds'])
def config(request, tmp_path):
  """An index-addressable (folder) and a streaming (wds) source of 10 images each."""
  if request.param == 'folder':
    path = write_folder(tmp_path / 'images', 10, captions_per_image=3)
    return small_config(source='folder', folder=str(tmp_path / 'images'), train_captions=path, eval_captions=path)
  for s in range(3):
    write_wds(tmp_path / f'{s}.tar', range(s * 4, s * 4 + 4), json_captions=3)
  return small_config(source='wds', train_shards=str(tmp_path / '*.tar'), eval_shards=str(tmp_path / '*.tar'))


# ---------------------------------------------------------------------------------------------------- preprocessing


def test_eval_image_is_numpy_center_crop_of_resized_image():
  encoded = tf.constant(image_bytes(3, size=(40, 30)))
  out = preprocess.eval_image(encoded, size=16, mean=MEAN, std=STD).numpy()
  resized = preprocess.resize_shorter_side(preprocess.decode_rgb(encoded), 16).numpy()
  assert resized.shape == (16, 21, 3)
  expected = (resized[:, 2:18] - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(out, expected, rtol=1e-6)
  assert out.dtype == np.float32


def test_train_image_shape_dtype_and_normalisation():
  pixels = np.full((20, 30, 3), [50, 90, 130], np.uint8)
  encoded = tf.io.encode_png(pixels)
  key = preprocess.example_key(0, tf.constant(1, tf.int64), tf.constant(7, tf.int64))
  out = preprocess.train_image(encoded, key, size=12, scale=(0.5, 1.0), ratio=(0.75, 1.33), mean=MEAN, std=STD,
                               hflip=False).numpy()
  assert out.shape == (12, 12, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, np.broadcast_to([(50 - 10) / 2, (90 - 20) / 4, (130 - 30) / 8], out.shape),
                             rtol=1e-5)


def test_random_crops_depend_only_on_the_key():
  encoded = tf.constant(image_bytes(5, size=(48, 48)))
  crop = lambda e, i: preprocess.decode_random_crop(encoded, preprocess.example_key(0, e, i), (0.2, 0.6),
                                                     (0.75, 1.33)).numpy()
  np.testing.assert_array_equal(crop(tf.constant(0, tf.int64), tf.constant(1, tf.int64)),
                                crop(tf.constant(0, tf.int64), tf.constant(1, tf.int64)))
  shapes = {crop(tf.constant(e, tf.int64), tf.constant(1, tf.int64)).shape for e in range(6)}
  assert len(shapes) > 1


def test_chosen_captions_are_usable_uniform_and_depend_only_on_their_own_key():
  rows = [['a', '', ' b ', 'c'], ['  ', ''], ['only'], []]
  texts = tf.ragged.constant(rows)
  draws = 3000
  counts = [{} for _ in rows]
  for i in range(draws // 100):
    # 100 keys per call: rows repeated, each copy with its own key.
    keys = tf.constant([[5, 4 * (i * 100 + j)] for j in range(100) for _ in rows], tf.int64)
    chosen = preprocess.choose_captions(tf.concat([texts] * 100, 0), keys).numpy()
    for j, caption in enumerate(chosen):
      counts[j % len(rows)][caption] = counts[j % len(rows)].get(caption, 0) + 1
  # Plain reference: a row's choice is one of its non-blank captions, each equally likely; '' if it has none.
  assert set(counts[0]) == {b'a', b' b ', b'c'}
  for n in counts[0].values():
    assert abs(n - draws / 3) < 5 * np.sqrt(draws * (1 / 3) * (2 / 3))
  assert counts[1] == {b'': draws} and counts[2] == {b'only': draws} and counts[3] == {b'': draws}
  # A row's choice does not depend on which rows share the call, nor on its place among them.
  for seed in range(20):
    key = tf.constant([[seed, 8]], tf.int64)
    alone = preprocess.choose_captions(texts[:1], key).numpy()[0]
    others = tf.constant([[1, 2], [3, 4], [6, 7]], tf.int64)
    together = preprocess.choose_captions(tf.concat([texts[1:], texts[:1]], 0), tf.concat([others, key], 0))
    assert together.numpy()[3] == alone


# ---------------------------------------------------------------------------------------------------- determinism


@pytest.mark.slow  # four training pipelines per source
def test_same_seed_same_batches_different_seed_different(config):
  a, b = train(config), train(config)
  for _ in range(4):
    assert_same(next(a), next(b))
  other = data_config(**{**config.to_dict(), 'seed': 1})
  a, c = train(config), train(other)
  assert any(not np.array_equal(next(a)['images'], next(c)['images']) for _ in range(3))


@pytest.mark.slow  # three training pipelines per source
def test_restored_iterator_yields_the_uninterrupted_batches(config):
  reference = train(config)
  expected = [next(reference) for _ in range(9)]  # 36 examples: crosses epoch boundaries of 10 and 12
  interrupted = train(config)
  for _ in range(4):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.state()))  # what JsonSave writes and restores
  resumed = train(config, state=state)
  for batch in expected[4:]:
    assert_same(next(resumed), batch)
  assert resumed.state() == reference.state()


def test_each_epoch_sees_every_example_and_new_captions(tmp_path):
  path = write_folder(tmp_path / 'images', 8, captions_per_image=3)
  config = small_config(source='folder', folder=str(tmp_path / 'images'), train_captions=path)
  iterator = train(config)
  epochs = [np.concatenate([next(iterator)['image_ids'] for _ in range(2)]) for _ in range(4)]
  for ids in epochs:
    assert sorted(ids) == list(range(8))
  assert any(not np.array_equal(epochs[0], e) for e in epochs[1:])  # reshuffled per epoch
  iterator = train(config)
  texts = [next(iterator)['text_ids'] for _ in range(12)]
  assert len({t.tobytes() for t in texts}) > 2


@pytest.mark.slow  # an evaluation and a training pipeline per simulated process
def test_processes_read_disjoint_slices_that_cover_the_split(tmp_path):
  path = write_folder(tmp_path / 'images', 11, captions_per_image=1)
  config = small_config(source='folder', folder=str(tmp_path / 'images'), train_captions=path, eval_captions=path)
  seen, batch_counts = [], []
  for process in range(2):
    iterator = pipeline.eval_iterator(config, tokenizer=TOKENIZER, process_index=process, process_count=2)
    batches = list(iterator)
    batch_counts.append(len(batches))
    assert all(b['images'].shape[0] == 2 for b in batches)  # eval_batch_size 4 over 2 processes
    seen += [int(i) for b in batches for i, v in zip(b['image_ids'], b['valid']) if v]
  assert sorted(seen) == list(range(11))
  assert batch_counts[0] == batch_counts[1] == 3  # the smaller process pads so that both join every step
  ids = [set(np.concatenate([next(train(config, process_index=p, process_count=2))['image_ids']]))
         for p in range(2)]
  assert not ids[0] & ids[1]


def test_restoring_a_state_from_another_source_is_refused(tmp_path, config):
  iterator = train(config)
  next(iterator)
  state = iterator.state()
  state['seed'] = 99
  with pytest.raises(ValueError, match='seed'):
    train(config, state=state)


def test_host_to_global_assembles_the_batch_on_the_mesh():
  devices = np.array(jax.devices()[:8]).reshape(4, 2)
  mesh = jax.sharding.Mesh(devices, ('data', 'tensor'))
  batch = {'images': np.arange(8 * 3, dtype=np.float32).reshape(8, 3), 'image_ids': np.arange(8, dtype=np.int64)}
  arrays = host_to_global(batch, mesh)
  np.testing.assert_array_equal(np.asarray(arrays['images']), batch['images'])
  assert arrays['images'].sharding.spec[0] in ('data', ('data',))
  assert len(arrays['image_ids'].addressable_shards) == 8


def test_processes_together_read_exactly_the_single_process_batches(tmp_path):
  """Global order: the batches of 2 processes, concatenated in process order, are the 1-process batches."""
  path = write_folder(tmp_path / 'images', 10, captions_per_image=3)
  config = small_config(source='folder', folder=str(tmp_path / 'images'), train_captions=path)
  single = train(config)
  halves = [train(config, process_index=p, process_count=2) for p in range(2)]
  for _ in range(6):  # past an epoch boundary (10 examples, batches of 4)
    whole, parts = next(single), [next(h) for h in halves]
    assert_same(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})


def test_pairs_stay_side_by_side_in_every_batch_and_resume_exactly(shapes_dir):
  config = data_config(tfds_name=shapes_dir, image_size=32, max_text_len=24, batch_size=8, pairs=True)
  tokenizer = pipeline.load_tokenizer(config)
  batches = pipeline.train_iterator(config, tokenizer=tokenizer)
  seen = []
  for _ in range(12):  # 96 examples: more than an epoch of the 64-image split
    ids = next(batches)['image_ids']
    assert np.all(ids[0::2] % 2 == 0) and np.array_equal(ids[1::2], ids[0::2] + 1)
    seen.extend(ids[:8])
  assert set(seen[:64]) == set(range(64))  # an epoch still visits every example once
  state = batches.state()
  expected = next(batches)
  resumed = next(pipeline.train_iterator(config, tokenizer=tokenizer, state=state))
  assert_same(expected, resumed)
  with pytest.raises(ValueError, match='even batch'):
    pipeline.train_iterator(data_config(tfds_name=shapes_dir, batch_size=6, pairs=True), tokenizer=tokenizer,
                            process_count=2, process_index=0)
