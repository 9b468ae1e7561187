"""`Index`: a gallery's ITC embeddings, the files they came from and (optionally) the image tokens that ITM
re-ranking needs. Plain data: the `Retriever` makes, updates and searches it.

  index = retriever.index('photos/', path='photos.index')   # or retriever.load_index('photos.index')
  retriever.sync(index, 'photos/')                          # embeds new and changed files, drops deleted ones
  index.save('photos.index')                                # a folder, see below

On disk (format version 2) an index is a folder: index.json (settings and one entry per image: path, size,
mtime_ns, sha256), embeddings.npy (G, E) float32, with kept tokens tokens.npy (G, 1+N, Dv) float32 or float16 and,
with kept keys and values, keys_values.npy (G, C, 2, H, Dh, 1+N) float32: every fusion cross-attention's keys and
values of each image (an index written before they existed has none, and reads as one that keeps none).
Nothing is pickled. Those per-image files are written row block by row block as images are embedded and read back
memory-mapped, so neither indexing nor search holds a gallery's tokens in memory: `index.tokens[positions]` reads
those rows only.
An index records the sha256 of the weights it was computed with; a retriever with other weights refuses it.

Folders are walked recursively. Symbolic links are followed, wherever they point (a gallery of links to other disks
is a gallery), but each real folder is walked once: a link back to a folder already walked (a loop, or a second
route to the same folder) is skipped and reported in `Listing.skipped_links`. Entries are keyed by the path as
listed (absolute, links not resolved), so a file reached through a link keeps the link's path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import shutil
import struct
import tempfile
import weakref
from collections.abc import Iterable, Sequence
from typing import Any, Union

import numpy as np

FORMAT = 'xmodal-index'
FORMAT_VERSION = 2  # 1: index.npz with names only; 2: entries with size, mtime_ns and sha256, tokens.npy memory-mapped
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp', '.gif')
TOKENS_DTYPES = ('float32', 'float16')
INDEX_FILE, EMBEDDINGS_FILE, TOKENS_FILE, KEYS_VALUES_FILE = ('index.json', 'embeddings.npy', 'tokens.npy',
                                                             'keys_values.npy')

Gallery = Union[str, os.PathLike, Sequence[Union[str, os.PathLike, np.ndarray]]]


class IndexFormatError(ValueError):
  """An index folder that this version cannot read: missing files, another format version, inconsistent arrays."""


# --------------------------------------------------------------------------------------------------- the gallery
@dataclasses.dataclass(frozen=True)
class Entry:
  """One indexed image. Files carry size and mtime_ns (what sync compares) and sha256 (what duplicates share);
  arrays given in memory have neither size nor mtime and are never dropped by sync."""
  name: str
  size: int | None = None
  mtime_ns: int | None = None
  sha256: str = ''

  @property
  def is_file(self) -> bool:
    return self.size is not None


@dataclasses.dataclass
class Listing:
  """A folder's image files (absolute paths, sorted) and the folder links not followed, as (link, reason)."""
  paths: list[str]
  skipped_links: list[tuple[str, str]]


def walk_images(folder: str | os.PathLike) -> Listing:
  """The image files under `folder` by extension, following symbolic links with each real folder walked once."""
  root = os.path.abspath(folder)
  if not os.path.isdir(root):
    raise NotADirectoryError(f'{folder}: not a folder of images')
  seen = {_folder_key(root): root}
  paths, skipped = [], []
  for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
    kept = []
    for name in sorted(dirnames):  # sorted: which of two routes to a folder wins does not depend on the disk
      sub = os.path.join(dirpath, name)
      key = _folder_key(sub)
      if key in seen:
        skipped.append((sub, f'already walked as {seen[key]}'))
      else:
        seen[key] = sub
        kept.append(name)
    dirnames[:] = kept
    paths.extend(os.path.join(dirpath, f) for f in filenames if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)
  return Listing(sorted(paths), skipped)


def _folder_key(path: str) -> tuple[int, int]:
  st = os.stat(path)  # follows links: two routes to one folder give one key
  return st.st_dev, st.st_ino


def list_images(folder: str | os.PathLike) -> list[str]:
  """Image files under `folder` (recursively, by extension, links followed once), sorted by path."""
  return walk_images(folder).paths


