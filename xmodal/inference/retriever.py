"""`Retriever`: a bundle's serialized StableHLO, its weights, tokenizer and preprocessing, and search on top.

  r = Retriever.load('bundle/')
  index = r.index('photos/', batch_size=64)                 # ITC embeddings (+ image tokens for re-ranking)
  index = r.index('photos/', keep_keys_values=True)         # + what re-ranking reads instead of projecting the tokens
  r.add(index, ['new.png'])                                 # embeds only the new images
  r.sync(index, 'photos/')                                  # follows the folder: added, deleted, changed files
  hits = r.search('a red circle left of a blue square', index, k=10, rerank=64)
  similar = r.search_images('photos/cat.png', index, k=10)  # image → images by ITC cosine
  captions = r.search_captions('photos/cat.png', ['a cat', 'a dog'], k=1)

Re-ranking does only the work each pair needs (`Reranking`, `Retriever.reranking`): each query's pairs run at its
length rounded up to a multiple of 8 (bundles from before that run at the model's full length), the pairs of every
query of a `search([...])` that share a length together, and with an index that keeps keys and values the fusion
encoder projects only the query. The scores are those of the full-length match on the image tokens up to float
rounding (tests/test_search.py).

Bad input is named: unreadable files are skipped and listed in `index.report` (or raise UnreadableImage with
strict=True), k / rerank / batch sizes and empty queries raise ValueError, and a query that is mostly unknown words
or longer than the text length warns with QueryWarning.

Imports jax, numpy, PIL and the TF-free tokenizer only: no model code (the programs come from the bundle), no
training code, no TensorFlow.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import pathlib
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from xmodal.bundle import format as bundle_lib
from xmodal.inference import explain as explain_lib
from xmodal.inference import preprocess as preprocess_lib
from xmodal.inference import ranking
from xmodal.inference import index as index_lib
from xmodal.inference.index import Entry, Gallery, Index, UpdateReport
from xmodal.inference.ranking import Hit
from xmodal.tokenizer import Tokenizer, load_tokenizer

DEFAULT_BATCH = 32
UNKNOWN_SHARE = 0.5  # a query with more than this share of unknown tokens warns: its results say little


class QueryWarning(UserWarning):
  """A query was answered, but not as written: mostly unknown words, or cut to the model's text length."""


