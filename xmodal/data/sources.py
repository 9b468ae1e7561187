"""Image-text sources, each read into the same record: {'encoded', 'texts', 'image_id', 'status'}.

A record holds 'encoded' tf.string () image bytes, 'texts' tf.string (C,) captions, 'image_id' tf.int64 () and
'status' tf.int32 () (STATUS_OK, or STATUS_TRUNCATED for a placeholder standing for a record cut short, which the
pipeline skips and counts). Two kinds of source:

- `IndexedSource` (tfds array_record, folder): `size` examples addressable by index; the pipeline computes which
  indices to read, so the order is a pure function of (seed, epoch, position) and resuming is O(1).
- `StreamSource` (WebDataset, TFRecord, tfds streaming): `epoch_records(epoch)` reads this process's shards in a
  deterministic order; resuming replays the reads of the current epoch up to the saved position (no decoding).

Bad input (the list is docs/data.md, "Bad data"). Every source carries a `Schema`: its name, what it looks for and
what its first records hold, for the errors that name it. `check_*` read the first records of a source before
anything is trained, so that a wrong key or extension fails at once. Shard readers fail with the shard and the
record (an assertion or exception carrying UNREADABLE / UNUSABLE_SHARD / READER_ERROR, which the pipeline turns into
an `xmodal.data.faults` error with the details read here), rather than being skipped: a reader error skipped would
skip the rest of the shard, and on every shard the run would wait for ever.
"""

from __future__ import annotations

import bisect
import collections
import csv
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import tensorflow as tf

from xmodal.data import faults, preprocess

log = logging.getLogger('xmodal.data')

STATUS_OK = 0
STATUS_TRUNCATED = 1

RECORD_SIGNATURE = {
    'encoded': tf.TensorSpec([], tf.string),
    'texts': tf.TensorSpec([None], tf.string),
    'image_id': tf.TensorSpec([], tf.int64),
    'status': tf.TensorSpec([], tf.int32),
}

# Markers of the errors raised inside tf.data, '<marker> [path] [number]' (an assertion's data, or a Python reader's
# exception): the pipeline reads them back and raises an xmodal.data.faults error with what the host can add.
UNREADABLE = 'xmodal:unreadable'          # [shard] [index of the first record that could not be read or parsed]
UNUSABLE_SHARD = 'xmodal:unusable-shard'  # [shard] [records]: none of them has both an image and a usable caption
READER_ERROR = 'xmodal:reader-error'      # '<marker> <shard>: <what failed where>', from a Python reader
_CHUNK = 64  # records per Python call (WebDataset) or per parse (TFRecord): per-element tf.data costs dominate
_PREVIEW = 16  # records read to check and describe a source's keys


@dataclasses.dataclass(frozen=True)
class Schema:
  """What a source reads, for the messages about it.

  Attributes:
    name: the source as the config names it ("TFRecord shards '/data/*.tfrecord'").
    wanted: the keys or extensions it looks for, with the config fields that set them.
    found: a file of the source (None: its first) → what that file's first records hold; read when a message
      needs it.
    explain: (shard, record index) → why that record, or one of the few after it, could not be read or parsed.
  """
  name: str
  wanted: str
  found: Callable[[str | None], str] = lambda path: ''
  explain: Callable[[str, int], str] = lambda path, index: ''


def _truncated_record() -> dict:
  return {'encoded': b'', 'texts': np.zeros([0], object), 'image_id': np.int64(-1),
          'status': np.int32(STATUS_TRUNCATED)}


def expand_glob(pattern: str, what: str) -> list[str]:
  """Sorted files matching `pattern`; a clear error naming the pattern when there are none, or folders among them."""
  if not pattern:
    raise FileNotFoundError(f'{what} is empty: set it to a glob of shard files')
  matches = sorted(glob.glob(pattern))
  if not matches:
    raise FileNotFoundError(f'{what}: no file matches {pattern!r}')
  folders = [m for m in matches if os.path.isdir(m)]
  if folders:
    raise IsADirectoryError(f'{what}: {pattern!r} matches {len(folders)} folder(s), not shard files: '
                            f'{folders[:3]}; narrow the glob to the shards (e.g. *.tar, *.tfrecord)')
  return matches


def process_shards(files: Sequence[str], process_index: int, process_count: int, pattern: str) -> list[str]:
  """This process's shards, files[process_index::process_count]; an error when a process would get none."""
  if len(files) < process_count:
    raise ValueError(f'{pattern!r} matches {len(files)} shards, fewer than the {process_count} processes')
  return list(files[process_index::process_count])


def _to_str(value) -> str:
  """A path handed to Python by tf.numpy_function/from_generator: bytes, or a 0-d array of bytes."""
  value = value.item() if isinstance(value, np.ndarray) else value
  return value.decode() if isinstance(value, bytes) else str(value)


def stable_id(text: str) -> int:
  """A non-negative int64 id for a string key, the same in every process and run (Python's hash() is salted).

  63 bits: a 32-bit hash would give a million keys a hundred collisions, each two images made one.
  """
  return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), 'little') >> 1


# ---------------------------------------------------------------------------------------------------- streaming