def file_stamp(path: str) -> tuple[int, int] | None:
  """(size, mtime_ns) of a file, or None when it cannot be stat'ed (reading it will then report why)."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_size, st.st_mtime_ns


# ------------------------------------------------------------------------------------------------- planning
@dataclasses.dataclass
class Plan:
  """What an update does: keep these positions, embed these (image, name, stamp) items."""
  keep: np.ndarray
  todo: list[tuple[Any, str, tuple[int, int] | None]]
  added: list[str]
  changed: list[str]
  removed: list[str]
  unchanged: int


def plan_update(entries: Sequence[Entry], gallery: Listing | Sequence[Any], remove_missing: bool) -> Plan:
  """Compares a gallery with an index's entries.

  A path already indexed with the same size and mtime_ns is left alone (adding it again is a no-op); with another
  stamp it is re-embedded. Arrays are always added. With remove_missing (sync), indexed files the gallery no longer
  lists are dropped; arrays stay.
  """
  # A sequence holds paths and/or (H, W, 3) arrays, or is one (N, H, W, 3) array.
  items = gallery.paths if isinstance(gallery, Listing) else list(gallery)
  position = {e.name: i for i, e in enumerate(entries) if e.is_file}
  next_array = 1 + max((int(e.name.split(':')[1]) for e in entries if e.name.startswith('array:')), default=-1)
  todo, added, changed, drop, listed = [], [], [], set(), set()
  unchanged = 0
  for item in items:
    if isinstance(item, np.ndarray):
      name, stamp = f'array:{next_array}', None
      next_array += 1
    else:
      name = os.path.abspath(item)
      if name in listed:
        continue
      listed.add(name)
      stamp = file_stamp(name)
      old = position.get(name)
      if old is not None and stamp == (entries[old].size, entries[old].mtime_ns):
        unchanged += 1
        continue
      if old is not None:
        drop.add(old)
      (changed if old is not None else added).append(name)
    todo.append((item if isinstance(item, np.ndarray) else name, name, stamp))
  removed = []
  if remove_missing:
    removed = [e.name for e in entries if e.is_file and e.name not in listed]
    drop |= {position[n] for n in removed}
  keep = np.array([i for i in range(len(entries)) if i not in drop], np.int64)
  return Plan(keep, todo, added, changed, removed, unchanged)


# ---------------------------------------------------------------------------------------------------- reports
@dataclasses.dataclass
class UpdateReport:
  """What `Retriever.index`, `add` or `sync` did. Names are paths (or 'array:N')."""
  added: list[str] = dataclasses.field(default_factory=list)
  removed: list[str] = dataclasses.field(default_factory=list)
  changed: list[str] = dataclasses.field(default_factory=list)
  unchanged: int = 0
  unreadable: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, reason), skipped
  duplicates: list[list[str]] = dataclasses.field(default_factory=list)  # groups of entries with the same content
  skipped_links: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (link, reason), not followed

  def counts(self) -> dict[str, int]:
    return {'added': len(self.added), 'removed': len(self.removed), 'changed': len(self.changed),
            'unchanged': self.unchanged, 'duplicates': sum(len(g) - 1 for g in self.duplicates),
            'unreadable': len(self.unreadable), 'skipped_links': len(self.skipped_links)}

  def summary(self) -> str:
    return ', '.join(f'{key} {value}' for key, value in self.counts().items())


def duplicate_groups(entries: Sequence[Entry]) -> list[list[str]]:
  """Names of entries that share a sha256, group by group (only groups of two or more), in index order."""
  groups: dict[str, list[str]] = {}
  for e in entries:
    if e.sha256:
      groups.setdefault(e.sha256, []).append(e.name)
  return [names for names in groups.values() if len(names) > 1]


# ------------------------------------------------------------------------------------------------- token files
_HEADER_BYTES = 128  # fixed, so that the row count can be written at the end over the same bytes


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
  """A .npy version 1.0 header of exactly _HEADER_BYTES bytes (np.load accepts the space padding)."""
  text = repr({'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False, 'shape': shape})
  body = text.ljust(_HEADER_BYTES - 11) + '\n'
  if len(body) != _HEADER_BYTES - 10:
    raise ValueError(f'token shape {shape} does not fit a {_HEADER_BYTES}-byte .npy header')
  return np.lib.format.magic(1, 0) + struct.pack('<H', len(body)) + body.encode('latin1')


class TokenWriter:
  """Writes (rows, *row_shape) as the .npy `path` block by block with plain writes, so the rows never sit in this
  process's memory (a writable memmap would count every written page as resident). The rows go to a temporary file
  beside `path`, which replaces it on `close`: a write that fails (`abort`) leaves `path` as it was. As a context
  manager it closes on success and aborts on an exception."""

  def __init__(self, path: pathlib.Path, row_shape: tuple[int, ...], dtype: str):
    self.path, self.row_shape, self.dtype = path, tuple(row_shape), np.dtype(dtype)
    self.rows = 0
    self._temporary = path.with_name(path.name + '.tmp')
    self._file = open(self._temporary, 'wb')  # pylint: disable=consider-using-with  # closed by close() or abort()
    self._file.write(_npy_header((0, *self.row_shape), self.dtype))

  def __enter__(self) -> TokenWriter:
    return self

  def __exit__(self, kind, *_) -> None:
    if kind is None:
      self.close()
    else:
      self.abort()

  def write(self, rows: np.ndarray) -> None:
    rows = np.ascontiguousarray(rows, self.dtype)
    if rows.shape[1:] != self.row_shape:
      raise ValueError(f'rows {rows.shape[1:]} do not match the index\'s {self.row_shape} ({self.path.name})')
    self._file.write(rows.tobytes())
    self.rows += rows.shape[0]

  def copy_rows(self, source: pathlib.Path, positions: np.ndarray, block: int = 256) -> None:
    """Appends rows of another token file (`path` itself included), a block at a time (each block's pages are
    unmapped after it)."""
    for start in range(0, len(positions), block):
      mapped = np.load(source, mmap_mode='r')
      self.write(mapped[positions[start:start + block]])
      del mapped

  def close(self) -> None:
    self._file.seek(0)
    self._file.write(_npy_header((self.rows, *self.row_shape), self.dtype))
    self._file.close()
    os.replace(self._temporary, self.path)

  def abort(self) -> None:
    self._file.close()
    self._temporary.unlink(missing_ok=True)


def write_array(path: pathlib.Path, array: np.ndarray, dtype: str, block: int = 4096) -> None:
  """Writes an (N, ...) array as the .npy `path`, a block of rows at a time (a memory-mapped source is never read
  whole); a failed write leaves `path` as it was."""
  with TokenWriter(path, array.shape[1:], dtype) as writer:
    for start in range(0, len(array), block):
      writer.write(array[start:start + block])


def write_json(path: pathlib.Path, document: Any) -> None:
  """Replaces the JSON file `path` through a rename: a reader finds the old document or the new, never half of one."""
  temporary = path.with_name(path.name + '.tmp')
  temporary.write_text(json.dumps(document) + '\n')
  os.replace(temporary, path)


def open_tokens(path: pathlib.Path) -> np.ndarray:
  """A token file, memory-mapped read-only (an empty one as an empty array: a zero-length file cannot be mapped)."""
  with open(path, 'rb') as f:
    version = np.lib.format.read_magic(f)
    if version != (1, 0):
      return np.load(path, mmap_mode='r')
    shape, _, dtype = np.lib.format.read_array_header_1_0(f)
  if shape[0] == 0:
    return np.zeros(shape, dtype)
  return np.load(path, mmap_mode='r')


# ------------------------------------------------------------------------------------------------------ index
@dataclasses.dataclass(frozen=True)
class RowFile:
  """A per-image array an index keeps on disk beside its embeddings, memory-mapped as the index's `attribute`."""
  attribute: str  # 'tokens' or 'keys_values'
  file: str
  shape: tuple[int, ...]  # of one image
  dtype: str


