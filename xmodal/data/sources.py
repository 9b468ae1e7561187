"""Image-text sources, each read into the same record: {'encoded', 'texts', 'image_id', 'status'}.

A record holds 'encoded' tf.string () image bytes, 'texts' tf.string (C,) captions, 'image_id' tf.int64 () and
'status' tf.int32 () (STATUS_OK, or STATUS_TRUNCATED for a placeholder standing for a record cut short, which the
pipeline skips and counts). Two kinds of source:

- `IndexedSource` (tfds array_record, folder): `size` examples addressable by index; the pipeline computes which
  indices to read, so the order is a pure function of (seed, epoch, position) and resuming is O(1).
- `StreamSource` (WebDataset, TFRecord, tfds streaming): `epoch_records(epoch)` reads this process's shards in a
  deterministic order; resuming replays the reads of the current epoch up to the saved position (no decoding).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf

STATUS_OK = 0
STATUS_TRUNCATED = 1

RECORD_SIGNATURE = {
    'encoded': tf.TensorSpec([], tf.string),
    'texts': tf.TensorSpec([None], tf.string),
    'image_id': tf.TensorSpec([], tf.int64),
    'status': tf.TensorSpec([], tf.int32),
}


def _truncated_record() -> dict:
  return {'encoded': b'', 'texts': np.zeros([0], object), 'image_id': np.int64(-1),
          'status': np.int32(STATUS_TRUNCATED)}


def expand_glob(pattern: str, what: str) -> list[str]:
  """Sorted files matching `pattern`; a clear error naming the pattern when there are none."""
  if not pattern:
    raise FileNotFoundError(f'{what} is empty: set it to a glob of shard files')
  files = sorted(glob.glob(pattern))
  if not files:
    raise FileNotFoundError(f'{what}: no file matches {pattern!r}')
  return files


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
  """An int64 id for a non-numeric key, the same in every process and run (Python's hash() is salted)."""
  return zlib.crc32(text.encode())


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
  """
  shards: Sequence[str]
  read_shard: Callable[[tf.Tensor], tf.data.Dataset]
  seed: int = 0
  cycle_length: int = 8
  num_parallel_calls: int = -1
  shuffle_shards: bool = True

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


def wds_reader(image_exts: Sequence[str], text_exts: Sequence[str],
               json_caption_keys: Sequence[str]) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """A shard reader for WebDataset tars: members sharing a key (path up to the first '.') form one record."""
  image_exts = tuple(e.lower() for e in image_exts)
  text_exts = tuple(e.lower() for e in text_exts)

  def to_record(key: str, members: dict[str, bytes]) -> tuple:
    encoded = next((members[e] for e in image_exts if e in members), b'')
    texts: list[str] = []
    for ext in text_exts:
      if ext in members:
        texts = _wds_texts(ext, members[ext], json_caption_keys)
        break
    image_id = int(os.path.basename(key)) if os.path.basename(key).isdigit() else stable_id(key)
    return encoded, _SEPARATOR.join(texts), image_id, STATUS_OK

  def records(path: str):
    key, members = None, {}
    try:
      # Stream mode: sequential reads, what a tar on network storage wants.
      with tarfile.open(path, 'r|*') as tar:
        for member in tar:
          if not member.isfile():
            continue
          directory, base = os.path.split(member.name)
          stem, _, ext = base.partition('.')
          member_key = os.path.join(directory, stem)
          if member_key != key and members:
            yield to_record(key, members)
            members = {}
          key = member_key
          members[ext.lower()] = tar.extractfile(member).read()
      if members:
        yield to_record(key, members)
    except (tarfile.TarError, EOFError, zlib.error):
      # A shard cut short: the record being read is lost, and counted, and the shard ends there.
      yield b'', '', -1, STATUS_TRUNCATED

  def chunks(path):
    # Chunks of records, not single ones: from_generator costs ~100 us per element, which would cap a reader thread
    # near 1,500 records/s.
    chunk = []
    for record in records(_to_str(path)):
      chunk.append(record)
      if len(chunk) == _WDS_CHUNK:
        yield _columns(chunk)
        chunk = []
    if chunk:
      yield _columns(chunk)

  def read(path: tf.Tensor) -> tf.data.Dataset:
    ds = tf.data.Dataset.from_generator(chunks, args=(path,), output_signature=_CHUNK_SIGNATURE)
    return ds.unbatch().map(_split_texts)

  return read


_SEPARATOR = '\x1f'  # Joins a record's captions into one string while records travel in chunks.
_WDS_CHUNK = 64
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
  """Captions from a `.txt` (one caption) or `.json` member (a string or a list under one of the keys)."""
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
      return [str(v) for v in value]
  return []


def count_complete_tfrecords(path: str) -> tuple[int, bool]:
  """(records whose frame lies wholly inside the file, whether the file ends inside a record).

  Walks the TFRecord framing (uint64 length, 4-byte crc, payload, 4-byte crc) with one seek per record, so a cut
  file yields its complete records and one counted truncation instead of a DataLossError mid-epoch.
  """
  size = os.path.getsize(path)
  position, count = 0, 0
  with open(path, 'rb') as f:
    while position < size:
      if position + 12 > size:
        return count, True
      f.seek(position)
      (length,) = struct.unpack('<Q', f.read(8))
      end = position + 12 + length + 4
      if end > size:
        return count, True
      position, count = end, count + 1
  return count, False


def tfrecord_reader(image_key: str, caption_key: str, id_key: str) -> Callable[[tf.Tensor], tf.data.Dataset]:
  """A shard reader for TFRecords of tf.train.Example; the caption feature may hold several strings."""
  features = {image_key: tf.io.FixedLenFeature([], tf.string, default_value=''),
              caption_key: tf.io.VarLenFeature(tf.string)}
  if id_key:
    features[id_key] = tf.io.FixedLenFeature([], tf.int64, default_value=-1)

  def parse(serialized: tf.Tensor, position: tf.Tensor, path: tf.Tensor) -> dict:
    example = tf.io.parse_single_example(serialized, features)
    if id_key:
      image_id = example[id_key]
    else:
      # Without an id feature: (shard, position) hashed, stable across runs.
      image_id = tf.strings.to_hash_bucket_fast(tf.strings.join([path, tf.strings.as_string(position)], ':'),
                                                2**62)
    return {'encoded': example[image_key], 'texts': tf.sparse.to_dense(example[caption_key]),
            'image_id': image_id, 'status': tf.constant(STATUS_OK)}

  def frames(path) -> tuple[np.int64, np.int64]:
    count, truncated = count_complete_tfrecords(_to_str(path))
    return np.int64(count), np.int64(truncated)

  def read(path: tf.Tensor) -> tf.data.Dataset:
    count, truncated = tf.numpy_function(frames, [path], [tf.int64, tf.int64])
    count.set_shape([])
    truncated.set_shape([])
    records = tf.data.TFRecordDataset(path).take(count).enumerate().map(lambda i, r: parse(r, i, path))
    cut = tf.data.Dataset.range(truncated).map(lambda _: {
        'encoded': tf.constant(''), 'texts': tf.zeros([0], tf.string), 'image_id': tf.constant(-1, tf.int64),
        'status': tf.constant(STATUS_TRUNCATED)})
    return records.concatenate(cut)

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
  """
  size: int
  read: Callable[[tf.data.Dataset], tf.data.Dataset]


def read_captions_file(path: str) -> list[tuple[str, list[str], int | None]]:
  """Rows of a CSV (`image,caption[,image_id]`) or JSON-lines captions file grouped per image.

  Returns (image path, captions, image id or None) in the order images first appear.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'captions file {path!r} does not exist')
  grouped: dict[str, tuple[list[str], int | None]] = {}

  def add(image: str, captions: Sequence[str], image_id) -> None:
    entry = grouped.setdefault(image, ([], None if image_id in (None, '') else int(image_id)))
    entry[0].extend(str(c) for c in captions)

  with open(path, newline='', encoding='utf-8') as f:
    if path.endswith('.csv'):
      reader = csv.DictReader(f)
      if not reader.fieldnames or 'image' not in reader.fieldnames or 'caption' not in reader.fieldnames:
        raise ValueError(f'captions file {path!r} needs a header with columns image,caption; got {reader.fieldnames}')
      for row in reader:
        add(row['image'], [row['caption'] or ''], row.get('image_id'))
    else:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise ValueError(f'{path}:{number}: not a JSON object ({e})') from e
        captions = row.get('captions', [row['caption']] if 'caption' in row else [])
        add(row['image'], captions if isinstance(captions, list) else [captions], row.get('image_id'))
  return [(image, captions, image_id) for image, (captions, image_id) in grouped.items()]


def folder_source(folder: str, captions_file: str) -> IndexedSource:
  """A folder of images with a captions file; several rows per image become one example with several captions."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f'image folder {folder!r} does not exist')
  rows = read_captions_file(captions_file)
  if not rows:
    raise ValueError(f'captions file {captions_file!r} has no rows')
  paths = [os.path.join(folder, image) for image, _, _ in rows]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f'{len(missing)} images listed in {captions_file!r} do not exist, e.g. {missing[:3]}')
  # Captions as one flat vector plus row splits: a few tensors instead of one per image.
  flat = tf.constant([c for _, captions, _ in rows for c in captions] or [''], tf.string)
  splits = tf.constant(np.cumsum([0] + [len(captions) for _, captions, _ in rows]), tf.int64)
  ids = tf.constant([i if image_id is None else image_id for i, (_, _, image_id) in enumerate(rows)], tf.int64)
  path_tensor = tf.constant(paths)

  def lookup(meta: dict) -> dict:
    i = meta['index']
    return {**meta, 'encoded': tf.io.read_file(tf.gather(path_tensor, i)),
            'texts': flat[splits[i]:splits[i + 1]], 'image_id': tf.gather(ids, i),
            'status': tf.constant(STATUS_OK)}

  def read(indices: tf.data.Dataset) -> tf.data.Dataset:
    return indices.unbatch().map(lookup, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

  return IndexedSource(size=len(rows), read=read)


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


def tfds_indexed_source(builder, split: str, image_key: str, captions_key: str, id_key: str,
                        negatives_key: str = '') -> IndexedSource:
  """A tfds array_record split read by index: raw records in batches, parsed in the graph, vectorised.

  With `negatives_key`, records also carry 'negatives': the stored hard negative captions of the image.

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
    return ds.enumerate().map(lambda i, ex: _tfds_record(ex, image_key, captions_key, id_key, i))

  return epoch_records


def _require_prepared(builder) -> None:
  # Checked here so that a missing dataset names its directory rather than failing inside tf.data.
  if not builder.is_prepared():
    raise FileNotFoundError(f'tfds dataset {builder.name!r} is not prepared in {builder.data_dir!r}; build it '
                            'first (xmodal data build, or tfds build)')