@dataclasses.dataclass
class StreamSource:
  """Shards read in a deterministic order: per epoch, the shard order is a stateless permutation of (seed, epoch).

  Attributes:
    shards: this process's shard files.
    read_shard: path (tf.string scalar) → tf.data.Dataset of records, in file order.
    seed: permutes the shard order per epoch.
    cycle_length: shards read concurrently; their records are interleaved one by one, deterministically.
    num_parallel_calls: reader threads (-1 = AUTOTUNE).
    shuffle_shards: False keeps file order (evaluation).
    schema: what the source reads, for messages about it.
  """
  shards: Sequence[str]
  read_shard: Callable[[tf.Tensor], tf.data.Dataset]
  seed: int = 0
  cycle_length: int = 8
  num_parallel_calls: int = -1
  shuffle_shards: bool = True
  schema: Schema = Schema('a stream', '')
  counts: dict = dataclasses.field(default_factory=dict)  # a stream has no file read up front to count

  def epoch_records(self, epoch: tf.Tensor) -> tf.data.Dataset:
    """Records of one epoch: `epoch` may be a tensor (the pipeline builds epochs inside flat_map)."""
    files = tf.constant(list(self.shards))
    if self.shuffle_shards:
      order = tf.random.experimental.stateless_shuffle(
          tf.range(len(self.shards)), seed=tf.stack([tf.constant(self.seed, tf.int64), tf.cast(epoch, tf.int64)]))
      files = tf.gather(files, order)
    cycle = min(self.cycle_length, len(self.shards))
    return tf.data.Dataset.from_tensor_slices(files).interleave(
        self.read_shard, cycle_length=cycle, block_length=1, num_parallel_calls=min(cycle, _threads(self)),
        deterministic=True)


def _threads(source: StreamSource) -> int:
  return source.num_parallel_calls if source.num_parallel_calls > 0 else tf.data.AUTOTUNE


def tf_message(error: Exception) -> str:
  """The first line of a TensorFlow error's message without the op and function names it wraps it in."""
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text.strip().splitlines()[0] if text.strip() else '')
  return re.sub(r'\s*\[Op:\w+\].*$', '', text).strip()


def _marked(marker: str, path: str, number: int) -> str:
  """An error text the pipeline reads back (the form tf.debugging.Assert prints its data in)."""
  return f'[{marker}] [{path}] [{number}]'


class _ReaderFailure(RuntimeError):
  """Raised inside a Python shard reader; tf.data carries its text, marked, to the pipeline."""


# ----------------------------------------------------------------------------------------------- WebDataset


def wds_image_id(shard: str, key: str) -> int:
  """A WebDataset sample's image id: its shard and key hashed together.

  Keys are unique within a shard only (many writers number them from 0 in every shard); the key alone would make
  different images of different shards each other's ITC positives.
  """
  return stable_id(f'{shard}#{key}')


def _wds_samples(path: str, reading: list[int] | None = None) -> Iterator[tuple[str, dict[str, bytes], int]]:
  """(key, {extension: bytes}, byte offset of its first member) of each sample of a WebDataset tar, in order.

  Members sharing a key (path up to the first '.') form one sample. Stream mode: sequential reads, what a tar on
  network storage wants. Raises tarfile/zlib errors and EOFError where the tar is cut short. `reading[0]` follows
  the byte offset of the member being read, for an error to name.
  """
  key, members, offset = None, {}, 0
  with tarfile.open(path, 'r|*') as tar:
    for member in tar:
      if reading is not None:
        reading[0] = member.offset
      if not member.isfile():
        continue
      directory, base = os.path.split(member.name)
      stem, _, ext = base.partition('.')
      member_key = os.path.join(directory, stem)
      if member_key != key and members:
        yield key, members, offset
        members = {}
      if not members:
        offset = member.offset
      key = member_key
      members[ext.lower()] = tar.extractfile(member).read()
  if members:
    yield key, members, offset


def wds_reader(image_exts: Sequence[str], text_exts: Sequence[str],
               json_caption_keys: Sequence[str]) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """A shard reader for WebDataset tars: one record per sample, its image id `wds_image_id(shard, key)`.

  A shard that cannot be read where it is not merely cut short fails naming it and the byte offset; a shard none of
  whose samples has both an image and a usable caption fails naming it (UNUSABLE_SHARD).
  """
  image_exts = tuple(e.lower() for e in image_exts)
  text_exts = tuple(e.lower() for e in text_exts)

  def to_record(path: str, key: str, members: dict[str, bytes]) -> tuple:
    encoded = next((members[e] for e in image_exts if e in members), b'')
    texts: list[str] = []
    for ext in text_exts:
      if ext in members:
        texts = _wds_texts(ext, members[ext], json_caption_keys)
        break
    return encoded, _SEPARATOR.join(texts), wds_image_id(path, key), STATUS_OK

  def records(path: str):
    reading, count, usable = [0], 0, 0
    try:
      for key, members, offset in _wds_samples(path, reading):
        reading[0] = offset  # the sample being made a record
        record = to_record(path, key, members)
        count += 1
        usable += bool(record[0]) and any(t.strip() for t in record[1].split(_SEPARATOR))
        yield record
    except (tarfile.TarError, EOFError, zlib.error):
      # A shard cut short: the record being read is lost, and counted, and the shard ends there.
      yield b'', '', -1, STATUS_TRUNCATED
      return
    except Exception as e:  # pylint: disable=broad-except  # anything else ends the run, naming where it happened
      raise _ReaderFailure(f'{READER_ERROR} {path}: near byte {reading[0]}: {type(e).__name__}: {e}') from e
    if count and not usable:
      raise _ReaderFailure(_marked(UNUSABLE_SHARD, path, count))

  def chunks(path):
    # Chunks of records, not single ones: from_generator costs ~100 us per element, which would cap a reader thread
    # near 1,500 records/s.
    chunk = []
    for record in records(_to_str(path)):
      chunk.append(record)
      if len(chunk) == _CHUNK:
        yield _columns(chunk)
        chunk = []
    if chunk:
      yield _columns(chunk)

  def read(path: tf.Tensor) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_generator(chunks, args=(path,), output_signature=_CHUNK_SIGNATURE)
    return ds.unbatch().map(_split_texts)

  return read