class Index:
  """Gallery entries (G,), embeddings (G, E) float32 and, kept on disk, image tokens (G, 1+N, Dv) and/or every
  fusion cross-attention's keys and values (G, C, 2, H, Dh, 1+N) float32.

  Without kept tokens, re-ranking recomputes the image tokens of the candidates from their paths: an index then
  costs E floats per image instead of (1+N) x Dv, for one image-tower pass per re-ranked candidate. With kept keys
  and values (`keys_values_shape`), re-ranking reads them instead of projecting the candidates' tokens in every
  cross-attention: C x 2 x (1+N) x Dt x 4 bytes per image (`Retriever.index(keep_keys_values=True)`).

  `folder` is where the index lives: set by `save`, `load` or `Retriever.index(..., path=...)`. An index with a
  folder is rewritten there by every `Retriever.add` and `sync`, so the folder always holds a consistent index. Kept
  tokens of an index without a folder go to a temporary folder, removed with the index.
  """

  def __init__(self, entries: list[Entry], embeddings: np.ndarray, weights_sha256: str, token_shape: tuple[int, ...],
               keep_tokens: bool = True, tokens_dtype: str = 'float32', folder: str | os.PathLike | None = None,
               keys_values_shape: Sequence[int] | None = None):
    if tokens_dtype not in TOKENS_DTYPES:
      raise ValueError(f'tokens_dtype must be one of {TOKENS_DTYPES}; got {tokens_dtype!r}')
    self.weights_sha256 = weights_sha256
    self.token_shape = tuple(token_shape)  # (1+N, Dv) of one image
    self.keep_tokens = keep_tokens
    self.tokens_dtype = tokens_dtype
    # (C, 2, H, Dh, 1+N) of one image where the index keeps its keys and values, else None.
    self.keys_values_shape = tuple(keys_values_shape) if keys_values_shape is not None else None
    self.folder = pathlib.Path(folder) if folder is not None else None
    self.report = UpdateReport()  # of the last index / add / sync
    self._scratch: pathlib.Path | None = None
    self.set_rows(entries, embeddings, **self._open_row_files())

  @classmethod
  def from_arrays(cls, names: Sequence[str], embeddings: np.ndarray, tokens: np.ndarray | None,
                  weights_sha256: str) -> Index:
    """An index over arrays held elsewhere (e.g. embeddings computed by other code): entries carry names only, so
    sync never drops them; `tokens` (G, 1+N, Dv) or None is used as given, copied only by `save`."""
    token_shape = tuple(tokens.shape[1:]) if tokens is not None else ()
    dtype = np.dtype(tokens.dtype).name if tokens is not None else 'float32'
    index = cls([], np.zeros((0, embeddings.shape[1]), np.float32), weights_sha256, token_shape, keep_tokens=False,
                tokens_dtype=dtype if dtype in TOKENS_DTYPES else 'float32')
    index.keep_tokens = tokens is not None
    index.set_rows([Entry(str(n)) for n in names], embeddings, tokens)
    return index

  def __len__(self) -> int:
    return len(self.entries)

  @property
  def keep_keys_values(self) -> bool:
    return self.keys_values_shape is not None

  def set_rows(self, entries: list[Entry], embeddings: np.ndarray, tokens: np.ndarray | None = None,
               keys_values: np.ndarray | None = None) -> None:
    """Replaces the rows; `names` is kept as a list because search reads it by position."""
    self.entries = list(entries)
    self.names = [e.name for e in self.entries]
    self.embeddings = embeddings
    self.tokens = tokens
    self.keys_values = keys_values

  def row_files(self) -> list[RowFile]:
    """The per-image arrays this index keeps on disk."""
    files = [RowFile('tokens', TOKENS_FILE, self.token_shape, self.tokens_dtype)] if self.keep_tokens else []
    if self.keep_keys_values:
      files.append(RowFile('keys_values', KEYS_VALUES_FILE, self.keys_values_shape, 'float32'))
    return files

  def _open_row_files(self) -> dict[str, np.ndarray]:
    """{attribute: its file memory-mapped (an empty array before the first rows)} of every kept per-image array."""
    return {f.attribute: open_tokens(self.row_path(f.file)) if self.row_path(f.file).exists() else
            np.zeros((0, *f.shape), f.dtype) for f in self.row_files()}

  def row_path(self, file: str) -> pathlib.Path:
    """Where a kept per-image file lives: the index folder, or a temporary one made on first use."""
    if self.folder is not None:
      return self.folder / file
    if self._scratch is None:
      self._scratch = pathlib.Path(tempfile.mkdtemp(prefix='xmodal-index-'))
      weakref.finalize(self, shutil.rmtree, self._scratch, True)
    return self._scratch / file

  def save(self, path: str | os.PathLike | None = None) -> pathlib.Path:
    """Writes the index folder `path` (default: its own folder) and makes it the index's folder. index.json is
    written last, through a rename: a folder is never left with a new index.json and old arrays. Kept tokens held
    as an array (`from_arrays`) are written a row block at a time; a token (or keys and values) file is copied."""
    path = pathlib.Path(path) if path is not None else self.folder
    if path is None:
      raise ValueError('this index has no folder yet: save(path)')
    path.mkdir(parents=True, exist_ok=True)
    for f in self.row_files():
      source = self.row_path(f.file)
      if not source.exists():
        write_array(path / f.file, getattr(self, f.attribute), f.dtype)
      elif source.resolve() != (path / f.file).resolve():
        shutil.copyfile(source, path / f.file)  # streams: the rows are not read into memory
    np.save(path / EMBEDDINGS_FILE, np.asarray(self.embeddings, np.float32))
    meta = {'format': FORMAT, 'format_version': FORMAT_VERSION, 'weights_sha256': self.weights_sha256,
            'count': len(self), 'keep_tokens': self.keep_tokens, 'tokens_dtype': self.tokens_dtype,
            'token_shape': list(self.token_shape),
            'keys_values_shape': list(self.keys_values_shape) if self.keep_keys_values else None,
            'entries': [dataclasses.astuple(e) for e in self.entries]}
    write_json(path / INDEX_FILE, meta)
    self.folder = path
    for attribute, rows in self._open_row_files().items():
      setattr(self, attribute, rows)
    return path

  @classmethod
  def load(cls, path: str | os.PathLike) -> Index:
    """Reads an index folder (`Retriever.load_index` also checks it against the retriever's weights)."""
    path = pathlib.Path(path)
    try:
      meta = json.loads((path / INDEX_FILE).read_text())
    except (OSError, ValueError) as e:
      raise IndexFormatError(f'{path}: not a readable index ({e})') from e
    version = meta.get('format_version')
    if meta.get('format') != FORMAT:
      raise IndexFormatError(f'{path / INDEX_FILE}: not an {FORMAT} file')
    if version != FORMAT_VERSION:
      raise IndexFormatError(f'{path}: an index of format version {version}; this xmodal reads version '
                             f'{FORMAT_VERSION}. Rebuild it: delete the folder and index the images again')
    entries = [Entry(*e) for e in meta['entries']]
    try:
      embeddings = np.load(path / EMBEDDINGS_FILE, allow_pickle=False)
      index = cls(entries, embeddings, meta['weights_sha256'], tuple(meta['token_shape']), meta['keep_tokens'],
                  meta['tokens_dtype'], folder=path, keys_values_shape=meta.get('keys_values_shape'))
    except (OSError, ValueError) as e:
      raise IndexFormatError(f'{path}: not a readable index ({e})') from e
    rows = {'entries': len(entries), 'embeddings': embeddings.shape[0]}
    rows.update({f.attribute: getattr(index, f.attribute).shape[0] for f in index.row_files()})
    if len(set(rows.values())) != 1:
      raise IndexFormatError(f'{path}: inconsistent row counts {rows}')
    index.report = UpdateReport(unchanged=len(entries), duplicates=duplicate_groups(entries))  # nothing done yet
    return index


