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

Bad input (the list is docs/data.md, "Bad data"): records without a usable caption and truncated records are dropped
per chunk of READ_BATCH records, before decoding; undecodable images are dropped by an `ignore_errors` that covers
decoding alone (`_decoded`), so a failing reader still raises. `skipped` counts each reason exactly, up to the last
example yielded. A training source that yields no example in `data.unusable_limit` records in a row, or in a whole
epoch of a stream, fails (`_guarded`) instead of being read for ever. The iterators wait for tf.data in a thread of
their own (`_Feeder`): the main thread then runs signal handlers while it waits, and a pipeline's error reaches it as
an `xmodal.data.faults` error that names the source, the shard and the record.
"""

from __future__ import annotations

import dataclasses
import queue
import re
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

import jax
import ml_collections
import numpy as np
import tensorflow as tf

from xmodal.data import faults, preprocess, sources
from xmodal.data.shapes import captions as shapes_captions
from xmodal.config.data import validate_data_config

# data.caption_grounding's names (xmodal.config.data.CAPTION_GROUNDINGS): (caption, its regions' phrases) -> the
# caption's (start, end, region index) character spans.
GROUNDERS: dict[str, Callable[[str, Sequence[str]], list[tuple[int, int, int]]]] = {
    'shapes': shapes_captions.ground_caption}
# data.relation_swaps' names (xmodal.config.data.RELATION_SWAPS): caption -> its relation swap ('' where none).
RELATION_SWAPPERS: dict[str, Callable[[str], str]] = {'shapes': shapes_captions.relation_swap}

STATE_VERSION = 2
STATUS_EMPTY = 2   # No usable caption.
STATUS_END = 3     # End-of-split marker of the evaluation pipeline: lets it count trailing skipped records.
STATUS_EPOCH_END = 4  # End-of-epoch marker of a training stream: an epoch without records still shows up.
READ_BATCH = 64  # Positions located and records read per step by index-addressable sources.
UNUSABLE_RUN = 'xmodal:unusable-run'      # [records in a row without a usable example]
UNUSABLE_EPOCH = 'xmodal:unusable-epoch'  # [an epoch of a stream without a usable example]


def _region_keys(config: ml_collections.ConfigDict) -> sources.RegionKeys | None:
  """The training split's region features, or None when the config reads none."""
  if not config.region_boxes_key:
    return None
  return sources.RegionKeys(config.region_boxes_key, config.region_phrases_key, config.max_regions)


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
  """The source named by the config for `split` ('train' or 'eval'), sliced for this process if streaming.

  Its paths are checked, and the keys (or extensions) the config names are looked for in its first records: a wrong
  `tfrecord_caption_key` fails here, naming the keys the records have, not after an epoch of skipped records.
  """
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
    regions = _region_keys(config) if train else None
    named = {'data.image_key': config.image_key, 'data.captions_key': config.captions_key,
             'data.id_key': config.id_key, 'data.negatives_key': negatives_key}
    if regions is not None:
      named.update({'data.region_boxes_key': regions.boxes, 'data.region_phrases_key': regions.phrases})
    sources.check_tfds(builder, tfds_split, named)
    schema = sources.tfds_schema(builder, tfds_split, named)
    if random:
      source = sources.tfds_indexed_source(builder, tfds_split, *keys, negatives_key=negatives_key, regions=regions)
      return dataclasses.replace(source, schema=schema)
    for field, key in (('negatives_key', negatives_key), ('region_boxes_key', regions and regions.boxes)):
      if key:
        raise ValueError(f'data.{field}: {key!r} is read by random access only, and {config.tfds_name} is read as '
                         f'a stream (data.tfds_access={config.tfds_access!r})')
    epoch_records = sources.tfds_stream_reader(builder, tfds_split, *keys, process_index, process_count)
    return _SingleStream(epoch_records, schema)
  what = 'data.train_shards' if train else 'data.eval_shards'
  pattern = config.train_shards if train else config.eval_shards
  shards = sources.process_shards(sources.expand_glob(pattern, what), process_index, process_count, pattern)
  if config.source == 'wds':
    exts = (config.wds_image_exts, config.wds_text_exts, config.wds_json_caption_keys)
    sources.check_wds(shards[0], *exts)
    reader, schema = sources.wds_reader(*exts), sources.wds_schema(pattern, shards, *exts)
  elif config.source == 'tfrecord':
    keys = (config.tfrecord_image_key, config.tfrecord_caption_key, config.tfrecord_id_key)
    sources.check_tfrecord(shards[0], *keys)
    reader, schema = sources.tfrecord_reader(*keys), sources.tfrecord_schema(pattern, shards, *keys)
  else:
    raise ValueError(f'data.source: {config.source!r} is not one of {("tfds", "wds", "tfrecord", "folder")}')
  return sources.StreamSource(shards, reader, seed=config.seed, cycle_length=config.cycle_length,
                              num_parallel_calls=config.num_parallel_calls, shuffle_shards=shuffle_shards,
                              schema=schema)