def wds_contents(path: str, samples: int = _PREVIEW) -> tuple[set[str], set[str]]:
  """(member extensions, keys of the `.json` members) of the first `samples` samples of a WebDataset tar."""
  extensions, json_keys = set(), set()
  try:
    for i, (_, members, _) in enumerate(_wds_samples(path)):
      if i == samples:
        break
      extensions.update(members)
      if 'json' in members:
        try:
          meta = json.loads(members['json'].decode('utf-8', errors='replace'))
        except json.JSONDecodeError:
          continue
        if isinstance(meta, dict):
          json_keys.update(meta)
  except (tarfile.TarError, EOFError, zlib.error, OSError):
    pass  # what was read before the damage is the answer; the reader counts the damage
  return extensions, json_keys


def wds_schema(pattern: str, shards: Sequence[str], image_exts: Sequence[str], text_exts: Sequence[str],
               json_caption_keys: Sequence[str]) -> Schema:
  def found(path: str | None) -> str:
    path = path or shards[0]
    extensions, json_keys = wds_contents(path)
    keys = f', .json keys {sorted(json_keys)}' if json_keys else ''
    return f'the first {_PREVIEW} samples of {path} have member extensions {sorted(extensions)}{keys}'

  wanted = (f'an image member with an extension in data.wds_image_exts={tuple(image_exts)} and a caption member in '
            f'data.wds_text_exts={tuple(text_exts)} (.json: a string or list under '
            f'data.wds_json_caption_keys={tuple(json_caption_keys)})')
  return Schema(f'WebDataset shards {pattern!r}', wanted, found)


def check_wds(path: str, image_exts: Sequence[str], text_exts: Sequence[str],
              json_caption_keys: Sequence[str]) -> None:
  """Raises UnusableSourceError when the first samples of a shard have no image, or no caption, the config names."""
  extensions, json_keys = wds_contents(path)
  if not extensions:
    return  # an empty or unreadable shard: the reader counts it
  problems = []
  if not extensions & {e.lower() for e in image_exts}:
    problems.append(f'no member has an extension in data.wds_image_exts={tuple(image_exts)}')
  texts = extensions & {e.lower() for e in text_exts}
  if not texts:
    problems.append(f'no member has an extension in data.wds_text_exts={tuple(text_exts)}')
  elif texts == {'json'} and not json_keys & set(json_caption_keys):
    problems.append(f'no .json member has a key in data.wds_json_caption_keys={tuple(json_caption_keys)}')
  if problems:
    keys = f', .json keys {sorted(json_keys)}' if json_keys else ''
    raise faults.UnusableSourceError(f'{path}: in its first {_PREVIEW} samples, {"; ".join(problems)}; they have '
                                     f'member extensions {sorted(extensions)}{keys}')


_SEPARATOR = '\x1f'  # Joins a record's captions into one string while records travel in chunks.
_CHUNK_SIGNATURE = {
    'encoded': tf.TensorSpec([None], tf.string),
    'texts': tf.TensorSpec([None], tf.string),
    'image_id': tf.TensorSpec([None], tf.int64),
    'status': tf.TensorSpec([None], tf.int32),
}


def _columns(records: list[tuple]) -> dict:
  encoded, texts, ids, status = zip(*records)
  return {'encoded': np.array(encoded, dtype=object), 'texts': np.array(texts, dtype=object),
          'image_id': np.array(ids, np.int64), 'status': np.array(status, np.int32)}


def _split_texts(record: dict) -> dict:
  """Undoes the joining of captions: '' → no caption, else split on the separator."""
  joined = record['texts']
  texts = tf.cond(tf.strings.length(joined) > 0, lambda: tf.strings.split(joined, _SEPARATOR),
                  lambda: tf.zeros([0], tf.string))
  return {**record, 'texts': texts}


def _wds_texts(ext: str, payload: bytes, json_caption_keys: Sequence[str]) -> list[str]:
  """Captions from a `.txt` (one caption) or `.json` member (a string or a list under one of the keys).

  Invalid UTF-8 is replaced by U+FFFD (the policy of every text reader here); non-string list items are not captions.
  """
  text = payload.decode('utf-8', errors='replace')
  if ext != 'json':
    return [text.strip()]
  try:
    meta = json.loads(text)
  except json.JSONDecodeError:
    return []
  for name in json_caption_keys:
    value = meta.get(name) if isinstance(meta, dict) else None
    if isinstance(value, str):
      return [value]
    if isinstance(value, list):
      return [v for v in value if isinstance(v, str)]
  return []


# ---------------------------------------------------------------------------------------------------- TFRecord


def tfrecord_frames(path: str, limit: int | None = None) -> tuple[list[tuple[int, int]], bool]:
  """([(byte offset, payload length)] of the records whose frame lies wholly inside the file (the first `limit`),
  whether the file ends inside a record).

  Walks the TFRecord framing (uint64 length, 4-byte crc, payload, 4-byte crc) with one seek per record, so a cut
  file yields its complete records and one counted truncation instead of a DataLossError mid-epoch.
  """
  size = os.path.getsize(path)
  position, frames = 0, []
  with open(path, 'rb') as f:
    while position < size and (limit is None or len(frames) < limit):
      if position + 12 > size:
        return frames, True
      f.seek(position)
      (length,) = struct.unpack('<Q', f.read(8))
      end = position + 12 + length + 4
      if end > size:
        return frames, True
      frames.append((position, length))
      position = end
  return frames, False


def count_complete_tfrecords(path: str) -> tuple[int, bool]:
  """(records whose frame lies wholly inside the file, whether the file ends inside a record)."""
  frames, truncated = tfrecord_frames(path)
  return len(frames), truncated


def _first_examples(path: str, count: int = _PREVIEW) -> list[tf.train.Example | None]:
  """The first `count` records of a TFRecord file as tf.train.Example (None for one that does not parse)."""
  examples = []
  frames, _ = tfrecord_frames(path, limit=count)
  with open(path, 'rb') as f:
    for offset, length in frames:
      f.seek(offset + 12)
      try:
        examples.append(tf.train.Example.FromString(f.read(length)))
      except Exception:  # pylint: disable=broad-except  # protobuf's DecodeError: a record that is no Example
        examples.append(None)
  return examples