Block = tuple[list[Entry], np.ndarray, np.ndarray, Union[np.ndarray, None]]


def write_rows(index: Index, keep: np.ndarray, blocks: Iterable[Block]) -> None:
  """Rewrites `index` as its rows `keep` followed by new blocks of (entries, embeddings (B, E), tokens (B, 1+N, Dv),
  keys and values (B, C, 2, H, Dh, 1+N) or None where the index keeps none).

  Kept per-image rows stream from the old file into a new one beside it, which replaces the old only when every
  block is written: an error in a block (for example a strict update meeting a bad file) leaves the index as it was.
  """
  entries = [index.entries[i] for i in keep]
  embeddings = [index.embeddings[keep]]
  files = index.row_files()
  with contextlib.ExitStack() as writing:
    writers = {}
    for f in files:
      target = index.row_path(f.file)
      target.parent.mkdir(parents=True, exist_ok=True)
      writers[f.attribute] = writing.enter_context(TokenWriter(target, f.shape, f.dtype))
      if len(keep) and target.exists():
        writers[f.attribute].copy_rows(target, keep)
    for block_entries, block_emb, block_tokens, block_keys_values in blocks:
      entries.extend(block_entries)
      embeddings.append(block_emb)
      for attribute, rows in (('tokens', block_tokens), ('keys_values', block_keys_values)):
        if attribute in writers:
          writers[attribute].write(rows)
  index.set_rows(entries, np.concatenate(embeddings).astype(np.float32, copy=False),
                 **{f.attribute: open_tokens(index.row_path(f.file)) for f in files})