def check_count(name: str, value: Any, minimum: int) -> int:
  """`value` as an int >= minimum, or ValueError naming the argument (bools and floats are refused, not rounded)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f'{name} must be an integer >= {minimum}; got {value!r}')
  return int(value)


def check_texts(name: str, texts: Sequence[str]) -> list[str]:
  """A non-empty list of texts, none empty or only whitespace; else ValueError naming the first bad one."""
  texts = list(texts)
  if not texts:
    raise ValueError(f'{name}: no texts given')
  for i, text in enumerate(texts):
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f'{name}: text {i} is empty ({text!r}); give words to search for')
  return texts


@dataclasses.dataclass(frozen=True)
class Reranking:
  """How ITM re-ranking runs (`Retriever.reranking`). The defaults do the least work that the bundle and the index
  allow and give the same scores up to float rounding; the switches exist to measure against (`xmodal search bench
  --compare`: both False is the path of bundles and indexes from before them)."""
  # Each query's pairs run at its length rounded up to a bucket (`ranking.text_lengths`), not the model's full length:
  # the [CLS] that ITM reads does not see the padding. Needs a bundle whose matches take any length.
  query_length: bool = True
  # The index's kept keys and values (`Retriever.index(keep_keys_values=True)`) instead of the image tokens, which
  # every cross-attention would project again for every pair.
  keys_values: bool = True


# XLA:CPU reads a host array in place when its data is aligned to this many bytes, and copies it when it is not.
_ALIGNMENT = 64
# Calls on kept keys and values dispatched ahead of the one read back; each holds its own buffers (`_KeptReader`).
_IN_FLIGHT = 2


class _KeptReader:
  """Gathers an index's kept keys and values (G, C, 2, H, Dh, 1+N) for a chunk of pairs into what the bundle's
  match_keys_values takes (keys_0, values_0, keys_1, ..., each (P, H, Dh, 1+N)), in memory that is

  - aligned to _ALIGNMENT, so that the function reads it where it lies: numpy's large arrays are 16-byte aligned,
    and jax's copy of them took 1.4 ms of a 4.5 ms match (the shapes model: 12.8 MB per query);
  - reused, one set per slot, so that what a query writes is still in the CPU's cache when the next one writes it
    again: 0.7 ms less per query than fresh memory. A slot's arrays must be read back before it is asked for again;
    each thread has its own (_IN_FLIGHT + 1 slots of a batch of images' keys and values: 37 MB for the shapes model
    at batch 64).
  """

  def __init__(self):
    self._local = threading.local()

  def take(self, kept: np.ndarray, positions: np.ndarray, slot: int) -> list[np.ndarray]:
    kept = np.asarray(kept)  # a plain view: indexing a np.memmap makes a memmap object per row
    buffers = self._local.__dict__.setdefault('buffers', {})
    arrays = []
    for layer in range(kept.shape[1]):
      for kind in range(2):
        rows = kept[:, layer, kind]
        out = _aligned_buffer(buffers, (slot, layer, kind), (len(positions), *rows.shape[1:]), rows.dtype)
        for i, position in enumerate(positions):  # row by row: np.take into `out` goes element by element
          out[i] = rows[position]
        arrays.append(out)
    return arrays


def _aligned_buffer(buffers: dict, key: Any, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
  """An array of `shape` in the _ALIGNMENT-aligned memory `buffers[key]`, grown when too small."""
  size = int(np.prod(shape)) * np.dtype(dtype).itemsize
  memory = buffers.get(key)
  if memory is None or memory.size < size + _ALIGNMENT:
    memory = buffers[key] = np.empty(size + _ALIGNMENT, np.uint8)
  start = -memory.ctypes.data % _ALIGNMENT
  return memory[start:start + size].view(dtype).reshape(shape)


def _power_of_two(n: int) -> int:
  """The least power of two >= n: padded sizes take few values, so that few shapes ever compile."""
  return 1 << max(n - 1, 0).bit_length()


def _bucket(n: int, batch_size: int) -> int:
  """Padded batch for n rows: the next power of two, at most batch_size."""
  return min(batch_size, _power_of_two(n))


class Retriever:
  """Runs an exported bundle: towers, ITM, indexing and search. Build with `Retriever.load`."""

  def __init__(self, path: pathlib.Path, manifest: dict[str, Any], functions: dict[str, Any],
               params: dict[str, jax.Array], tokenizer: Tokenizer, max_text_len: int,
               preprocess_spec: dict[str, Any], batch_size: int = DEFAULT_BATCH):
    self.path = path
    self.manifest = manifest
    self.tokenizer = tokenizer
    self.max_text_len = max_text_len
    self.preprocess_spec = preprocess_spec
    self.batch_size = batch_size
    self._functions = functions
    self._params = params
    self.reranking = Reranking()
    self._kept_reader = _KeptReader()
    # Bundles exported before re-ranking at a query's length fixed the match's text length to the model's.
    match_length = manifest['functions']['match']['inputs']['text_tokens']['shape'][1]
    self.match_any_length = isinstance(match_length, str)
    # Ties an index to the weights it was computed with.
    self.weights_sha256 = manifest['files'][bundle_lib.PARAMS]['sha256']

  @classmethod
  def load(cls, bundle_dir: str | pathlib.Path, verify: bool = True, batch_size: int = DEFAULT_BATCH) -> Retriever:
    """Verifies and loads a bundle.

    Args:
      bundle_dir: the directory `xmodal export` wrote.
      verify: check every file's sha256 against the manifest (sizes and format version are always checked).
      batch_size: the largest batch one call runs; bigger inputs are split, smaller ones padded to a power of two.

    Raises:
      BundleError naming the file that is missing, corrupted, fails its checksum, has an incompatible format
      version, or was exported for other platforms than this backend.
    """
    path = pathlib.Path(bundle_dir)
    manifest = bundle_lib.verify(path, checksums=verify)
    preprocess_spec = bundle_lib.read_json(path, bundle_lib.PREPROCESS)
    tokenizer_spec = bundle_lib.read_json(path, bundle_lib.TOKENIZER_SPEC)
    tokenizer_file = path / bundle_lib.TOKENIZER_DIR / tokenizer_spec['file']
    try:
      tokenizer = load_tokenizer(tokenizer_file)
    except (OSError, ValueError, RuntimeError) as e:
      raise bundle_lib.BundleError(f'{tokenizer_file}: cannot load the tokenizer ({e})') from e
    backend = jax.default_backend()
    functions = {}
    optional = [name for name in bundle_lib.OPTIONAL_FUNCTIONS if name in manifest.get('functions', {})]
    for name in (*bundle_lib.FUNCTIONS, *optional):
      file = path / bundle_lib.function_file(name)
      try:
        exported = jax.export.deserialize(bytearray(file.read_bytes()))
      except Exception as e:  # deserialization raises assorted flatbuffer/MLIR errors
        raise bundle_lib.BundleError(f'{file}: cannot deserialize the StableHLO ({type(e).__name__}: {e})') from e
      if backend not in exported.platforms:
        raise bundle_lib.BundleError(f'{file}: exported for {list(exported.platforms)}, not {backend!r}; re-export '
                                     f'with --platforms {",".join([*exported.platforms, backend])}')
      functions[name] = jax.jit(exported.call)
    params = {k: jax.device_put(v) for k, v in bundle_lib.load_safetensors(path / bundle_lib.PARAMS).items()}
    return cls(path, manifest, functions, params, tokenizer, int(tokenizer_spec['max_text_len']), preprocess_spec,
               batch_size)

  # ------------------------------------------------------------------------------------------------ the towers
  def _run(self, name: str, *inputs: np.ndarray) -> tuple[np.ndarray, ...]:
    """Runs an exported function over inputs of any leading size N in padded chunks; outputs (N, ...) numpy."""
    return self._collect(self._dispatch(name, *inputs))

  def _dispatch(self, name: str, *inputs: np.ndarray) -> list[tuple[int, Any]]:
    """Starts an exported function on padded chunks of the inputs; returns (rows, outputs) per chunk for `_collect`,
    which waits. Dispatching every call before reading any back keeps the host from waiting on each in turn."""
    count = inputs[0].shape[0]
    if count == 0:
      raise ValueError(f'{name}: no inputs')
    outputs = []
    for start in range(0, count, self.batch_size):
      chunk = [x[start:start + self.batch_size] for x in inputs]
      rows = chunk[0].shape[0]
      pad = _bucket(rows, self.batch_size) - rows
      if pad:
        chunk = [np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) for x in chunk]
      result = self._functions[name](self._params, *chunk)
      outputs.append((rows, result if isinstance(result, (tuple, list)) else (result,)))
    return outputs

  @staticmethod
  def _collect(outputs: list[tuple[int, Any]]) -> tuple[np.ndarray, ...]:
    """`_dispatch`'s chunks read back: each output (N, ...) numpy, the padding dropped."""
    return tuple(np.concatenate([np.asarray(result[i])[:rows] for rows, result in outputs])
                 for i in range(len(outputs[0][1])))

  def preprocess(self, images: Sequence[preprocess_lib.ImageLike]) -> np.ndarray:
    """Paths or uint8 (H, W, 3) arrays → float32 (B, S, S, 3), as the training pipeline's evaluation prepares them."""
    return preprocess_lib.preprocess_batch(images, self.preprocess_spec)

  def encode_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed float32 (B, S, S, 3) → (emb (B, E) unit norm, tokens (B, 1+N, Dv)), float32."""
    tokens, emb = self._run('encode_image', np.asarray(pixels, np.float32))
    return emb, tokens

  def encode_images(self, images: Sequence[preprocess_lib.ImageLike]) -> tuple[np.ndarray, np.ndarray]:
    """Paths or uint8 arrays → (emb (B, E), tokens (B, 1+N, Dv)), float32; preprocessed a batch at a time."""
    embs, tokens = [], []
    for start in range(0, len(images), self.batch_size):
      emb, tok = self.encode_pixels(self.preprocess(images[start:start + self.batch_size]))
      embs.append(emb)
      tokens.append(tok)
    if not embs:
      raise ValueError('encode_images: no images')
    return np.concatenate(embs), np.concatenate(tokens)

  def tokenize(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Texts → (ids, mask), int32 (T, L)."""
    return self.tokenizer.encode(list(texts), self.max_text_len)

  def encode_texts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Texts → (emb (T, E) unit norm, tokens (T, L, Dt) float32, mask (T, L) int32)."""
    if isinstance(texts, str):
      raise TypeError('encode_texts takes a list of texts, not one string')
    ids, mask = self.tokenize(texts)
    tokens, emb = self._run('encode_text', ids, mask)
    return emb, tokens, mask

  def match_tokens(self, text_tokens: np.ndarray, text_mask: np.ndarray, image_tokens: np.ndarray) -> np.ndarray:
    """ITM logit of "match" for P pairs: text tokens (P, L, Dt), mask (P, L), image tokens (P, 1+N, Dv) → (P,)."""
    logits, = self._run('match', np.asarray(text_tokens, np.float32), np.asarray(text_mask, np.int32),
                        np.asarray(image_tokens, np.float32))
    return logits[:, 1]

  def match(self, texts: Sequence[str], images: Sequence[preprocess_lib.ImageLike]) -> np.ndarray:
    """ITM scores (logit of "match") of pairs (texts[i], images[i]); a single text or image is paired with all."""
    if isinstance(texts, str):
      texts = [texts]
    _, text_tokens, mask = self.encode_texts(texts)
    _, image_tokens = self.encode_images(images)
    count = max(len(text_tokens), len(image_tokens))
    if {len(text_tokens), len(image_tokens)} - {1, count}:
      raise ValueError(f'match: {len(text_tokens)} texts and {len(image_tokens)} images do not pair up')
    pick = lambda x: np.broadcast_to(x, (count, *x.shape[1:])) if len(x) == 1 else x
    return self.match_tokens(pick(text_tokens), pick(mask), pick(image_tokens))

  def explain(self, query: str, image: preprocess_lib.ImageLike, method: str = explain_lib.DEFAULT_METHOD,
              layer: int = explain_lib.DEFAULT_LAYER) -> explain_lib.Explanation:
    """Per-token heatmaps of why `image` (a path or a uint8 array) matches `query`; see xmodal.inference.explain.

    Args:
      method: 'attention' (the cross-attention weights) or 'gradcam' (ALBEF's: the weights times their positive
        gradients of the ITM score); both averaged over heads.
      layer: which cross-attention layer (0 = the first: the Locator's where the model has one; negative counts from
        the end). The defaults are what pointed best on the shapes validation split (docs/search.md).

    Raises:
      ValueError: an empty query, an unknown method or layer, or a bundle exported without `explain`.
    """
    if 'explain' not in self._functions:
      raise ValueError(f'{self.path}: this bundle has no explain function (exported by an older xmodal); '
                       're-export it with `xmodal export`')
    if method not in explain_lib.METHODS:
      raise ValueError(f'method {method!r} is not one of {explain_lib.METHODS}')
    query, = self._check_queries([query])
    _, text_tokens, mask = self.encode_texts([query])
    _, image_tokens = self.encode_images([image])
    maps, logit = self._run('explain', text_tokens, mask, image_tokens)
    layers = maps.shape[2]
    if not -layers <= layer < layers:
      raise ValueError(f'layer {layer} is out of range: the bundle has {layers} cross-attention layers')
    count = int(mask[0].sum()) - 2  # the query's own tokens: neither [CLS] nor [SEP]
    spans = [tuple(span) for span in self.tokenizer.token_offsets([query])[0][:count]]
    patch_maps = maps[0, explain_lib.METHODS.index(method), layer, 1:1 + count]
    return explain_lib.Explanation(query, [query[a:b] for a, b in spans], spans, explain_lib.grid_maps(patch_maps),
                                   float(logit[0]), method, layer % layers)

  # ------------------------------------------------------------------------------------------ index and search
  def index(self, gallery: Gallery, batch_size: int | None = None, progress: bool = True, keep_tokens: bool = True,
            tokens_dtype: str = 'float32', path: str | pathlib.Path | None = None, strict: bool = False,
            keep_keys_values: bool = False) -> Index:
    """Embeds a gallery (a folder, or a list of paths / uint8 arrays) into a new `Index`; see `add`.

    Args:
      keep_tokens: store each image's tokens for re-ranking (on disk, memory-mapped), else recompute them.
      tokens_dtype: 'float32' or 'float16' (half the disk; re-ranking scores move by about 1e-3).
      path: the index folder, written as images are embedded; default a temporary one until `Index.save`.
      strict: raise UnreadableImage at the first unreadable file instead of skipping it.
      keep_keys_values: also store every fusion cross-attention's keys and values of each image (the Locator's
        included; on disk, memory-mapped), which re-ranking then reads instead of projecting the candidates' tokens
        in every layer: cross-attention layers x 2 x (1+N) x text width x 4 bytes per image (`keys_values_bytes`;
        the shapes model: 3 x 2 x 65 x 128 x 4 = 199,680 bytes, 6x its float32 tokens). Needs a bundle that
        exports `image_keys_values`.
    """
    token_shape = tuple(self.manifest['functions']['encode_image']['outputs'][0]['shape'][1:])
    index = Index([], np.zeros((0, int(self.manifest['embed_dim'])), np.float32), self.weights_sha256, token_shape,
                  keep_tokens, tokens_dtype, folder=path,
                  keys_values_shape=self._keys_values_shape() if keep_keys_values else None)
    self.add(index, gallery, batch_size=batch_size, progress=progress, strict=strict)
    return index

  def _keys_values_shape(self) -> tuple[int, ...]:
    """(C, 2, H, Dh, 1+N): one image's keys and values, as the bundle's `image_keys_values` returns them."""
    if not self.can_keep_keys_values:
      raise ValueError(f'{self.path}: this bundle does not export image_keys_values (exported by an older xmodal); '
                       're-export it with `xmodal export`, or index without keep_keys_values')
    return tuple(self.manifest['functions']['image_keys_values']['outputs'][0]['shape'][1:])

  @property
  def can_keep_keys_values(self) -> bool:
    """Whether the bundle has the functions an index with keep_keys_values needs (exports since they exist)."""
    return {'image_keys_values', 'match_keys_values'} <= set(self._functions)

  def keys_values_bytes(self) -> int:
    """Disk (and page cache) an index with keep_keys_values spends per image on them."""
    return 4 * int(np.prod(self._keys_values_shape()))

  def add(self, index: Index, gallery: Gallery, batch_size: int | None = None, progress: bool = False,
          strict: bool = False) -> Index:
    """Embeds images not yet in `index` and appends them; returns `index`, with what was done in `index.report`.

    A path already indexed with the same size and mtime is left alone (adding it again is a no-op); with another it
    is re-embedded. Arrays are always appended. Unreadable files are skipped and listed (strict: UnreadableImage).
    """
    listing = index_lib.walk_images(gallery) if isinstance(gallery, (str, pathlib.PurePath)) else None
    if listing is not None and not listing.paths:
      raise ValueError(f'{gallery}: no images ({", ".join(index_lib.IMAGE_EXTENSIONS)})')
    plan = index_lib.plan_update(index.entries, listing or list(gallery), remove_missing=False)
    self._update(index, plan, listing, batch_size, progress, strict)
    return index

  def sync(self, index: Index, folder: str | pathlib.Path, batch_size: int | None = None, progress: bool = False,
           strict: bool = False) -> UpdateReport:
    """Makes `index` follow `folder`: embeds new files, re-embeds changed ones (size or mtime), drops files that
    are gone (arrays stay). Returns the report (also `index.report`): counts, unreadable files, duplicates."""
    listing = index_lib.walk_images(folder)
    plan = index_lib.plan_update(index.entries, listing, remove_missing=True)
    return self._update(index, plan, listing, batch_size, progress, strict)

  def _update(self, index: Index, plan: index_lib.Plan, listing: index_lib.Listing | None, batch_size: int | None,
              progress: bool, strict: bool) -> UpdateReport:
    """Applies a plan: kept rows, then the embedded new ones; saves an index that has a folder."""
    self.check_compatible(index)
    if not (index.keep_tokens or index.keep_keys_values) and any(isinstance(item, np.ndarray)
                                                                 for item, _, _ in plan.todo):
      raise ValueError('an index without kept tokens (or keys and values) recomputes them from paths; arrays need '
                       'keep_tokens=True')
    if index.keep_keys_values:
      self._keys_values_shape()  # raises, naming the bundle, if it cannot compute them
    report = UpdateReport(added=plan.added, removed=plan.removed, changed=plan.changed, unchanged=plan.unchanged,
                          skipped_links=listing.skipped_links if listing else [])
    # With nothing to add or drop nothing is rewritten (kept tokens would be copied whole for nothing).
    if plan.todo or len(plan.keep) != len(index):
      blocks = self.embed_gallery(plan.todo, batch_size=batch_size, progress=progress, strict=strict,
                                  unreadable=report.unreadable, keys_values=index.keep_keys_values)
      index_lib.write_rows(index, plan.keep, blocks)
      if index.folder is not None:
        index.save()
    unreadable = {path for path, _ in report.unreadable}
    report.added = [n for n in report.added if n not in unreadable]
    report.changed = [n for n in report.changed if n not in unreadable]
    report.duplicates = index_lib.duplicate_groups(index.entries)
    index.report = report
    return report

  def load_index(self, path: str | pathlib.Path) -> Index:
    """Reads an index folder (`Index.save`) and checks that it was computed with this retriever's weights."""
    index = Index.load(path)
    self.check_compatible(index)
    return index

  def check_compatible(self, index: Index) -> None:
    """Raises ValueError unless `index` was computed with this retriever's weights."""
    if index.weights_sha256 != self.weights_sha256:
      raise ValueError(f'this index was computed with weights {index.weights_sha256[:12]}…, the retriever holds '
                       f'{self.weights_sha256[:12]}… ({self.path}); rebuild the index')

  def _image_tokens(self, index: Index, positions: np.ndarray) -> np.ndarray:
    """Image tokens (P, 1+N, Dv) of gallery positions (P,): kept ones, or recomputed once per distinct image."""
    positions = np.asarray(positions)
    if index.keep_tokens:
      return index.tokens[positions]
    unique, inverse = np.unique(positions, return_inverse=True)
    _, tokens = self.encode_images([index.names[i] for i in unique])
    return tokens[inverse]

  def embed_gallery(self, items: Sequence[tuple[Any, str, tuple[int, int] | None]], batch_size: int | None = None,
                    progress: bool = False, strict: bool = False,
                    unreadable: list[tuple[str, str]] | None = None, keys_values: bool = False
                    ) -> Iterator[index_lib.Block]:
    """Embeds (image, name, (size, mtime_ns) or None) items a batch at a time, so that only one batch of pixels and
    tokens is ever in memory: yields (entries, emb (B, E), tokens (B, 1+N, Dv), with `keys_values` their keys and
    values (B, C, 2, H, Dh, 1+N), else None). Unreadable files are appended to `unreadable` as (path, reason) and
    skipped; with strict, the first one raises UnreadableImage."""
    batch_size = check_count('batch_size', batch_size or self.batch_size, 1)
    starts = range(0, len(items), batch_size)
    if progress:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      starts = tqdm(starts, desc='index', unit='batch', dynamic_ncols=True)
    for start in starts:
      entries, pixels = [], []
      for item, name, stamp in items[start:start + batch_size]:
        try:
          rgb, sha256 = self._read(item)
        except preprocess_lib.UnreadableImage as e:
          if strict or unreadable is None:
            raise
          unreadable.append((e.path, e.reason))
          continue
        entries.append(Entry(name, *(stamp or (None, None)), sha256))
        pixels.append(preprocess_lib.preprocess(rgb, self.preprocess_spec))
      if entries:
        emb, tokens = self.encode_pixels(np.stack(pixels))
        yield entries, emb, tokens, self._run('image_keys_values', tokens)[0] if keys_values else None

  @staticmethod
  def _read(item: preprocess_lib.ImageLike) -> tuple[np.ndarray, str]:
    """(uint8 (H, W, 3), sha256 of the file or of the array's bytes)."""
    if isinstance(item, np.ndarray):
      rgb = preprocess_lib.load_rgb(item)
      return rgb, hashlib.sha256(rgb.tobytes()).hexdigest()
    return preprocess_lib.read_image(item)

  def _check_queries(self, queries: Sequence[str]) -> list[str]:
    """Refuses empty queries; warns (QueryWarning) about mostly unknown words and about truncation."""
    queries = check_texts('query', queries)
    room = self.max_text_len - 2  # [CLS] and [SEP]
    for query, ids in zip(queries, self.tokenizer.token_ids(queries)):
      unknown = sum(i == self.tokenizer.unk_id for i in ids)
      if not ids or unknown > UNKNOWN_SHARE * len(ids):
        warnings.warn(f'query {query!r}: {unknown} of {len(ids)} tokens are not in the vocabulary; its results '
                      f'say little', QueryWarning, stacklevel=3)
      if len(ids) > room:
        warnings.warn(f'query {query[:40]!r}…: {len(ids)} tokens, cut to the model\'s {room}; the rest was ignored',
                      QueryWarning, stacklevel=3)
    return queries

  def search_images(self, image: preprocess_lib.ImageLike | Sequence[preprocess_lib.ImageLike], index: Index,
                    k: int = 10, ann: Any = None) -> list[Hit] | list[list[Hit]]:
    """Image → gallery images by ITC cosine of image embeddings (ITM scores text-image pairs, so none here).

    One image (a path or an array) gives a list of hits, a list of images a list of lists; `Hit.itm` is None. A
    gallery image searched for comes first (cosine 1 with itself). `ann` as in `search`.
    """
    k = check_count('k', k, 1)
    single = isinstance(image, (str, pathlib.Path, np.ndarray))
    self.check_compatible(index)
    query_emb, _ = self.encode_images([image] if single else list(image))
    scores, candidates = self._candidates(query_emb, index, k, ann)
    ranked = ranking.rank(scores, candidates, k, 0, None)
    hits = [[Hit(g, index.names[g], s, m) for g, s, m in row] for row in ranked]
    return hits[0] if single else hits

  def search(self, query: str | Sequence[str], index: Index, k: int = 10, rerank: int = 64,
             ann: Any = None) -> list[Hit] | list[list[Hit]]:
    """Text → gallery images: top-k by ITC (exact, or from `ann`), the first `rerank` re-ranked by ITM.

    Args:
      query: one text (→ a list of hits) or several (→ a list of lists).
      index: the gallery (`Retriever.index` or `Retriever.load_index`).
      k: results per query.
      rerank: candidates re-scored by the fusion encoder (0 = ITC only). Candidates are the top max(k, rerank).
      ann: optional candidate generator with `search(query_emb (Q, E), n) -> (scores, ids)`, e.g.
        `xmodal.inference.faiss_index.FaissIndex` or `xmodal.inference.milvus_store.MilvusStore`; default exact
        in-process search. With it a query reads only its candidates' embeddings and tokens.
    """
    single = isinstance(query, str)
    k, rerank = check_count('k', k, 1), check_count('rerank', rerank, 0)
    queries = self._check_queries([query] if single else query)
    self.check_compatible(index)
    text_emb, text_tokens, text_mask = self.encode_texts(queries)
    scores, candidates = self._candidates(text_emb, index, max(k, rerank), ann)
    scorer = lambda q, g: self._score_pairs(text_tokens, text_mask, q, index, g)
    ranked = ranking.rank(scores, candidates, k, rerank, scorer)
    hits = [[Hit(g, index.names[g], s, m) for g, s, m in row] for row in ranked]
    return hits[0] if single else hits

  def _score_pairs(self, text_tokens: np.ndarray, text_mask: np.ndarray, queries: np.ndarray, index: Index,
                   positions: np.ndarray) -> np.ndarray:
    """ITM scores (P,) of the pairs (text `queries[p]`, gallery position `positions[p]`), as `self.reranking` says.

    The pairs of every query that share a length bucket run together, cut to it, in chunks of the batch size. An
    index's kept keys and values are read in place of its image tokens where the bundle has the function for them.
    """
    settings = self.reranking
    keys_values = settings.keys_values and index.keep_keys_values and self.can_keep_keys_values
    if settings.query_length and (keys_values or self.match_any_length):
      lengths = ranking.text_lengths(text_mask)[queries]
    else:
      lengths = np.full(len(queries), text_mask.shape[1])
    scores = np.empty(len(queries), np.float32)
    if keys_values:
      for length in np.unique(lengths):
        rows = np.flatnonzero(lengths == length)
        scores[rows] = self._match_kept(text_tokens[:, :length], text_mask[:, :length], queries[rows], index,
                                        positions[rows])
      return scores
    # Kept tokens may be float16 on disk; the bundle's functions take float32. Every chunk of every length is
    # dispatched before any is read back.
    image_tokens = np.asarray(self._image_tokens(index, positions), np.float32)
    pending = []
    for length in np.unique(lengths):
      rows = np.flatnonzero(lengths == length)
      pending.append((rows, self._dispatch('match', text_tokens[queries[rows], :length],
                                           text_mask[queries[rows], :length], image_tokens[rows])))
    for rows, outputs in pending:
      scores[rows] = self._collect(outputs)[0][:, 1]
    return scores

  def _match_kept(self, text_tokens: np.ndarray, text_mask: np.ndarray, queries: np.ndarray, index: Index,
                  positions: np.ndarray) -> np.ndarray:
    """ITM scores (P,) of pairs (text `queries[p]`, gallery position `positions[p]`) of texts (T, L, Dt) cut to one
    length, from the index's kept keys and values: each distinct text given once (the function's text_index), the
    pairs in chunks of the batch size, each chunk's keys and values gathered while the ones before may still run."""
    texts, text_index = np.unique(queries, return_inverse=True)
    texts = np.pad(texts, (0, _power_of_two(len(texts)) - len(texts)), mode='edge')  # few shapes compile
    shared = text_tokens[texts], text_mask[texts]
    scores = np.empty(len(queries), np.float32)
    pending = collections.deque()
    for number, start in enumerate(range(0, len(queries), self.batch_size)):
      rows = slice(start, start + self.batch_size)
      count = len(positions[rows])
      pad = (0, _bucket(count, self.batch_size) - count)  # copies of the last pair, whose scores are dropped
      layers = self._kept_reader.take(index.keys_values, np.pad(positions[rows], pad, mode='edge'),
                                      number % (_IN_FLIGHT + 1))
      chunk_text_index = np.pad(text_index[rows], pad, mode='edge').astype(np.int32)
      result = self._functions['match_keys_values'](self._params, *shared, chunk_text_index, *layers)
      pending.append((rows, count, result))
      if len(pending) > _IN_FLIGHT:
        done_rows, done_count, done = pending.popleft()
        scores[done_rows] = np.asarray(done)[:done_count, 1]
    for done_rows, done_count, done in pending:
      scores[done_rows] = np.asarray(done)[:done_count, 1]
    return scores

  @staticmethod
  def _candidates(query_emb: np.ndarray, index: Index, count: int, ann: Any) -> tuple[np.ndarray, np.ndarray]:
    """(ITC scores (Q, C), gallery positions (Q, C)) of each query's `count` best candidates, best first.

    `query_emb` (Q, E): unit-norm text or image embeddings (both towers embed into one space).

    Exact search reads the whole gallery; with `ann` the gallery is read only at the candidates' rows (their exact
    cosines), so a query costs the ANN lookup plus O(count), never O(gallery).
    """
    if ann is None:
      candidates = ranking.top_k(query_emb @ index.embeddings.T, count)
    else:
      _, candidates = ann.search(query_emb, min(count, len(index)))
    return ranking.score_candidates(query_emb, index.embeddings, candidates)

  def search_captions(self, image: preprocess_lib.ImageLike | Sequence[preprocess_lib.ImageLike],
                      captions: Sequence[str], k: int = 10, rerank: int = 0) -> list[Hit] | list[list[Hit]]:
    """Image → captions: the k best of `captions` by ITC, the first `rerank` re-ranked by ITM.

    One image (a path or an array) gives a list of hits; a list of images a list of lists. Hit.name is the caption.
    """
    single = isinstance(image, (str, pathlib.Path, np.ndarray))
    images = [image] if single else list(image)
    k, rerank = check_count('k', k, 1), check_count('rerank', rerank, 0)
    captions = check_texts('captions', captions)
    image_emb, image_tokens = self.encode_images(images)
    text_emb, text_tokens, text_mask = self.encode_texts(captions)
    itc = image_emb @ text_emb.T
    candidates = ranking.top_k(itc, max(k, rerank))

    def scorer(q: np.ndarray, g: np.ndarray) -> np.ndarray:
      return self.match_tokens(text_tokens[g], text_mask[g], image_tokens[q])

    ranked = ranking.rank(np.take_along_axis(itc, candidates, axis=1), candidates, k, rerank, scorer)
    hits = [[Hit(g, captions[g], s, m) for g, s, m in row] for row in ranked]
    return hits[0] if single else hits