def _feature_kinds(examples: Iterable[tf.train.Example | None]) -> dict[str, set[str]]:
  """{feature name: the kinds ('bytes_list', 'int64_list', 'float_list') it holds} over some examples."""
  kinds: dict[str, set[str]] = collections.defaultdict(set)
  for example in examples:
    if example is not None:
      for name, feature in example.features.feature.items():
        kinds[name].add(feature.WhichOneof('kind') or 'empty')
  return dict(kinds)


def _tfrecord_wanted(image_key: str, caption_key: str, id_key: str) -> list[tuple[str, str, str]]:
  """(config field, feature name, kind) of each feature the reader parses."""
  wanted = [('data.tfrecord_image_key', image_key, 'bytes_list'), ('data.tfrecord_caption_key', caption_key,
                                                                     'bytes_list')]
  if id_key:
    wanted.append(('data.tfrecord_id_key', id_key, 'int64_list'))
  return wanted


def _describe_kinds(kinds: dict[str, set[str]]) -> str:
  return ', '.join(f'{name} ({"/".join(sorted(k))})' for name, k in sorted(kinds.items())) or 'no feature'


def check_tfrecord(path: str, image_key: str, caption_key: str, id_key: str) -> None:
  """Raises when the first records of a shard lack a feature the config names, or hold it with another type."""
  examples = _first_examples(path)
  if not examples:
    return  # an empty shard: nothing to check
  kinds = _feature_kinds(examples)
  missing, mistyped = [], []
  for field, key, kind in _tfrecord_wanted(image_key, caption_key, id_key):
    if key not in kinds:
      missing.append(f'{field}={key!r} is in none of them')
    elif kinds[key] - {kind}:
      mistyped.append(f'{field}={key!r} holds {"/".join(sorted(kinds[key]))}, not {kind}')
  if missing or mistyped:
    error = faults.ReaderError if mistyped and not missing else faults.UnusableSourceError
    raise error(f'{path}: in its first {len(examples)} records, {"; ".join(missing + mistyped)}; their features: '
                f'{_describe_kinds(kinds)}')


def _record_problem(serialized: bytes, image_key: str, caption_key: str, id_key: str) -> str | None:
  """Why one serialized record cannot be parsed with the config's features, or None when it can."""
  try:
    example = tf.train.Example.FromString(serialized)
  except Exception:  # pylint: disable=broad-except  # protobuf's DecodeError
    return 'not a tf.train.Example'
  features = example.features.feature
  for field, key, kind in _tfrecord_wanted(image_key, caption_key, id_key):
    if key in features:
      have = features[key].WhichOneof('kind')
      if have != kind:
        return (f'feature {key!r} ({field}) holds {have}, not {kind}; the record has '
                f'{_describe_kinds(_feature_kinds([example]))}')
      values = len(getattr(features[key], kind).value)
      if key != caption_key and values != 1:
        return f'feature {key!r} ({field}) holds {values} values, not one'
  return None


def explain_tfrecord(path: str, index: int, image_key: str, caption_key: str, id_key: str) -> str:
  """Why record `index` of a shard, or one of the _CHUNK after it, could not be read or parsed: the record, its
  byte offset and the cause (a corrupted frame, a feature of another type)."""
  offsets = [offset for offset, _ in tfrecord_frames(path)[0]]

  def where(i: int) -> str:
    return f'record {i} (byte {offsets[i]})' if i < len(offsets) else f'record {i}'

  i = index
  try:
    for i, serialized in enumerate(tf.data.TFRecordDataset(path).skip(index).take(_CHUNK).as_numpy_iterator(),
                                   index):
      problem = _record_problem(serialized, image_key, caption_key, id_key)
      if problem:
        return f'{where(i)}: {problem}'
  except tf.errors.OpError as e:
    corrupted = re.search(r'corrupted record at (\d+)', e.message)
    if corrupted:
      # TensorFlow's offset lies inside the record's frame (its payload's start when the payload's checksum fails):
      # the record is the last one starting at or before it.
      i = max(0, bisect.bisect_right(offsets, int(corrupted.group(1))) - 1)
    return f'{where(i)}: {type(e).__name__}: {tf_message(e)}'
  return f'records {index} to {index + _CHUNK - 1} did not parse as tf.train.Example with these features'


def tfrecord_schema(pattern: str, shards: Sequence[str], image_key: str, caption_key: str, id_key: str) -> Schema:
  def found(path: str | None) -> str:
    path = path or shards[0]
    examples = _first_examples(path)
    return f'the first {len(examples)} records of {path} have features {_describe_kinds(_feature_kinds(examples))}'

  wanted = ', '.join(f'{field}={key!r} ({kind})' for field, key, kind in _tfrecord_wanted(image_key, caption_key,
                                                                                           id_key))
  return Schema(f'TFRecord shards {pattern!r}', wanted, found,
                lambda path, index: explain_tfrecord(path, index, image_key, caption_key, id_key))


