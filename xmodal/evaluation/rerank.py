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
scored once. Image and text tokens are computed once per item (`embed.embed_dataset`) and gathered per pair.

Search re-ranks too (`xmodal.inference.ranking.rank`), and the two share their top-k (`ranking.top_k`) but not the
re-ranking: search returns each query's hit list, its unscored candidates following by ITC, from a bundle's functions
(inference imports no model code); the metrics need dense matrices with -inf outside the top-k, and each pair scored
once for both directions by the jitted model on the device.
"""

from __future__ import annotations

import collections
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from xmodal.inference.ranking import top_k
from xmodal.models.model import XModal

ITM_SCORES = ('itm', 'itm+itc', 'itm+itc_logit')

# (text tokens (P, L, Dt), text mask (P, L), image tokens (P, N, Dv)) -> match logits (P, 2).
MatchFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# (pairs scored so far, pairs to score): called as each chunk's logits reach the host, e.g. to move a progress bar.
Progress = Callable[[int, int], None]

# Fusion chunks dispatched ahead of the one read back: enough to keep the device busy, few enough that progress is
# reported as chunks finish (a CPU backend runs a chunk within the dispatch) and that pending outputs stay few.
_IN_FLIGHT = 8


def match_fn_for(model: XModal, variables) -> MatchFn:
  """The jitted match function of a model, with the parameters as an argument (not baked into the program).

  Calls with the same chunk shape share one compilation, whatever gallery the chunks come from.
  """
  apply = _jitted_match(model)
  return lambda text_tokens, text_mask, image_tokens: apply(variables, text_tokens, text_mask, image_tokens)


@functools.lru_cache(maxsize=4)
def _jitted_match(model: XModal):
  # One jitted function per model (modules hash by their fields): a run that evaluates every N steps compiles once.
  return jax.jit(lambda v, t, m, i: model.apply(v, t, m, i, method=XModal.match))


@jax.jit
def _gather_pairs(text_tokens, text_mask, image_tokens, text_idx, image_idx):
  # Compiled once per gallery shape; it only gathers, so the fusion encoder's program stays gallery-independent.
  return text_tokens[text_idx], text_mask[text_idx], image_tokens[image_idx]


def score_pairs(match_fn: MatchFn, text_tokens, text_mask, image_tokens, text_idx: np.ndarray,
                image_idx: np.ndarray, chunk_size: int = 256, progress: Progress | None = None) -> np.ndarray:
  """ITM match logits (class 1) of (text, image) pairs, run in chunks of exactly `chunk_size` pairs.

  Args:
    match_fn: see `MatchFn`; pass a jitted function (`match_fn_for`) so that each chunk reuses one compilation.
    text_tokens: (num_texts, L, Dt) from the text tower, on host or device.
    text_mask: (num_texts, L).
    image_tokens: (num_images, N, Dv) from the image tower.
    text_idx: (P,) int, the text of each pair.
    image_idx: (P,) int, the image of each pair.
    chunk_size: pairs per fusion call; the last chunk is padded with pair (0, 0) and its padding dropped.
    progress: optional; see `Progress`.

  Returns:
    (P,) float32 match logits.
  """
  text_idx = np.asarray(text_idx, np.int32)
  image_idx = np.asarray(image_idx, np.int32)
  num_pairs = text_idx.shape[0]
  if num_pairs == 0:
    return np.zeros((0,), np.float32)
  pad = -num_pairs % chunk_size
  text_idx = np.pad(text_idx, (0, pad)).reshape(-1, chunk_size)
  image_idx = np.pad(image_idx, (0, pad)).reshape(-1, chunk_size)
  # Moved to the device once; every chunk then gathers there (a no-op if they already live on the device).
  text_tokens, text_mask, image_tokens = map(jnp.asarray, (text_tokens, text_mask, image_tokens))
  pending, logits = collections.deque(), []

  def read_oldest():
    logits.append(np.asarray(pending.popleft(), np.float32)[:, 1])
    if progress is not None:
      progress(min(len(logits) * chunk_size, num_pairs), num_pairs)

  if progress is not None:
    progress(0, num_pairs)
  for t, i in zip(text_idx, image_idx):
    # Dispatched asynchronously and read back _IN_FLIGHT chunks later: the host never waits on the chunk it just sent.
    pending.append(match_fn(*_gather_pairs(text_tokens, text_mask, image_tokens, t, i)))
    if len(pending) > _IN_FLIGHT:
      read_oldest()
  while pending:
    read_oldest()
  return np.concatenate(logits)[:num_pairs]


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