@dataclasses.dataclass
class _SingleStream:
  """A stream with its own reader (tfds streaming): `epoch_records` as given."""
  epoch_records: Callable[[tf.Tensor], tf.data.Dataset]
  schema: sources.Schema
  counts: dict = dataclasses.field(default_factory=dict)


def check_inputs(config: ml_collections.ConfigDict, eval_splits: Sequence[str] = (),
                 binding_splits: Sequence[str] = ()) -> None:
  """Builds every source a run will read, so that each path and key is checked before the first step.

  `eval_splits` / `binding_splits`: the splits evaluation will read (tfds split names; other sources read
  data.eval_shards or data.eval_captions whatever the split). Raises what `build_source` raises: a missing evaluation
  captions file fails now, not after training.
  """
  validate_data_config(config)
  process_index, process_count = _process(None, None)
  build_source(config, 'train', process_index, process_count, shuffle_shards=True)
  for split in dict.fromkeys(eval_splits):
    build_source(_with_split(config, split), 'eval', process_index, process_count, shuffle_shards=False)
  for split in dict.fromkeys(binding_splits):
    build_source(_binding_config(config, split), 'eval', process_index, process_count, shuffle_shards=False)


def _with_split(config: ml_collections.ConfigDict, split: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.eval_split = split
  return config


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
    return {'epoch': epoch, 'q': k, 'rel': k - start, 'tick': k - start,
            'key': preprocess.example_key(seed, epoch, index), 'index': index}

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
  """Records from (start_epoch, start_q) on, epoch after epoch, each epoch in a stateless order.

  Each epoch ends with a STATUS_EPOCH_END marker (dropped with the unusable records), so that `_guarded` sees epochs
  end even when they hold no record: shards that are all empty would otherwise be reopened for ever. 'tick' counts
  records and markers, 'rel' records only (the state's `consumed`).
  """
  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    records = _window_shuffle(source.epoch_records(epoch), window, seed, epoch)
    records = records.enumerate().map(lambda q, r: {**r, 'epoch': epoch, 'q': q,
                                                    'key': preprocess.example_key(seed, epoch, q)})
    # Resume: drop what was consumed before the save, before any decoding.
    records = records.skip(tf.where(epoch == start_epoch, tf.constant(start_q, tf.int64), 0))
    marker = {'encoded': tf.constant(''), 'texts': tf.zeros([0], tf.string), 'image_id': tf.constant(-1, tf.int64),
              'status': tf.constant(STATUS_EPOCH_END), 'epoch': epoch, 'q': tf.constant(-1, tf.int64),
              'key': preprocess.example_key(seed, epoch, -1)}
    return records.concatenate(tf.data.Dataset.from_tensors(marker))

  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(epoch_records)
  # One marker ends each epoch before the record's: epoch - start_epoch of them precede it.
  return ds.enumerate().map(lambda tick, r: {**r, 'tick': tick, 'rel': tick - (r['epoch'] - start_epoch)})


# ---------------------------------------------------------------------------------------------------- examples


def _checked_chunks(records: tf.data.Dataset, initial_counts: tuple[int, int], per_chunk) -> tf.data.Dataset:
  """Records → chunks of READ_BATCH with statuses and captions, skip counts, and only the usable records left.

  Per chunk, vectorised: each record's status, `per_chunk(texts (k, None) ragged, chunk, negatives (k, None) ragged
  or None)` (a dict of fields to add: the chosen captions), and running counts of truncated records and records
  without a usable caption, which are dropped here, before anything is decoded. A tf.data element costs tens of
  microseconds of scheduling whatever it does, so these steps as per-example maps cost more than decoding a small
  image. STATUS_END markers pass through. Training records (with a 'tick') also leave the chunk's summary for
  `_guarded`: 'last_tick', the tick of its last record, and 'ended', the epochs whose end marker it held.
  """
  def ragged(x):  # ragged_batch keeps a dimension of static size dense
    return x if isinstance(x, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(x)

  def check(chunk: dict) -> dict:
    texts = ragged(chunk.pop('texts'))
    negatives = ragged(chunk.pop('negatives')) if 'negatives' in chunk else None
    usable = tf.reduce_any(tf.ragged.map_flat_values(preprocess.usable_captions, texts), axis=1)
    status = tf.where(chunk['status'] != sources.STATUS_OK, chunk['status'],
                      tf.where(usable, sources.STATUS_OK, STATUS_EMPTY))
    return {**chunk, 'status': status, **per_chunk(texts, chunk, negatives)}

  def count(totals: tf.Tensor, chunk: dict):
    # Running (truncated, empty) counts up to and including each record, carried from chunk to chunk.
    per_record = tf.stack([chunk['status'] == sources.STATUS_TRUNCATED, chunk['status'] == STATUS_EMPTY], axis=1)
    counts = totals + tf.cumsum(tf.cast(per_record, tf.int64), axis=0)
    return counts[-1], {**chunk, 'counts': counts}

  def usable_only(chunk: dict) -> dict:
    keep = (chunk['status'] == sources.STATUS_OK) | (chunk['status'] == STATUS_END)
    kept = {k: tf.boolean_mask(v, keep) for k, v in chunk.items()}
    if 'tick' in chunk:
      kept.update(last_tick=chunk['tick'][-1],
                  ended=tf.boolean_mask(chunk['epoch'], chunk['status'] == STATUS_EPOCH_END))
    return kept

  chunks = records.ragged_batch(READ_BATCH).map(check)
  return chunks.scan(tf.constant(initial_counts, tf.int64), count).map(usable_only)


_SUMMARY = ('last_tick', 'ended')  # a chunk's fields that are not per record


def _decoded(chunks: tf.data.Dataset, decode, threads: int) -> tf.data.Dataset:
  """Each chunk's records through `decode`, as a chunk of the examples whose image decoded (possibly none).

  Dropped examples count as records read but not yielded. `ignore_errors` sits on each chunk's own dataset so that
  it hides decoding errors only: over the whole pipeline it would also swallow the reader's errors, and a source
  failing on every record would loop forever. A chunk comes out even when nothing in it decodes, so that `_guarded`
  sees a source whose images never decode.
  """
  def decode_chunk(chunk: dict) -> dict:
    summary = {k: chunk.pop(k) for k in _SUMMARY if k in chunk}
    examples = tf.data.Dataset.from_tensor_slices(chunk).map(decode).ignore_errors().batch(READ_BATCH)
    none = tf.data.Dataset.from_tensors(tf.nest.map_structure(
        lambda spec: tf.zeros([0, *spec.shape[1:]], spec.dtype), examples.element_spec))
    return {**examples.concatenate(none).take(1).get_single_element(), **summary}

  return chunks.map(decode_chunk, num_parallel_calls=threads, deterministic=True)


def _examples(chunks: tf.data.Dataset) -> tf.data.Dataset:
  """Chunks of examples → the examples one by one."""
  return chunks.map(lambda chunk: {k: v for k, v in chunk.items() if k not in _SUMMARY}).unbatch()


def _guarded(chunks: tf.data.Dataset, limit: int, first_full_epoch: int) -> tf.data.Dataset:
  """Fails (an assertion marked UNUSABLE_RUN or UNUSABLE_EPOCH) when `limit` records in a row, or every record of an
  epoch read from its start (a stream's: an epoch of an indexed source is a run of its size), yield no example.

  Without it, a source whose every record is skipped (a wrong key, images that never decode, shards all empty) is
  read for ever and the run waits on data that never comes. Checked per decoded chunk, on the ticks of the examples
  that survived: the records between two of them are the run.
  """
  def check(state: tuple[tf.Tensor, tf.Tensor], chunk: dict):
    last_good, good_epoch = state
    ticks, epochs = chunk['tick'], chunk['epoch']
    previous = tf.concat([[last_good], ticks], 0)
    run = tf.reduce_max(tf.concat([ticks - previous[:-1] - 1, [chunk['last_tick'] - previous[-1]]], 0))
    ended = chunk['ended']
    had_example = tf.reduce_any(tf.equal(epochs[None, :], ended[:, None]), axis=1) | tf.equal(ended, good_epoch)
    empty = tf.boolean_mask(ended, ~had_example & (ended >= first_full_epoch))
    first_empty = tf.concat([empty, [-1]], 0)[0]  # epochs end in order
    checks = [tf.debugging.Assert(run < limit, [UNUSABLE_RUN, run]),
              tf.debugging.Assert(tf.size(empty) == 0, [UNUSABLE_EPOCH, first_empty])]
    with tf.control_dependencies(checks):
      state = (tf.identity(previous[-1]), tf.reduce_max(tf.concat([[good_epoch], epochs], 0)))
    return state, chunk

  initial = (tf.constant(-1, tf.int64), tf.constant(-1, tf.int64))
  return chunks.scan(initial, check)


def _train_example(config: ml_collections.ConfigDict, example: dict) -> dict:
  """A usable example → its normalised (H, W, 3) float32 random crop; raises on bad image bytes.

  The only per-example work: images differ in size and a bad one must cost only itself. Normalising here, on a
  small image, is cheaper than on a whole batch (which does not stay in cache).
  """
  image = preprocess.train_image(example.pop('encoded'), example.pop('key'), size=config.image_size,
                                 scale=config.crop_scale, ratio=config.crop_ratio, mean=config.mean, std=config.std,
                                 hflip=config.hflip, grayscale_prob=config.grayscale_prob)
  example.pop('status')
  return {**example, 'image': image}


def _grey_captions(config: ml_collections.ConfigDict, keys: tf.Tensor, texts: tf.Tensor,
                   negatives: tf.Tensor | None) -> dict:
  """The captions of the examples shown in grey (`data.grayscale_prob`) without `data.grayscale_drop_words`.

  A negative that says the same once its colour words are gone (a colour changed or two colours swapped) is no
  longer false of the grey image: it becomes '' (none).
  """
  grey = preprocess.grayscale_coin(keys, config.grayscale_prob)
  fields = {'text': tf.where(grey, preprocess.drop_words(texts, config.grayscale_drop_words), texts)}
  if negatives is not None:
    stripped = preprocess.drop_words(negatives, config.grayscale_drop_words)
    fields['negative'] = tf.where(grey, tf.where(stripped == fields['text'], '', stripped), negatives)
  return fields


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


def _grounding_fn(tokenizer, grounder, max_len: int):
  """(B,) captions and (B, R) region phrases -> (B, max_len) int32: each caption token's region index, -1 none."""
  def label(texts: np.ndarray, phrases: np.ndarray) -> np.ndarray:
    texts = [t.decode('utf-8', errors='replace') for t in texts]
    spans = [grounder(text, [p.decode('utf-8', errors='replace') for p in row]) for text, row in zip(texts, phrases)]
    return tokenizer.span_labels(texts, spans, max_len)

  def ground(texts: tf.Tensor, phrases: tf.Tensor) -> tf.Tensor:
    regions = tf.numpy_function(label, [texts, phrases], tf.int32, stateful=False)
    regions.set_shape(texts.shape.concatenate([max_len]))
    return regions
  return ground


def _swap_fn(swapper):
  """(B,) captions -> (B,) their relation swaps ('' where a caption states none)."""
  def swap(texts: np.ndarray) -> np.ndarray:
    return np.asarray([swapper(t.decode('utf-8', errors='replace')).encode('utf-8') for t in texts], object)

  def swapped(texts: tf.Tensor) -> tf.Tensor:
    out = tf.numpy_function(swap, [texts], tf.string, stateful=False)
    out.set_shape(texts.shape)
    return out
  return swapped


def load_tokenizer(config: ml_collections.ConfigDict):
  from xmodal.tokenizer import load_tokenizer as load  # pylint: disable=g-import-not-at-top
  return load(config.tokenizer)


def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return ds.with_options(options)


# ------------------------------------------------------------------------------------------- waiting and failing


_POLL_S = 0.1  # how often a wait for the next batch looks at its stop request (and lets signal handlers run)
_READING: set[int] = set()  # the feeding threads (idents) now inside tf.data, waiting for an element


def input_blocked() -> bool:
  """Whether a feeding thread of this process is inside tf.data, waiting for an element that has not come (after a
  stop requested while waiting for a batch): a read that may never return, such as one on a stalled mount."""
  return bool(_READING)


def _feed(dataset: tf.data.Dataset, requests: queue.SimpleQueue, results: queue.SimpleQueue) -> None:
  """The feeding thread: one element of `dataset` per True request, until a False one.

  The tf.data iterator lives and dies here. After an error the thread parks for ever, keeping it: destroying a
  failed pipeline whose threads still run Python (from_generator, numpy_function) deadlocks once the interpreter is
  shutting down (the hang after a reader error: the main thread waited in the iterator's destructor at exit).
  """
  try:
    iterator = dataset.as_numpy_iterator()
    while requests.get():
      _READING.add(threading.get_ident())
      try:
        results.put(('element', next(iterator)))
      except StopIteration:
        results.put(('end', None))
      finally:
        _READING.discard(threading.get_ident())
  except Exception as e:  # pylint: disable=broad-except  # every failure goes to the consumer
    # Without its traceback: the frames it holds (this one, with the iterator) must not outlive the error's
    # handling in the main thread, or the iterator would be destroyed with them, at exit.
    results.put(('error', e.with_traceback(None)))
    threading.Event().wait()


class _Feeder:
  """A tf.data iterator driven from a daemon thread (`_feed`), so that its consumer waits in Python.

  Blocked inside tf.data's C++ GetNext, the main thread would run no Python signal handler: SIGTERM and SIGINT would
  wait for data that may never come. Here it waits on a queue in slices of _POLL_S, and `get(stop)` gives up when
  `stop()` says so.
  """

  def __init__(self, dataset: tf.data.Dataset):
    self._requests: queue.SimpleQueue = queue.SimpleQueue()
    self._results: queue.SimpleQueue = queue.SimpleQueue()
    self._pending = False
    self._error: Exception | None = None
    threading.Thread(target=_feed, args=(dataset, self._requests, self._results), name='xmodal-input',
                     daemon=True).start()
    # Dropped, the feeder lets its thread free the pipeline; not at exit, where freeing one can deadlock (see _feed).
    weakref.finalize(self, self._requests.put, False).atexit = False

  def get(self, stop: Callable[[], bool] | None = None):
    """The next element; StopIteration at the end; the pipeline's error; InputInterrupted when `stop()` turns True
    while waiting (the element still comes, to the next call)."""
    if self._error is not None:
      raise self._error
    if not self._pending:
      self._requests.put(True)
      self._pending = True
    while True:
      try:
        kind, value = self._results.get(timeout=_POLL_S)
        break
      except queue.Empty:
        if stop is not None and stop():
          raise faults.InputInterrupted('a stop was requested while waiting for the input pipeline') from None
    self._pending = False
    if kind == 'end':
      raise StopIteration
    if kind == 'error':
      self._error = value
      raise value
    return value


_MARKED = re.compile(r'\[?(xmodal:[\w-]+)\]?(?: \[(.*?)\])?(?: \[(-?\d+)\])?')


def _data_error(error: Exception, source, limit: int | None = None) -> Exception:
  """The pipeline's error `error` as the faults error that names what failed: the source, shard, record and keys.

  Reads back the marked errors of `_guarded` and of the shard readers (sources.UNREADABLE, ...) and adds what the
  source's schema can tell: the keys it looked for, what its first records hold, why a record did not parse.
  """
  text = getattr(error, 'message', None) or str(error)
  schema = source.schema

  def found(path: str | None) -> str:
    try:
      return schema.found(path)
    except Exception as e:  # pylint: disable=broad-except  # a message must not fail for want of a detail
      return f'(could not look at its records: {e})'

  marked = _MARKED.search(text)
  if marked is None:
    return faults.ReaderError(f'{schema.name}: the input pipeline failed: {type(error).__name__}: '
                              f'{sources.tf_message(error)}')
  marker, path, number = marked.group(1), marked.group(2) or '', int(marked.group(3) or 0)
  if marker == UNUSABLE_RUN:
    return faults.UnusableSourceError(f'{schema.name}: no usable example in {int(path):,} records in a row '
                                      f'(data.unusable_limit={limit:,}). Looked for {schema.wanted}; {found(None)}.')
  if marker == UNUSABLE_EPOCH:
    return faults.UnusableSourceError(f'{schema.name}: epoch {int(path)} had no usable example (or no record). '
                                      f'Looked for {schema.wanted}; {found(None)}.')
  if marker == sources.UNUSABLE_SHARD:
    return faults.UnusableSourceError(f'{path}: none of its {number:,} records has both an image and a usable '
                                      f'caption. Looked for {schema.wanted}; {found(path)}.')
  if marker == sources.UNREADABLE:
    try:
      why = schema.explain(path, number)
    except Exception as e:  # pylint: disable=broad-except
      why = f'record {number} or one of the next few (could not read it again: {e})'
    return faults.ReaderError(f'{path}: {why}')
  # sources.READER_ERROR: the reader's own words, shard and offset included.
  line = text[marked.start():].splitlines()[0]
  return faults.ReaderError(line.replace(f'[{marker}] ', '', 1).replace(f'{marker} ', '', 1))


def colliding_ids(image_ids: np.ndarray, fingerprints: np.ndarray) -> np.ndarray:
  """The ids of (B,) `image_ids` shared by examples whose image bytes differ ((B,) `fingerprints`), sorted."""
  pairs = np.unique(np.stack([image_ids, fingerprints], axis=1), axis=0)
  ids, counts = np.unique(pairs[:, 0], return_counts=True)
  return ids[counts > 1]


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
  """Infinite training batches (numpy) with a JSON-able `state()`; see the module docstring.

  `next(batches)` waits for the next batch; `batches.next(stop)` gives up with faults.InputInterrupted when `stop()`
  turns True while it waits. A failing pipeline raises a faults.DataError naming the source; so does a batch in
  which different images share an image id.
  """

  def __init__(self, dataset: tf.data.Dataset, state: dict, batch_size: int, source, unusable_limit: int):
    self._state = {**state, 'skipped': dict(state['skipped'])}
    self._start = dict(self._state, skipped=dict(self._state['skipped']))
    self._batch_size = batch_size
    self._source = source
    self._limit = unusable_limit
    self._feeder = _Feeder(dataset)

  def __next__(self) -> dict:
    return self.next()

  def next(self, stop: Callable[[], bool] | None = None) -> dict:
    """The next batch; see the class docstring."""
    try:
      batch = self._feeder.get(stop)
    except tf.errors.OpError as e:
      raise _data_error(e, self._source, self._limit) from None
    start, state = self._start, self._state
    state['epoch'] = int(batch['epoch'][-1])
    state['position'] = int(batch['q'][-1]) + 1
    state['consumed'] = start['consumed'] + int(batch['rel'][-1]) + 1
    state['yielded'] += self._batch_size
    truncated, empty = (int(c) for c in batch['counts'][-1])
    skipped = state['consumed'] - state['yielded']
    state['skipped'] = {'truncated': truncated, 'empty_caption': empty, 'bad_image': skipped - truncated - empty}
    shared = colliding_ids(batch['image_ids'], batch['fingerprints'])
    if shared.size:
      raise faults.ImageIdCollisionError(
          f'{self._source.schema.name}: image id {shared[0]} names different images (different bytes) in one batch '
          f'({shared.size} such id(s)): they would be each other\'s ITC positives. Ids must identify images; '
          f'the source reads {self._source.schema.wanted}')
    out = {'images': batch['images'], 'text_ids': batch['text_ids'], 'text_mask': batch['text_mask'],
           'image_ids': batch['image_ids']}
    optional = ('negative_ids', 'negative_mask', 'negative_valid', 'region_boxes', 'region_ids', 'region_mask',
                'region_valid', 'text_regions', 'relation_ids', 'relation_mask', 'relation_valid')
    out.update({key: batch[key] for key in optional if key in batch})
    return out

  def state(self) -> dict:
    """The JSON-able state after the last batch returned; pass it to `train_iterator(..., state=)` to resume."""
    return {**self._state, 'skipped': dict(self._state['skipped'])}

  def stats(self) -> dict:
    """Records read, examples yielded and skipped by reason, and what the source found wrong when it was built (a
    captions file's faults.FILE_COUNTS), for logging."""
    return {'consumed': self._state['consumed'], 'yielded': self._state['yielded'], **self._state['skipped'],
            **self._source.counts}


def train_dataset(config: ml_collections.ConfigDict, tokenizer, state: dict, process_index: int, process_count: int,
                  source: sources.IndexedSource | sources.StreamSource | None = None) -> tf.data.Dataset:
  """The training tf.data pipeline from `state` on; elements are batches with bookkeeping fields."""
  if config.batch_size % process_count:
    raise ValueError(f'data.batch_size={config.batch_size} is not divisible by {process_count} processes')
  batch = config.batch_size // process_count
  source = source or build_source(config, 'train', process_index, process_count, shuffle_shards=True)
  if config.pairs and (batch % 2 or not isinstance(source, sources.IndexedSource)):
    raise ValueError(f'data.pairs keeps examples 2m and 2m+1 in one batch: it needs a random-access source and an '
                     f'even batch per process, got {type(source).__name__} and {batch}')
  if isinstance(source, sources.IndexedSource):
    # 'position' is the local stream position (see _indexed_order); 'epoch' is informational.
    ds = _indexed_order(source, config.seed, state['position'], config.batch_size, process_index, process_count,
                        pairs=config.pairs)
    first_full_epoch = 0  # unused: an indexed source has no epoch markers
  else:
    ds = _stream_order(source, config.seed, config.shuffle_buffer, state['epoch'], state['position'])
    first_full_epoch = state['epoch'] + (1 if state['position'] else 0)

  def per_chunk(texts: tf.RaggedTensor, chunk: dict, negatives: tf.RaggedTensor | None) -> dict:
    # The image bytes' fingerprint: examples sharing an id must share it (TrainIterator checks each batch).
    fields = {'text': preprocess.choose_captions(texts, chunk['key']),
              'fingerprint': tf.strings.to_hash_bucket_fast(chunk['encoded'], np.iinfo(np.int64).max)}
    if negatives is not None:  # '' where an example has none
      fields['negative'] = preprocess.choose_captions(negatives, preprocess.subkey(chunk['key'], 3))
    if config.grayscale_prob:
      fields.update(_grey_captions(config, chunk['key'], fields['text'], fields.get('negative')))
    return fields

  ds = _checked_chunks(ds, (state['skipped']['truncated'], state['skipped']['empty_caption']), per_chunk)
  ds = _decoded(ds, lambda e: _train_example(config, e), _threads(config))
  ds = _examples(_guarded(ds, config.unusable_limit, first_full_epoch))
  ds = ds.batch(batch, drop_remainder=True)
  tokenize = _tokenize_fn(tokenizer, config.max_text_len)
  tokenize_phrase = _tokenize_fn(tokenizer, config.max_phrase_len)
  if config.caption_grounding:
    ground = _grounding_fn(tokenizer, GROUNDERS[config.caption_grounding], config.max_text_len)
  if config.relation_swaps:
    swap = _swap_fn(RELATION_SWAPPERS[config.relation_swaps])

  def finish(b: dict) -> dict:
    ids, mask = tokenize(b['text'])
    out = {'images': b['image'], 'text_ids': ids, 'text_mask': mask, 'image_ids': b['image_id'],
           'fingerprints': b['fingerprint'], 'epoch': b['epoch'], 'q': b['q'], 'rel': b['rel'],
           'counts': b['counts']}
    if config.negatives_key:
      out['negative_ids'], out['negative_mask'] = tokenize(b['negative'])
      out['negative_valid'] = tf.strings.length(b['negative']) > 0
    if config.region_boxes_key:
      out['region_boxes'] = b['region_boxes']
      out['region_ids'], out['region_mask'] = tokenize_phrase(b['region_phrases'])
      out['region_valid'] = tf.strings.length(b['region_phrases']) > 0
    if config.caption_grounding:
      out['text_regions'] = ground(b['text'], b['region_phrases'])
    if config.relation_swaps:
      swaps = swap(b['text'])
      out['relation_ids'], out['relation_mask'] = tokenize(swaps)
      out['relation_valid'] = tf.strings.length(swaps) > 0
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
  source = build_source(config, 'train', process_index, process_count, shuffle_shards=True)
  dataset = train_dataset(config, tokenizer, state, process_index, process_count, source)
  return TrainIterator(dataset, state, config.batch_size // process_count, source, config.unusable_limit)


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
  """Every example of a split once, in batches of fixed size; the last padded with valid=False.

  A failing pipeline raises a faults.DataError naming the source; so does a split that yields no example.
  """

  def __init__(self, dataset: tf.data.Dataset, batch_size: int, num_batches: int | None, source,
               must_yield: bool = True):
    self._feeder = _Feeder(dataset)
    self._batch_size = batch_size
    self._num_batches = num_batches
    self._source = source
    self._must_yield = must_yield
    self._returned = 0
    self._yielded = 0
    self._consumed = 0
    self._counts = np.zeros([2], np.int64)
    self._done = False
    self._template = None

  def __next__(self) -> dict:
    if not self._done:
      try:
        batch = self._feeder.get()
      except StopIteration:
        self._finish()
      except tf.errors.OpError as e:
        raise _data_error(e, self._source) from None
      else:
        return self._emit(batch)
    if self._num_batches is not None and self._returned < self._num_batches and self._template is not None:
      # Processes with fewer examples pad with empty batches so that all take part in every collective.
      self._returned += 1
      return {k: np.zeros_like(v) for k, v in self._template.items()}
    raise StopIteration

  def _finish(self) -> None:
    self._done = True
    if self._must_yield and not self._yielded:
      raise faults.UnusableSourceError(
          f'{self._source.schema.name}: the evaluation split yielded no usable example ({self.stats()}). Looked for '
          f'{self._source.schema.wanted}')

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
      self._finish()
      return self.__next__()
    return out

  def stats(self) -> dict:
    """Records read, examples yielded and skipped by reason, and what the source found wrong when it was built;
    exact once the iterator is exhausted."""
    records = self._consumed - (1 if self._done else 0)  # The end marker is not a record.
    truncated, empty = (int(c) for c in self._counts)
    return {'consumed': records, 'yielded': self._yielded, 'truncated': truncated, 'empty_caption': empty,
            'bad_image': records - self._yielded - truncated - empty, **self._source.counts}


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
  ds = _examples(_decoded(ds, lambda e: _eval_example(config, e), _threads(config)))
  ds = ds.batch(batch)
  tokenize = _tokenize_fn(tokenizer or load_tokenizer(config), config.max_text_len)

  def finish(b: dict) -> dict:
    ids, mask = tokenize(b.pop('texts'))
    return {**b, 'text_ids': ids, 'text_mask': mask * tf.cast(b['text_valid'][..., None], tf.int32)}

  ds = ds.map(finish)
  # A process may own no example of a tiny split; with one process, a split that yields nothing is a fault.
  return EvalIterator(_options(ds.prefetch(config.prefetch)), batch, num_batches, source,
                      must_yield=process_count == 1)


def _binding_config(config: ml_collections.ConfigDict, split: str) -> ml_collections.ConfigDict:
  """The data config that reads `split` as (true caption, hard negative) pairs."""
  config = _with_split(config, split)
  config.captions_key = 'captions,negative_caption'
  config.max_captions = 2
  return config


def binding_iterator(config: ml_collections.ConfigDict, split: str, *, tokenizer=None, process_index: int | None = None,
                     process_count: int | None = None) -> EvalIterator:
  """Evaluation batches of a split of (true caption, hard negative) pairs: C = 2, caption 0 true, caption 1 false.

  For xmodal_shapes' `test_hard` split, whose features hold the true caption in 'captions' and the hard negative in
  'negative_caption'.
  """
  return eval_iterator(_binding_config(config, split), tokenizer=tokenizer, process_index=process_index,
                       process_count=process_count)


def prepare(config: ml_collections.ConfigDict) -> None:
  """Builds the embedded xmodal_shapes dataset when a config reads it and it is not prepared yet (no download)."""
  if config.source == 'tfds' and config.tfds_name == 'xmodal_shapes':
    from xmodal.data.shapes import builder as shapes  # pylint: disable=g-import-not-at-top
    shapes.prepare_if_missing(config.tfds_data_dir)