def tfrecord_reader(image_key: str, caption_key: str, id_key: str) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """A shard reader for TFRecords of tf.train.Example; the caption feature may hold several strings.

  Records are parsed in batches of _CHUNK (vectorised). A batch that fails to read or parse (a corrupted record, a
  feature of another type) is dropped, and the gap it leaves in the record count fails the run naming the shard and
  the record (UNREADABLE); a shard none of whose records has both an image and a usable caption fails too
  (UNUSABLE_SHARD). Failing on the dropped batch, not at the error itself, is what lets the error name its shard:
  tf.data's own errors do not.
  """
  spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=''),
          caption_key: tf.io.RaggedFeature(tf.string, row_splits_dtype=tf.int64)}
  if id_key:
    spec[id_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)

  def parse(first: tf.Tensor, serialized: tf.Tensor, path: tf.Tensor) -> dict:
    """Records `first`, `first + 1`, ... (k serialized) → {'first', 'usable' (how many), 'end', 'records'}."""
    example = tf.io.parse_example(serialized, spec)
    count = tf.shape(serialized, out_type=tf.int64)[0]
    if id_key:
      image_id = example[id_key]
    else:
      # Without an id feature: (shard, position) hashed, stable across runs.
      positions = tf.strings.as_string(first + tf.range(count))
      image_id = tf.strings.to_hash_bucket_fast(tf.strings.join([path, positions], ':'), 2**62)
    texts = example[caption_key]
    usable = (tf.strings.length(example[image_key]) > 0) & tf.reduce_any(
        tf.ragged.map_flat_values(preprocess.usable_captions, texts), axis=1)
    records = {'encoded': example[image_key], 'texts': texts, 'image_id': image_id,
               'status': tf.fill([count], STATUS_OK)}
    return {'first': first, 'usable': tf.reduce_sum(tf.cast(usable, tf.int64)), 'end': tf.constant(False),
            'records': records}

  def end(count: tf.Tensor, truncated: tf.Tensor) -> dict:
    """The last element: where the records should have ended, and a placeholder for a record cut short."""
    records = {'encoded': tf.fill([truncated], ''),
               'texts': tf.RaggedTensor.from_row_lengths(tf.zeros([0], tf.string), tf.zeros([truncated], tf.int64)),
               'image_id': tf.fill([truncated], tf.constant(-1, tf.int64)),
               'status': tf.fill([truncated], STATUS_TRUNCATED)}
    return {'first': count, 'usable': tf.constant(0, tf.int64), 'end': tf.constant(True), 'records': records}

  def frames(path) -> tuple[np.int64, np.int64]:
    count, truncated = count_complete_tfrecords(_to_str(path))
    return np.int64(count), np.int64(truncated)

  def read(path: tf.Tensor) -> tf.data.Dataset:
    count, truncated = tf.numpy_function(frames, [path], [tf.int64, tf.int64])
    count.set_shape([])
    truncated.set_shape([])

    def check(state: tuple[tf.Tensor, tf.Tensor], batch: dict):
      expected, usable = state
      usable += batch['usable']
      in_order = tf.debugging.Assert(tf.equal(batch['first'], expected), [UNREADABLE, path, expected])
      some_usable = tf.debugging.Assert(~batch['end'] | (usable > 0) | (expected == 0),
                                        [UNUSABLE_SHARD, path, expected])
      with tf.control_dependencies([in_order, some_usable]):
        step = tf.where(batch['end'], tf.constant(0, tf.int64),
                        tf.shape(batch['records']['status'], out_type=tf.int64)[0])
        return (expected + step, tf.identity(usable)), batch['records']

    batches = tf.data.TFRecordDataset(path).take(count).batch(_CHUNK).enumerate().map(
        lambda i, serialized: parse(i * _CHUNK, serialized, path)).ignore_errors()
    last = tf.data.Dataset.from_tensors(end(count, truncated))
    state = (tf.constant(0, tf.int64), tf.constant(0, tf.int64))
    return batches.concatenate(last).scan(state, check).unbatch()

  return read


# ---------------------------------------------------------------------------------------------------- indexed


@dataclasses.dataclass
class IndexedSource:
  """`size` examples addressable by index.

  Attributes:
    size: examples in the split, all processes together.
    read: a dataset of batches of dicts holding 'index' (k,) int64 → a dataset of single examples, the same dicts
      with the record fields added, in the same order. Batches amortise per-element costs (index arithmetic and
      Python calls are vectorised).
    schema: what the source reads, for messages about it.
    counts: what reading it up front found (a captions file: faults.FILE_COUNTS), for the skip counters.
  """
  size: int
  read: Callable[[tf.data.Dataset], tf.data.Dataset]
  schema: Schema = Schema('an indexed source', '')
  counts: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------- captions files


@dataclasses.dataclass
class Captions:
  """A captions file read: its images in order of first appearance, and what was wrong with it.

  Attributes:
    images: (image path relative to the folder, captions, image id, first line) per image.
    rows: rows read (blank lines excluded), the malformed ones included.
    counts: faults.FILE_COUNTS: rows skipped as malformed, null or non-string captions dropped, lines whose invalid
      UTF-8 was replaced by U+FFFD.
    notes: 'path:line: what' for the first few of them.
  """
  images: list[tuple[str, list[str], int, int]]
  rows: int
  counts: dict[str, int]
  notes: list[str]


_NOTES = 5  # problems a captions file's warning quotes by line


def _decoded_lines(raw: Iterable[bytes], note: Callable[[int, str, str], None]) -> Iterator[str]:
  """Text lines of a captions file: UTF-8 (a leading byte-order mark dropped); invalid bytes become U+FFFD, counted.

  Replacing, not skipping: the row keeps its image and the rest of its caption, as the WebDataset and TFRecord
  readers do (the tokenizer then sees U+FFFD, an unknown character).
  """
  for number, line in enumerate(raw, 1):
    encoding = 'utf-8-sig' if number == 1 else 'utf-8'
    try:
      yield line.decode(encoding)
    except UnicodeDecodeError as e:
      note(number, 'invalid_utf8', f'invalid UTF-8 at byte {e.start} of the line, replaced by U+FFFD')
      yield line.decode(encoding, errors='replace')


