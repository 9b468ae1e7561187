"""ITM re-ranking of the ITC top-k (the ALBEF protocol), with the fusion encoder run on fixed-shape chunks of pairs.

For each query the k candidates with the highest ITC similarity are scored by the fusion encoder; those k are ordered
by that score and every other candidate scores -inf, i.e. ranks below all of them (with the pessimistic tie rule of
`metrics`, a query whose match is outside its top-k therefore ranks last).

Score variants ('itm_score' in the config):
  'itm'      the ITM logit of class 1 ("match"), as ALBEF ranks (the raw logit, not its softmax probability).
  'itm+itc'  that logit plus the pair's ITC cosine similarity, as BLIP ranks.
  'itm+itc_logit'  that logit plus the pair's ITC logit (cosine / the model's temperature): both are log-odds, so
             the sum weighs each model by its own confidence. On the shapes data, where ITM knows colour binding but
             not relations, ITC's cosine is ~40x too weak beside ITM's logit and re-ranking by 'itm+itc' loses
             t2i R@1 that this score gains (docs/shapes_recipe.md, "Re-ranking by both logits").

Pairs come from both directions (image queries over texts, text queries over images); a pair in both top-k sets is
scored once. Image and text tokens are computed once per item (`embed.embed_dataset`) and gathered per chunk.

Search re-ranks too (`xmodal.inference.ranking.rank`), and the two share their top-k (`ranking.top_k`) and the texts'
lengths (`ranking.text_lengths`) but not the re-ranking: search returns each query's hit list, its unscored candidates following by ITC, from a bundle's functions
(inference imports no model code); the metrics need dense matrices with -inf outside the top-k, and each pair scored
once for both directions by the jitted model on the device.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xmodal.inference.ranking import text_lengths, top_k
from xmodal.models.model import XModal

ITM_SCORES = ('itm', 'itm+itc', 'itm+itc_logit')

# (text tokens (P, L, Dt), text mask (P, L), image tokens (M, N, Dv), image index (P,) int) -> match logits (P, 2):
# text i is paired with image `image_index[i]` of the M, whose keys and values the fusion encoder projects once.
MatchFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

# (pairs scored so far, pairs to score): called as each chunk's logits reach the host, e.g. to move a progress bar.
Progress = Callable[[int, int], None]

# Fusion chunks dispatched ahead of the one read back: enough to keep the device busy, few enough that progress is
# reported as chunks finish (a CPU backend runs a chunk within the dispatch) and that pending outputs stay few.
_IN_FLIGHT = 8


def match_fn_for(model: XModal, variables) -> MatchFn:
  """The jitted match function of a model, with the parameters as an argument (not baked into the program).

  Calls with the same chunk shape share one compilation, whatever gallery the chunks come from.
  """
  return functools.partial(_jitted_match(model), variables)


@functools.lru_cache(maxsize=4)
def _jitted_match(model: XModal):
  # One jitted function per model (modules hash by their fields): a run that evaluates every N steps compiles once.
  return jax.jit(lambda v, t, m, i, index: model.apply(v, t, m, i, image_index=index, method=XModal.match))


@functools.partial(jax.jit, static_argnames='length')
def _gather_chunk(text_tokens, text_mask, image_tokens, text_rows, images, *, length: int):
  # Compiled once per gallery shape and length; it only gathers, so the fusion encoder's program stays
  # gallery-independent.
  return text_tokens[text_rows, :length], text_mask[text_rows, :length], image_tokens[images]


@dataclasses.dataclass(frozen=True)
class _Chunk:
  length: int  # the texts' tokens kept: every text of the chunk is masked out beyond it
  text_rows: np.ndarray  # (chunk_size,) int32, rows of the text table
  images: np.ndarray  # (image_slots,) int32, rows of the image table
  image_index: np.ndarray  # (chunk_size,) int32, each pair's slot in `images`
  pairs: np.ndarray  # (P,) int, which of the caller's pairs the chunk's first P rows score


def _plan_chunks(text_idx: np.ndarray, image_idx: np.ndarray, lengths: np.ndarray, chunk_size: int) -> list[_Chunk]:
  """The pairs in chunks of `chunk_size` that share a text length and, sorted by image, few images.

  Every chunk has the same number of image slots: a power of two that holds the most images any chunk needs, so that
  the fusion encoder compiles once per length whatever the gallery (padding repeats the chunk's last pair).
  """
  pair_lengths = lengths[text_idx]
  order = np.lexsort((text_idx, image_idx, pair_lengths))  # by length, then image, then text
  plans = []
  for length in np.unique(pair_lengths):
    group = order[pair_lengths[order] == length]
    for start in range(0, group.size, chunk_size):
      pairs = group[start:start + chunk_size]
      images, index = np.unique(image_idx[pairs], return_inverse=True)
      plans.append((int(length), pairs, images, index))
  slots = min(chunk_size, 1 << (max(images.size for _, _, images, _ in plans) - 1).bit_length())
  chunks = []
  for length, pairs, images, index in plans:
    pad = chunk_size - pairs.size
    chunks.append(_Chunk(length, np.pad(text_idx[pairs], (0, pad), mode='edge'),
                         np.pad(images, (0, slots - images.size), mode='edge'),
                         np.pad(index, (0, pad), mode='edge').astype(np.int32), pairs))
  return chunks


def score_pairs(match_fn: MatchFn, text_tokens, text_mask, image_tokens, text_idx: np.ndarray,
                image_idx: np.ndarray, chunk_size: int = 256, progress: Progress | None = None) -> np.ndarray:
  """ITM match logits (class 1) of (text, image) pairs, run in chunks of exactly `chunk_size` pairs.

  The fusion encoder does only the work each pair needs: a chunk holds texts of one length (`text_lengths`: the
  tokens past a text's mask change nothing but the arithmetic's order), cut to it, and pairs sorted by image, whose
  keys and values it projects once per image rather than once per pair.

  Args:
    match_fn: see `MatchFn`; pass a jitted function (`match_fn_for`) so that each chunk shape compiles once.
    text_tokens: (num_texts, L, Dt) from the text tower, on host or device.
    text_mask: (num_texts, L).
    image_tokens: (num_images, N, Dv) from the image tower.
    text_idx: (P,) int, the text of each pair.
    image_idx: (P,) int, the image of each pair.
    chunk_size: pairs per fusion call; a group's last chunk is padded and its padding dropped.
    progress: optional; see `Progress`.

  Returns:
    (P,) float32 match logits, in the order of the pairs given.
  """
  text_idx = np.asarray(text_idx, np.int32)
  image_idx = np.asarray(image_idx, np.int32)
  num_pairs = text_idx.shape[0]
  if num_pairs == 0:
    return np.zeros((0,), np.float32)
  chunks = _plan_chunks(text_idx, image_idx, text_lengths(text_mask), chunk_size)
  # Moved to the device once; every chunk then gathers there (a no-op if they already live on the device).
  text_tokens, text_mask, image_tokens = map(jnp.asarray, (text_tokens, text_mask, image_tokens))
  logits = np.empty((num_pairs,), np.float32)
  pending, scored = collections.deque(), 0

  def read_oldest():
    nonlocal scored
    chunk, chunk_logits = pending.popleft()
    logits[chunk.pairs] = np.asarray(chunk_logits, np.float32)[:chunk.pairs.size, 1]
    scored += chunk.pairs.size
    if progress is not None:
      progress(scored, num_pairs)

  if progress is not None:
    progress(0, num_pairs)
  for chunk in chunks:
    texts, mask, images = _gather_chunk(text_tokens, text_mask, image_tokens, chunk.text_rows, chunk.images,
                                        length=chunk.length)
    # Dispatched asynchronously and read back _IN_FLIGHT chunks later: the host never waits on the chunk it just sent.
    pending.append((chunk, match_fn(texts, mask, images, chunk.image_index)))
    if len(pending) > _IN_FLIGHT:
      read_oldest()
  while pending:
    read_oldest()
  return logits


def rerank(match_fn: MatchFn, image_tokens, text_tokens, text_mask, sim: np.ndarray, k: int, chunk_size: int = 256,
           score: str = 'itm', progress: Progress | None = None, temperature: float | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
  """Re-ranked score matrices of both directions.

  Args:
    match_fn: see `MatchFn` (jitted; `match_fn_for`).
    image_tokens: (num_images, N, Dv) image-tower tokens, computed once per image.
    text_tokens: (num_texts, L, Dt) text-tower tokens.
    text_mask: (num_texts, L).
    sim: (num_images, num_texts) ITC cosine similarities.
    k: candidates re-ranked per query (ALBEF: 128 on Flickr30K, 256 on COCO); capped at the gallery size.
    chunk_size: pairs per fusion call.
    score: one of `ITM_SCORES`.
    progress: optional, over the distinct pairs of both directions; see `Progress`.
    temperature: ITC's temperature (`XModal.temperature`); needed by score 'itm+itc_logit'.

  Returns:
    (i2t, t2i), both (num_images, num_texts) float32 indexed [image, text]: i2t ranks texts for each image (row),
    t2i ranks images for each text (column). Inside the query's top-k the entry is the score, elsewhere -inf.
    Feed them to `metrics.retrieval_metrics(i2t, text_to_image, sim_t2i=t2i)`.
  """
  if score not in ITM_SCORES:
    raise ValueError(f'unknown ITM score {score!r}; valid: {ITM_SCORES}')
  if score == 'itm+itc_logit' and not (temperature and temperature > 0):
    raise ValueError(f"score 'itm+itc_logit' needs ITC's temperature (> 0), got {temperature}")
  if k < 1 or chunk_size < 1:
    raise ValueError(f'k and chunk_size must be positive, got k={k}, chunk_size={chunk_size}')
  sim = np.asarray(sim, np.float32)
  num_images, num_texts = sim.shape
  if image_tokens.shape[0] != num_images or text_tokens.shape[0] != num_texts or text_mask.shape[0] != num_texts:
    raise ValueError(f'sim {sim.shape} does not match image tokens {image_tokens.shape}, text tokens '
                     f'{text_tokens.shape} and text mask {text_mask.shape}')
  # Search's top-k: its order within the k does not matter here, only which k (the pairs are deduplicated and sorted).
  i2t_texts = top_k(sim, k)  # (I, ki)
  t2i_images = top_k(sim, k, axis=0)  # (T, kt)
  i2t_images = np.broadcast_to(np.arange(num_images)[:, None], i2t_texts.shape)
  t2i_texts = np.broadcast_to(np.arange(num_texts)[:, None], t2i_images.shape)
  # One key per (image, text) pair; pairs in both directions' top-k go through the fusion encoder once.
  keys = np.concatenate([(i2t_images * num_texts + i2t_texts).ravel(), (t2i_images * num_texts + t2i_texts).ravel()])
  unique, inverse = np.unique(keys, return_inverse=True)
  pair_images, pair_texts = np.divmod(unique, num_texts)
  pair_scores = score_pairs(match_fn, text_tokens, text_mask, image_tokens, pair_texts, pair_images, chunk_size,
                            progress)
  if score == 'itm+itc':
    pair_scores = pair_scores + sim[pair_images, pair_texts]
  elif score == 'itm+itc_logit':
    pair_scores = pair_scores + sim[pair_images, pair_texts] / np.float32(temperature)
  scores = pair_scores[inverse]
  split = i2t_texts.size
  i2t = np.full(sim.shape, -np.inf, np.float32)
  i2t[i2t_images, i2t_texts] = scores[:split].reshape(i2t_texts.shape)
  t2i = np.full(sim.shape, -np.inf, np.float32)
  t2i[t2i_images, t2i_texts] = scores[split:].reshape(t2i_images.shape)
  return i2t, t2i
