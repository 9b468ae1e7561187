"""Training and evaluation input pipelines: source → process slice → order → decode/augment → batch → tokens.

Training batches (per process, B = batch_size // process_count):
  'images' (B, H, W, 3) float32 normalised, 'text_ids' (B, L) int32, 'text_mask' (B, L) int32, 'image_ids' (B,) int64;
  one usable caption per example, chosen with a stateless key of (seed, epoch, example) — a new one each epoch.
Evaluation batches (B = eval_batch_size // process_count, C = max_captions), every example of the split once:
  'images' (B, H, W, 3) float32, 'image_ids' (B,) int64, 'valid' (B,) bool (False on the padding of the last batch),
  'text_ids' (B, C, L) int32, 'text_mask' (B, C, L) int32, 'text_valid' (B, C) bool. Caption (b, c) belongs to
  image b, which is what retrieval metrics need.

Determinism and resume. The iterator state is a small JSON-able dict (`TrainIterator.state()`):
  {'version', 'source', 'seed', 'process_index', 'process_count', 'epoch', 'position', 'consumed', 'yielded',
   'skipped': {'bad_image', 'empty_caption', 'truncated'}}
where `position` is where this process's order continues and `consumed`/`yielded` count records read and examples
batched. `train_iterator(config, state=saved)` yields exactly the batches an uninterrupted iterator yields after the
save:
- index-addressable sources (tfds array_record, folder): one global order, `index_shuffle` of (seed, epoch) over the
  split; process p reads its rows of every global batch (`_indexed_order`), so the assembled global batch does not
  depend on the process count. `position` is the process's place in that order: restoring starts `Dataset.range`
  there, O(1), nothing is re-read.
- streaming sources (WebDataset, TFRecord, tfds non-array_record): shard order per epoch is a stateless permutation
  of (seed, epoch); shards are interleaved deterministically, then shuffled in windows of `shuffle_buffer` records
  by a stateless permutation of (seed, epoch, window). Restoring re-reads the current epoch's records up to the
  saved position and drops them before any decoding: the cost is reading (not decoding) at most one epoch of this
  process's shards.
Augmentation keys are (seed, epoch, index) for indexed sources and (seed, epoch, position) for streams, so resumed
crops and caption choices match too. Each process has its own state (its position differs with skipped records):
save one per process.

Bad input: records without a usable caption and truncated records are dropped per chunk of READ_BATCH records, before
decoding; undecodable images are dropped by an `ignore_errors` that covers decoding alone (`_decoded`), so a failing
reader still raises. `skipped` counts each reason exactly, up to the last example yielded.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from xmodal.data import preprocess, sources
from xmodal.config.data import validate_data_config

STATE_VERSION = 2
STATUS_EMPTY = 2   # No usable caption.
STATUS_END = 3     # End-of-split marker of the evaluation pipeline: lets it count trailing skipped records.
READ_BATCH = 64  # Positions located and records read per step by index-addressable sources.


def _threads(config: ml_collections.ConfigDict) -> int:
  return config.num_parallel_calls if config.num_parallel_calls > 0 else tf.data.AUTOTUNE


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count)


def source_name(config: ml_collections.ConfigDict, split: str) -> str:
  """What the state records about the source, to refuse restoring a state onto a different one."""
  if config.source == 'tfds':
    return f'tfds:{config.tfds_name}:{split}'
  if config.source == 'folder':
    return f'folder:{config.folder}:{config.train_captions if split == "train" else config.eval_captions}'
  return f'{config.source}:{config.train_shards if split == "train" else config.eval_shards}'


def build_source(config: ml_collections.ConfigDict, split: str, process_index: int, process_count: int,
                 shuffle_shards: bool) -> sources.IndexedSource | sources.StreamSource:
  """The source named by the config for `split` ('train' or 'eval'), sliced for this process if streaming."""
  train = split == 'train'
  if config.source == 'folder':
    return sources.folder_source(config.folder, config.train_captions if train else config.eval_captions)
  if config.source == 'tfds':
    builder = sources.tfds_builder(config.tfds_name, config.tfds_data_dir)
    tfds_split = config.train_split if train else config.eval_split
    random = config.tfds_access == 'random' or (
        config.tfds_access == 'auto' and sources.tfds_is_random_access(builder))
    keys = (config.image_key, config.captions_key, config.id_key)
    negatives_key = config.negatives_key if train else ''
    if random:
      return sources.tfds_indexed_source(builder, tfds_split, *keys, negatives_key=negatives_key)
    if negatives_key:
      raise ValueError(f'data.negatives_key: {negatives_key!r} is read by random access only, and '
                       f'{config.tfds_name} is read as a stream (data.tfds_access={config.tfds_access!r})')
    epoch_records = sources.tfds_stream_reader(builder, tfds_split, *keys, process_index, process_count)
    return _SingleStream(epoch_records)
  what = 'data.train_shards' if train else 'data.eval_shards'
  pattern = config.train_shards if train else config.eval_shards
  shards = sources.process_shards(sources.expand_glob(pattern, what), process_index, process_count, pattern)
  if config.source == 'wds':
    reader = sources.wds_reader(config.wds_image_exts, config.wds_text_exts, config.wds_json_caption_keys)
  elif config.source == 'tfrecord':
    reader = sources.tfrecord_reader(config.tfrecord_image_key, config.tfrecord_caption_key, config.tfrecord_id_key)
  else:
    raise ValueError(f'data.source: {config.source!r} is not one of {("tfds", "wds", "tfrecord", "folder")}')
  return sources.StreamSource(shards, reader, seed=config.seed, cycle_length=config.cycle_length,
                              num_parallel_calls=config.num_parallel_calls, shuffle_shards=shuffle_shards)


class _SingleStream:
  """A stream with its own reader (tfds streaming): `epoch_records` as given."""

  def __init__(self, epoch_records):
    self.epoch_records = epoch_records


# ---------------------------------------------------------------------------------------------------- ordering


def _local_count(size: int, process_index: int, process_count: int) -> int:
  return len(range(process_index, size, process_count))


def _indexed_order(source: sources.IndexedSource, seed: int, start: int, batch: int, process_index: int,
                   process_count: int, pairs: bool = False) -> tf.data.Dataset:
  """This process's records from its local stream position `start` on.

  One global order, the same for every process count: global position g is example
  `index_shuffle(g % N, (seed, g // N))` of the N in the split (epoch g // N). Global batch b holds positions
  [b * B, (b + 1) * B), and process p reads rows [p * B/P, (p + 1) * B/P) of each: its local position k is global
  position (k // (B/P)) * B + p * (B/P) + k % (B/P). Assembled across processes, the global batch is exactly the one
  a single process would read, so a run's batches do not depend on how many processes feed it.

  With `pairs`, the permutation moves pairs (examples 2m and 2m+1) as units: global positions 2j and 2j+1 hold one
  pair, so with even (local) batches every pair lands in one batch, side by side.
  """
  size = source.size
  if size == 0:
    raise ValueError('the split has no examples')
  unit = 2 if pairs else 1
  units = size // unit  # an odd example out of pairs is never read
  local = batch // process_count

  def locate(k: tf.Tensor) -> dict:
    # k: (READ_BATCH,) local positions, located vectorised: per-element maps dominate small-image pipelines.
    g = (k // local) * batch + process_index * local + k % local
    epoch, q = g // (units * unit), g % (units * unit)
    # index_shuffle takes one seed per call, and a read batch may straddle epochs: one call per position.
    index = unit * tf.map_fn(lambda eq: tf.random.experimental.index_shuffle(
        eq[1] // unit, tf.stack([tf.constant(seed, tf.int64), eq[0]]),
        tf.constant(units - 1, tf.int64)), (epoch, q), fn_output_signature=tf.int64) + q % unit
    return {'epoch': epoch, 'q': k, 'rel': k - start, 'key': preprocess.example_key(seed, epoch, index),
            'index': index}

  positions = tf.data.Dataset.range(start, np.iinfo(np.int64).max).batch(READ_BATCH).map(locate)
  return source.read(positions)


def _window_shuffle(records: tf.data.Dataset, window: int, seed: int, epoch: tf.Tensor) -> tf.data.Dataset:
  """Permutes each window of `window` records by a stateless permutation of (seed, epoch, window index)."""
  if window <= 1:
    return records

  def pack(record: dict) -> dict:
    # Captions of varying count travel through the batch as one joined string.
    return {**record, 'texts': tf.strings.reduce_join(record['texts'], separator='\x1f')}

  def permute(i: tf.Tensor, block: dict) -> dict:
    key = preprocess.example_key(seed, epoch, -1 - i)
    order = tf.random.experimental.stateless_shuffle(tf.range(tf.shape(block['status'])[0]), seed=key)
    return {k: tf.gather(v, order) for k, v in block.items()}

  def unpack(record: dict) -> dict:
    joined = record['texts']
    texts = tf.cond(tf.strings.length(joined) > 0, lambda: tf.strings.split(joined, '\x1f'),
                    lambda: tf.zeros([0], tf.string))
    return {**record, 'texts': texts}

  return records.map(pack).batch(window).enumerate().map(permute).unbatch().map(unpack)


def _stream_order(source, seed: int, window: int, start_epoch: int, start_q: int) -> tf.data.Dataset:
  """Records from (start_epoch, start_q) on, epoch after epoch, each epoch in a stateless order."""
  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    records = _window_shuffle(source.epoch_records(epoch), window, seed, epoch)
    records = records.enumerate().map(lambda q, r: {**r, 'epoch': epoch, 'q': q,
                                                    'key': preprocess.example_key(seed, epoch, q)})
    # Resume: drop what was consumed before the save, before any decoding.
    return records.skip(tf.where(epoch == start_epoch, tf.constant(start_q, tf.int64), 0))

  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
  return ds.enumerate().map(lambda rel, r: {**r, 'rel': rel})


# ---------------------------------------------------------------------------------------------------- examples


def _checked_chunks(records: tf.data.Dataset, initial_counts: tuple[int, int], captions) -> tf.data.Dataset:
  """Records → chunks of READ_BATCH with statuses and captions, skip counts, and only the usable records left.

  Per chunk, vectorised: each record's status, `captions(texts (k, None) ragged, chunk, negatives (k, None) ragged
  or None)` (a dict of caption fields), and running counts of truncated records and records without a usable
  caption, which are dropped here, before anything is decoded. A tf.data element costs tens of microseconds of
  scheduling whatever it does, so these steps as per-example maps cost more than decoding a small image. STATUS_END
  markers pass through.
  """
  def ragged(x):  # ragged_batch keeps a dimension of static size dense
    return x if isinstance(x, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(x)

  def check(chunk: dict) -> dict:
    texts = ragged(chunk.pop('texts'))
    negatives = ragged(chunk.pop('negatives')) if 'negatives' in chunk else None
    usable = tf.reduce_any(tf.ragged.map_flat_values(preprocess.usable_captions, texts), axis=1)
    status = tf.where(chunk['status'] != sources.STATUS_OK, chunk['status'],
                      tf.where(usable, sources.STATUS_OK, STATUS_EMPTY))
    return {**chunk, 'status': status, **captions(texts, chunk, negatives)}

  def count(totals: tf.Tensor, chunk: dict):
    # Running (truncated, empty) counts up to and including each record, carried from chunk to chunk.
    per_record = tf.stack([chunk['status'] == sources.STATUS_TRUNCATED, chunk['status'] == STATUS_EMPTY], axis=1)
    counts = totals + tf.cumsum(tf.cast(per_record, tf.int64), axis=0)
    return counts[-1], {**chunk, 'counts': counts}

  def usable_only(chunk: dict) -> dict:
    keep = (chunk['status'] == sources.STATUS_OK) | (chunk['status'] == STATUS_END)
    return {k: tf.boolean_mask(v, keep) for k, v in chunk.items()}

  chunks = records.ragged_batch(READ_BATCH).map(check)
  return chunks.scan(tf.constant(initial_counts, tf.int64), count).map(usable_only)


def _decoded(chunks: tf.data.Dataset, decode, threads: int) -> tf.data.Dataset:
  """The chunks' examples one by one through `decode`; those whose image fails to decode are dropped.

  Dropped examples count as records read but not yielded. `ignore_errors` sits on each chunk's own dataset so that
  it hides decoding errors only: over the whole pipeline it would also swallow the reader's errors, and a source
  failing on every record would loop forever.
  """
  return chunks.interleave(lambda chunk: tf.data.Dataset.from_tensor_slices(chunk).map(decode).ignore_errors(),
                           cycle_length=threads, block_length=READ_BATCH, num_parallel_calls=threads,
                           deterministic=True)


def _train_example(config: ml_collections.ConfigDict, example: dict) -> dict:
  """A usable example → its normalised (H, W, 3) float32 random crop; raises on bad image bytes.

  The only per-example work: images differ in size and a bad one must cost only itself. Normalising here, on a
  small image, is cheaper than on a whole batch (which does not stay in cache).
  """
  image = preprocess.train_image(example.pop('encoded'), example.pop('key'), size=config.image_size,
                                 scale=config.crop_scale, ratio=config.crop_ratio, mean=config.mean, std=config.std,
                                 hflip=config.hflip)
  example.pop('status')
  return {**example, 'image': image}


def _tokenize_fn(tokenizer, max_len: int):
  def encode(texts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    flat = [t.decode('utf-8', errors='replace') for t in texts.reshape([-1])]
    ids, mask = tokenizer.encode(flat, max_len)
    shape = texts.shape + (max_len,)
    return np.asarray(ids, np.int32).reshape(shape), np.asarray(mask, np.int32).reshape(shape)

  def tokenize(texts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    ids, mask = tf.numpy_function(encode, [texts], [tf.int32, tf.int32], stateful=False)
    shape = texts.shape.concatenate([max_len])
    ids.set_shape(shape)
    mask.set_shape(shape)
    return ids, mask
  return tokenize


def load_tokenizer(config: ml_collections.ConfigDict):
  from xmodal.tokenizer import load_tokenizer as load  # pylint: disable=g-import-not-at-top
  return load(config.tokenizer)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return ds.with_options(options)


# ---------------------------------------------------------------------------------------------------- training


def initial_state(config: ml_collections.ConfigDict, process_index: int, process_count: int) -> dict:
  """The state of a fresh training iterator."""
  return {'version': STATE_VERSION, 'source': source_name(config, 'train'), 'seed': int(config.seed),
          'process_index': process_index, 'process_count': process_count, 'epoch': 0, 'position': 0,
          'consumed': 0, 'yielded': 0, 'skipped': {'bad_image': 0, 'empty_caption': 0, 'truncated': 0}}


def _check_state(state: dict, fresh: dict) -> None:
  for key in ('version', 'source', 'seed', 'process_index', 'process_count'):
    if state.get(key) != fresh[key]:
      raise ValueError(f'data iterator state has {key}={state.get(key)!r} but this pipeline has {fresh[key]!r}; '
                       'a state restores only onto the same source, seed and process layout')


class TrainIterator(Iterator[dict]):
  """Infinite training batches (numpy) with a JSON-able `state()`; see the module docstring."""

  def __init__(self, dataset: tf.data.Dataset, state: dict, batch_size: int):
    self._state = {**state, 'skipped': dict(state['skipped'])}
    self._start = dict(self._state, skipped=dict(self._state['skipped']))
    self._batch_size = batch_size
    self._iterator = dataset.as_numpy_iterator()

  def __next__(self) -> dict:
    batch = next(self._iterator)
    start, state = self._start, self._state
    state['epoch'] = int(batch['epoch'][-1])
    state['position'] = int(batch['q'][-1]) + 1
    state['consumed'] = start['consumed'] + int(batch['rel'][-1]) + 1
    state['yielded'] += self._batch_size
    truncated, empty = (int(c) for c in batch['counts'][-1])
    skipped = state['consumed'] - state['yielded']
    state['skipped'] = {'truncated': truncated, 'empty_caption': empty, 'bad_image': skipped - truncated - empty}
    out = {'images': batch['images'], 'text_ids': batch['text_ids'], 'text_mask': batch['text_mask'],
           'image_ids': batch['image_ids']}
    if 'negative_ids' in batch:
      out.update(negative_ids=batch['negative_ids'], negative_mask=batch['negative_mask'],
                 negative_valid=batch['negative_valid'])
    return out

  def state(self) -> dict:
    """The JSON-able state after the last batch returned; pass it to `train_iterator(..., state=)` to resume."""
    return {**self._state, 'skipped': dict(self._state['skipped'])}

  def stats(self) -> dict:
    """Records read, examples yielded and skipped by reason, for logging."""
    return {'consumed': self._state['consumed'], 'yielded': self._state['yielded'], **self._state['skipped']}


def train_dataset(config: ml_collections.ConfigDict, tokenizer, state: dict, process_index: int,
                  process_count: int) -> tf.data.Dataset:
  """The training tf.data pipeline from `state` on; elements are batches with bookkeeping fields."""
  if config.batch_size % process_count:
    raise ValueError(f'data.batch_size={config.batch_size} is not divisible by {process_count} processes')
  batch = config.batch_size // process_count
  source = build_source(config, 'train', process_index, process_count, shuffle_shards=True)
  if config.pairs and (batch % 2 or not isinstance(source, sources.IndexedSource)):
    raise ValueError(f'data.pairs keeps examples 2m and 2m+1 in one batch: it needs a random-access source and an '
                     f'even batch per process, got {type(source).__name__} and {batch}')
  if isinstance(source, sources.IndexedSource):
    # 'position' is the local stream position (see _indexed_order); 'epoch' is informational.
    ds = _indexed_order(source, config.seed, state['position'], config.batch_size, process_index, process_count,
                        pairs=config.pairs)
  else:
    ds = _stream_order(source, config.seed, config.shuffle_buffer, state['epoch'], state['position'])
  def choose(texts: tf.RaggedTensor, chunk: dict, negatives: tf.RaggedTensor | None) -> dict:
    chosen = {'text': preprocess.choose_captions(texts, chunk['key'])}
    if negatives is not None:  # '' where an example has none
      chosen['negative'] = preprocess.choose_captions(negatives, preprocess.subkey(chunk['key'], 3))
    return chosen
  ds = _checked_chunks(ds, (state['skipped']['truncated'], state['skipped']['empty_caption']), choose)
  ds = _decoded(ds, lambda e: _train_example(config, e), _threads(config))
  ds = ds.batch(batch, drop_remainder=True)
  tokenize = _tokenize_fn(tokenizer, config.max_text_len)

  def finish(b: dict) -> dict:
    ids, mask = tokenize(b['text'])
    out = {'images': b['image'], 'text_ids': ids, 'text_mask': mask, 'image_ids': b['image_id'],
           'epoch': b['epoch'], 'q': b['q'], 'rel': b['rel'], 'counts': b['counts']}
    if config.negatives_key:
      out['negative_ids'], out['negative_mask'] = tokenize(b['negative'])
      out['negative_valid'] = tf.strings.length(b['negative']) > 0
    return out

  ds = ds.map(finish, num_parallel_calls=2, deterministic=True)
  return _options(ds.prefetch(config.prefetch))


def train_iterator(config: ml_collections.ConfigDict, *, tokenizer=None, state: dict | None = None,
                   process_index: int | None = None, process_count: int | None = None) -> TrainIterator:
  """Training batches for this process, from the start or from a saved `state`."""
  validate_data_config(config)
  process_index, process_count = _process(process_index, process_count)
  fresh = initial_state(config, process_index, process_count)
  if state is None:
    state = fresh
  else:
    _check_state(state, fresh)
  tokenizer = tokenizer or load_tokenizer(config)
  dataset = train_dataset(config, tokenizer, state, process_index, process_count)
  return TrainIterator(dataset, state, config.batch_size // process_count)


# ---------------------------------------------------------------------------------------------------- evaluation


def _eval_example(config: ml_collections.ConfigDict, example: dict) -> dict:
  """A usable example (or the end marker) → its normalised centre crop; raises on bad image bytes."""
  size = config.image_size
  image = tf.cond(example['status'] == sources.STATUS_OK,
                  lambda: preprocess.eval_image(example['encoded'], size=size, mean=config.mean, std=config.std),
                  lambda: tf.zeros([size, size, 3], tf.float32))
  return {'images': image, 'texts': example['texts'], 'text_valid': example['text_valid'],
          'image_ids': example['image_id'], 'status': example['status'], 'rel': example['rel'],
          'counts': example['counts']}


def _padded_captions(count: int):
  def pad(texts: tf.RaggedTensor, chunk: dict, negatives) -> dict:
    del chunk, negatives
    padded = texts[:, :count].to_tensor(default_value='', shape=[None, count])
    return {'texts': padded, 'text_valid': preprocess.usable_captions(padded)}
  return pad


class EvalIterator(Iterator[dict]):
  """Every example of a split once, in batches of fixed size; the last padded with valid=False."""

  def __init__(self, dataset: tf.data.Dataset, batch_size: int, num_batches: int | None):
    self._iterator = dataset.as_numpy_iterator()
    self._batch_size = batch_size
    self._num_batches = num_batches
    self._returned = 0
    self._yielded = 0
    self._consumed = 0
    self._counts = np.zeros([2], np.int64)
    self._done = False
    self._template = None

  def __next__(self) -> dict:
    if not self._done:
      try:
        batch = next(self._iterator)
      except StopIteration:
        self._done = True
      else:
        return self._emit(batch)
    if self._num_batches is not None and self._returned < self._num_batches and self._template is not None:
      # Processes with fewer examples pad with empty batches so that all take part in every collective.
      self._returned += 1
      return {k: np.zeros_like(v) for k, v in self._template.items()}
    raise StopIteration

  def _emit(self, batch: dict) -> dict:
    status = batch.pop('status')
    rel = batch.pop('rel')
    counts = batch.pop('counts')
    self._consumed = int(rel[-1]) + 1
    self._counts = counts[-1]
    keep = status == sources.STATUS_OK
    self._yielded += int(keep.sum())
    batch = {k: v[keep] for k, v in batch.items()}
    pad = self._batch_size - int(keep.sum())
    out = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
    out['valid'] = np.arange(self._batch_size) < self._batch_size - pad
    out['text_valid'] &= out['valid'][:, None]
    self._template = out
    self._returned += 1
    if not keep.any() and status[-1] == STATUS_END:
      # Only the end marker left: nothing to evaluate in this batch.
      self._done = True
      return self.__next__()
    return out

  def stats(self) -> dict:
    """Records read, examples yielded and skipped by reason; exact once the iterator is exhausted."""
    records = self._consumed - (1 if self._done else 0)  # The end marker is not a record.
    truncated, empty = (int(c) for c in self._counts)
    return {'consumed': records, 'yielded': self._yielded, 'truncated': truncated, 'empty_caption': empty,
            'bad_image': records - self._yielded - truncated - empty}


def eval_iterator(config: ml_collections.ConfigDict, *, tokenizer=None, process_index: int | None = None,
                  process_count: int | None = None) -> EvalIterator:
  """Evaluation batches of `config.eval_split` (tfds) or the eval shards/captions, this process's part, in order."""
  validate_data_config(config)
  process_index, process_count = _process(process_index, process_count)
  if config.eval_batch_size % process_count:
    raise ValueError(f'data.eval_batch_size={config.eval_batch_size} is not divisible by {process_count} processes')
  batch = config.eval_batch_size // process_count
  source = build_source(config, 'eval', process_index, process_count, shuffle_shards=False)
  num_batches = None
  if isinstance(source, sources.IndexedSource):
    n = _local_count(source.size, process_index, process_count)
    ds = source.read(tf.data.Dataset.range(n).batch(READ_BATCH).map(
        lambda q: {'index': process_index + q * process_count}))
    # Each process pads to the batches the largest process needs: all join every collective.
    num_batches = -(-_local_count(source.size, 0, process_count) // batch)
  else:
    ds = source.epoch_records(tf.constant(0, tf.int64))
  end = {'encoded': tf.constant(''), 'texts': tf.zeros([0], tf.string), 'image_id': tf.constant(-1, tf.int64),
         'status': tf.constant(STATUS_END)}
  ds = ds.map(lambda r: {k: r[k] for k in end}).concatenate(tf.data.Dataset.from_tensors(end))
  ds = ds.enumerate().map(lambda rel, r: {**r, 'rel': rel})
  ds = _checked_chunks(ds, (0, 0), _padded_captions(config.max_captions))
  ds = _decoded(ds, lambda e: _eval_example(config, e), _threads(config))
  ds = ds.batch(batch)
  tokenize = _tokenize_fn(tokenizer or load_tokenizer(config), config.max_text_len)

  def finish(b: dict) -> dict:
    ids, mask = tokenize(b.pop('texts'))
    return {**b, 'text_ids': ids, 'text_mask': mask * tf.cast(b['text_valid'][..., None], tf.int32)}

  ds = ds.map(finish)
  return EvalIterator(_options(ds.prefetch(config.prefetch)), batch, num_batches)


def binding_iterator(config: ml_collections.ConfigDict, split: str, *, tokenizer=None, process_index: int | None = None,
                     process_count: int | None = None) -> EvalIterator:
  """Evaluation batches of a split of (true caption, hard negative) pairs: C = 2, caption 0 true, caption 1 false.

  For xmodal_shapes' `test_hard` split, whose features hold the true caption in 'captions' and the hard negative in
  'negative_caption'.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_split = split
  config.captions_key = 'captions,negative_caption'
  config.max_captions = 2
  return eval_iterator(config, tokenizer=tokenizer, process_index=process_index, process_count=process_count)


def prepare(config: ml_collections.ConfigDict) -> None:
  """Builds the embedded xmodal_shapes dataset when a config reads it and it is not prepared yet (no download)."""
  if config.source == 'tfds' and config.tfds_name == 'xmodal_shapes':
    from xmodal.data.shapes import builder as shapes  # pylint: disable=g-import-not-at-top
    shapes.prepare_if_missing(config.tfds_data_dir)