def _image_id(value) -> int | None:
  """An image_id cell or JSON value → int, None when absent; ValueError when it is not an integer."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  if isinstance(value, str) and re.fullmatch(r'\s*-?\d+\s*', value):
    return int(value)
  raise ValueError(f'image_id {value!r} is not an integer')


_Row = tuple[int, str, list, int | None]  # (line, image, captions (anything JSON holds), image id)


def _csv_rows(lines: Iterator[str], path: str, note: Callable[[int, str, str], None]) -> Iterator[_Row]:
  """The well-formed rows of a CSV captions file, by its header; the others noted as malformed."""
  reader = csv.reader(lines)
  try:
    header = [name.strip() for name in next(reader, [])]
    if 'image' not in header or 'caption' not in header:
      raise ValueError(f'captions file {path!r} needs a header with columns image,caption; got {header}')
    column = {name: i for i, name in enumerate(header)}
    for row in reader:
      line = reader.line_num
      if not any(cell.strip() for cell in row):
        continue
      if len(row) != len(header):
        note(line, 'malformed_row', f'{len(row)} fields, the header has {len(header)}: skipped')
      elif not row[column['image']].strip():
        note(line, 'malformed_row', 'no image: skipped')
      else:
        try:
          image_id = _image_id(row[column['image_id']]) if 'image_id' in column else None
        except ValueError as e:
          note(line, 'malformed_row', f'{e}: skipped')
          continue
        yield line, row[column['image']].strip(), [row[column['caption']]], image_id
  except csv.Error as e:
    raise ValueError(f'{path}:{reader.line_num}: {e}') from e


def _jsonl_rows(lines: Iterator[str], note: Callable[[int, str, str], None]) -> Iterator[_Row]:
  """The well-formed rows of a JSON-lines captions file; the others noted as malformed."""
  for line, text in enumerate(lines, 1):
    if not text.strip():
      continue
    try:
      row = json.loads(text)
    except json.JSONDecodeError as e:
      note(line, 'malformed_row', f'not JSON ({e.msg}): skipped')
      continue
    if not isinstance(row, dict):
      note(line, 'malformed_row', 'not a JSON object: skipped')
    elif not isinstance(row.get('image'), str) or not row['image'].strip():
      note(line, 'malformed_row', 'no "image" string: skipped')
    elif 'captions' not in row and 'caption' not in row:
      note(line, 'malformed_row', 'neither "caption" nor "captions": skipped')
    else:
      captions = row['captions'] if 'captions' in row else row['caption']
      try:
        image_id = _image_id(row.get('image_id'))
      except ValueError as e:
        note(line, 'malformed_row', f'{e}: skipped')
        continue
      yield line, row['image'].strip(), captions if isinstance(captions, list) else [captions], image_id


def parse_captions(raw_lines: Iterable[bytes], path: str) -> Captions:
  """Rows of a CSV (`image,caption[,image_id]`, by its header) or JSON-lines captions file, grouped per image.

  A pure function of the bytes: the policy (docs/data.md, "Bad data") is that a malformed row (CSV: a field count
  other than the header's, no image, a non-integer image_id; JSON: not an object, no "image" string, neither
  "caption" nor "captions", a non-integer "image_id") is skipped and counted; a null or non-string caption is
  dropped and counted, never made a string; invalid UTF-8 is replaced and counted. Raises ValueError naming the
  file (and line) for a CSV without an image,caption header or a row the csv module cannot read, and
  faults.ImageIdCollisionError for ids that do not identify images.
  """
  counts = {key: 0 for key in faults.FILE_COUNTS}
  notes: list[str] = []

  def note(line: int, kind: str, what: str) -> None:
    counts[kind] += 1
    if len(notes) < _NOTES:
      notes.append(f'{path}:{line}: {what}')

  lines = _decoded_lines(raw_lines, note)
  grouped: dict[str, list] = {}  # image → [captions, image id, first line]
  wellformed = 0
  for line, image, captions, image_id in (_csv_rows(lines, path, note) if path.endswith('.csv') else
                                          _jsonl_rows(lines, note)):
    wellformed += 1
    for caption in captions:
      if not isinstance(caption, str):
        note(line, 'bad_caption', f'caption {json.dumps(caption)} is not a string: dropped')
    entry = grouped.setdefault(image, [[], image_id, line])
    if image_id is not None and entry[1] is not None and entry[1] != image_id:
      raise faults.ImageIdCollisionError(f'{path}:{line}: image {image!r} has image_id {image_id}, but line '
                                         f'{entry[2]} gave it {entry[1]}; one image, one id')
    entry[1] = entry[1] if image_id is None else image_id
    entry[0].extend(c for c in captions if isinstance(c, str))
  # Without an image_id, an image's id is its place in the file (order of first appearance).
  images = [(image, captions, i if image_id is None else image_id, line)
            for i, (image, (captions, image_id, line)) in enumerate(grouped.items())]
  _refuse_shared_ids(images, path)
  return Captions(images, wellformed + counts['malformed_row'], counts, notes)


def _refuse_shared_ids(images: Sequence[tuple[str, list[str], int, int]], path: str) -> None:
  """Raises ImageIdCollisionError when different images share an id: the pipeline would make them each other's ITC
  positives. Refused, not renumbered: an explicit id column is the user's statement of which rows are one image."""
  owners = collections.defaultdict(list)
  for image, _, image_id, line in images:
    owners[image_id].append((image, line))
  shared = {image_id: names for image_id, names in owners.items() if len(names) > 1}
  if shared:
    image_id, names = next(iter(shared.items()))
    listed = ', '.join(f'{image!r} (line {line})' for image, line in names[:4])
    raise faults.ImageIdCollisionError(
        f'{path}: image_id {image_id} names {len(names)} different images: {listed}; {len(shared)} id(s) are shared. '
        'Different images under one id would be each other\'s ITC positives: give each image its own id (rows of '
        'one image share it), or drop the image_id column to number images in order')


@functools.lru_cache(maxsize=16)
def _read_captions(path: str, mtime_ns: int, size: int) -> Captions:
  """`parse_captions` of a file, once per version of it: a run builds its sources several times (a check before
  training, the training input, each validation), and each warning should appear once."""
  del mtime_ns, size  # the cache key
  with open(path, 'rb') as f:
    captions = parse_captions(f, path)
  grouped = captions.rows - captions.counts['malformed_row'] - len(captions.images)
  log.info('%s: %d rows, %d images%s', path, captions.rows, len(captions.images),
           f' ({grouped} rows add captions to an image already listed)' if grouped > 0 else '')
  problems = faults.describe_file_counts(captions.counts)
  if problems:
    log.warning('%s: %s; first: %s', path, problems, '; '.join(captions.notes))
  return captions


def read_captions_file(path: str) -> Captions:
  """A captions file read with `parse_captions`' policy; FileNotFoundError or ValueError naming it."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'captions file {path!r} does not exist')
  stat = os.stat(path)
  captions = _read_captions(path, stat.st_mtime_ns, stat.st_size)
  if not captions.images:
    counts = faults.describe_file_counts(captions.counts)
    counts = f'; {counts}' if counts else ''
    first = f'; first: {"; ".join(captions.notes)}' if captions.notes else ''
    raise ValueError(f'captions file {path!r} has no usable rows ({captions.rows} rows{counts}){first}')
  return captions


def folder_source(folder: str, captions_file: str) -> IndexedSource:
  """A folder of images with a captions file; several rows per image become one example with several captions."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'image folder {folder!r} does not exist')
  captions = read_captions_file(captions_file)
  rows = captions.images
  paths = [os.path.join(folder, image) for image, _, _, _ in rows]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} images listed in {captions_file!r} do not exist, e.g. {missing[:3]}')
  # Captions as one flat vector plus row splits: a few tensors instead of one per image.
  flat = tf.constant([c for _, texts, _, _ in rows for c in texts] or [''], tf.string)
  splits = tf.constant(np.cumsum([0] + [len(texts) for _, texts, _, _ in rows]), tf.int64)
  ids = tf.constant([image_id for _, _, image_id, _ in rows], tf.int64)
  path_tensor = tf.constant(paths)

  def lookup(meta: dict) -> dict:
    i = meta['index']
    return {**meta, 'encoded': tf.io.read_file(tf.gather(path_tensor, i)),
            'texts': flat[splits[i]:splits[i + 1]], 'image_id': tf.gather(ids, i),
            'status': tf.constant(STATUS_OK)}

  def read(indices: tf.data.Dataset) -> tf.data.Dataset:
    return indices.unbatch().map(lookup, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  schema = Schema(f'folder {folder!r} with captions file {captions_file!r}',
                  'images of the folder named in the "image" column, captions in the "caption" column',
                  lambda path: f'{captions_file} lists {len(rows)} images ({captions.rows} rows)')
  return IndexedSource(size=len(rows), read=read, schema=schema, counts=dict(captions.counts))


# ---------------------------------------------------------------------------------------------------- tfds


def _get(tree: dict, path: str):
  """tree['a/b'] if that key exists (COCO's 'image/id'), else tree['a']['b'] (COCO's 'captions/text')."""
  if path in tree:
    return tree[path]
  head, _, rest = path.partition('/')
  if head not in tree or not rest:
    raise KeyError(f'feature {path!r} not found; features here: {sorted(tree)}')
  return _get(tree[head], rest)


def _skip_image_decoding(image_key: str) -> dict:
  """The tfds decoders tree that leaves the image at `image_key` encoded: the pipeline decodes it, counted."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  *parents, leaf = image_key.split('/')
  tree: dict = {leaf: tfds.decode.SkipDecoding()}
  for name in reversed(parents):
    tree = {name: tree}
  return tree


def _tfds_record(example: dict, image_key: str, captions_key: str, id_key: str, fallback_id: tf.Tensor) -> dict:
  texts = tf.reshape(tf.cast(_get(example, captions_key), tf.string), [-1])
  image_id = tf.cast(_get(example, id_key), tf.int64) if id_key else tf.cast(fallback_id, tf.int64)
  return {'encoded': _get(example, image_key), 'texts': texts, 'image_id': image_id,
          'status': tf.constant(STATUS_OK)}


def tfds_builder(name: str, data_dir: str):
  """The tfds builder `name` (registered name, or the folder of a prepared dataset version)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if os.path.isdir(name):
    # A prepared dataset's version folder (e.g. DIR/xmodal_shapes/s1_64px_40_10_10_10/1.0.0): any config, no code.
    return tfds.builder_from_directory(name)
  if name.split('/')[0].split(':')[0] == 'xmodal_shapes':
    # Registers the builder with tfds.
    from xmodal.data.shapes import builder  # pylint: disable=g-import-not-at-top,unused-import
  return tfds.builder(name, data_dir=data_dir or None)


def tfds_is_random_access(builder) -> bool:
  """Whether the prepared dataset is stored as array_record (random access)."""
  try:
    return str(builder.info.file_format.value) == 'array_record'
  except (AttributeError, ValueError):
    return False


@dataclasses.dataclass(frozen=True)
class RegionKeys:
  """Where a tfds dataset keeps its images' regions (data.region_boxes_key / data.region_phrases_key): per image a
  sequence of boxes (tfds BBoxFeature: ymin, xmin, ymax, xmax in [0, 1]) and, in the same order, the phrase naming
  each; `max_regions` of them are read."""
  boxes: str
  phrases: str
  max_regions: int


def tfds_indexed_source(builder, split: str, image_key: str, captions_key: str, id_key: str,
                        negatives_key: str = '', regions: RegionKeys | None = None) -> IndexedSource:
  """A tfds array_record split read by index: raw records in batches, parsed in the graph, vectorised.

  With `negatives_key`, records also carry 'negatives': the stored hard negative captions of the image. With
  `regions`, 'region_boxes' (R, 4) float32 (ymin, xmin, ymax, xmax in [0, 1]) and 'region_phrases' (R,) string: the
  image's first R regions, padded with zero boxes and '' phrases.

  Only the three needed features are parsed (`tf.io.parse_example` on the batch) — several times cheaper than tfds'
  full deserialisation of every feature. tfds stores nested features flattened with '/', which is how the config
  names them, and images (tfds.features.Image) as encoded bytes.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  _require_prepared(builder)
  source = builder.as_data_source(split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  # Several caption features may be named, comma-separated, and are concatenated in that order (xmodal_shapes
  # test_hard: 'captions,negative_caption' gives each image its true caption, then its hard negative).
  caption_keys = captions_key.split(',')
  spec = {image_key: tf.io.FixedLenFeature([], tf.string, default_value='')}
  text_keys = caption_keys + ([negatives_key] if negatives_key else [])
  spec.update({key: tf.io.RaggedFeature(tf.string) for key in text_keys})
  if id_key:
    spec[id_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)
  if regions is not None:
    spec[regions.boxes] = tf.io.RaggedFeature(tf.float32)
    spec[regions.phrases] = tf.io.RaggedFeature(tf.string)

  def read_raw(indices: np.ndarray) -> np.ndarray:
    return np.array(source.__getitems__([int(i) for i in indices]), dtype=object)

  def fetch(meta: dict) -> dict:
    serialized = tf.numpy_function(read_raw, [meta['index']], tf.string, stateful=False)
    serialized.set_shape(meta['index'].shape)
    example = tf.io.parse_example(serialized, spec)
    texts = tf.concat([example[key] for key in caption_keys], axis=1)
    record = {**meta, 'encoded': example[image_key], 'texts': texts,
              'image_id': example[id_key] if id_key else meta['index'],
              'status': tf.zeros_like(meta['index'], tf.int32) + STATUS_OK}
    if negatives_key:
      record['negatives'] = example[negatives_key]
    if regions is not None:
      count = regions.max_regions
      flat = example[regions.boxes]  # (k, None): four numbers per box
      boxes = tf.RaggedTensor.from_row_lengths(tf.reshape(flat.values, [-1, 4]), flat.row_lengths() // 4)
      record['region_boxes'] = boxes[:, :count].to_tensor(shape=[None, count, 4])
      record['region_phrases'] = example[regions.phrases][:, :count].to_tensor(default_value='', shape=[None, count])
    return record

  def read(indices: tf.data.Dataset) -> tf.data.Dataset:
    # Batched reads amortise the Python call and the parse; decoding then runs per example, off the GIL.
    return indices.map(fetch, num_parallel_calls=2, deterministic=True).unbatch()

  return IndexedSource(size=len(source), read=read)


def tfds_stream_reader(builder, split: str, image_key: str, captions_key: str, id_key: str, process_index: int,
                       process_count: int) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """Reads this process's part of a tfds split (any file format) in a fixed order; `epoch` is ignored."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # No is_prepared() check: tfds' own error names the folder, and tfds.testing.mock_data serves unprepared builders.
  part = tfds.even_splits(split, n=process_count, drop_remainder=False)[process_index]
  read_config = tfds.ReadConfig(shuffle_seed=None, interleave_cycle_length=1, add_tfds_id=False)

  def epoch_records(epoch: tf.Tensor) -> tf.data.Dataset:
    del epoch  # The order inside a split is fixed; the pipeline's window shuffle varies it per epoch.
    ds = builder.as_dataset(split=part, shuffle_files=False, decoders=_skip_image_decoding(image_key),
                            read_config=read_config)
    # Without an id feature, ids are positions interleaved over processes: each process's part starts at 0, and
    # positions alone would give images of different processes (one global batch) the same id.
    return ds.enumerate().map(lambda i, ex: _tfds_record(ex, image_key, captions_key, id_key,
                                                          i * process_count + process_index))

  return epoch_records


def _require_prepared(builder) -> None:
  # Checked here so that a missing dataset names its directory rather than failing inside tf.data.
  if not builder.is_prepared():
    raise FileNotFoundError(f'tfds dataset {builder.name!r} is not prepared in {builder.data_dir!r}; build it '
                            'first (xmodal data build, or tfds build)')


def tfds_feature_names(builder) -> list[str]:
  """Every feature path of a tfds builder, nested ones joined with '/' ('image', 'captions', 'captions/text')."""
  names = []

  def walk(prefix: str, feature) -> None:
    inner = getattr(feature, 'feature', None)  # tfds.features.Sequence wraps a feature (COCO's captions)
    children = feature if hasattr(feature, 'items') else inner if hasattr(inner, 'items') else None
    if children is None:
      return
    for name, child in children.items():
      names.append(prefix + name)
      walk(prefix + name + '/', child)

  walk('', builder.info.features)
  return sorted(names)


def tfds_schema(builder, split: str, keys: dict[str, str]) -> Schema:
  """`keys`: {config field: feature path} of the features read."""
  wanted = ', '.join(f'{field}={key!r}' for field, key in keys.items() if key)
  return Schema(f'tfds {builder.name!r} split {split!r}', wanted,
                lambda path: f'its features are {tfds_feature_names(builder)}')


def check_tfds(builder, split: str, keys: dict[str, str]) -> None:
  """Raises UnusableSourceError for a feature the config names that the dataset lacks, or a split it does not have.

  `keys`: {config field: feature path}; captions_key may name several features, comma-separated.
  """
  names = set(tfds_feature_names(builder))
  missing = [f'{field}={key!r}' for field, value in keys.items() if value for key in value.split(',')
             if key not in names]
  if missing:
    raise faults.UnusableSourceError(f'tfds {builder.name!r}: no feature {", ".join(missing)}; its features are '
                                     f'{sorted(names)}')
  if builder.is_prepared():
    try:
      builder.info.splits[split]
    except (KeyError, ValueError) as e:
      raise faults.UnusableSourceError(f'tfds {builder.name!r}: no split {split!r} ({e}); its splits are '
                                       f'{sorted(builder.info.splits)}') from e
