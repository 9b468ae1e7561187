"""Retrieval ranks and recalls from a score matrix, and the accuracies built on compared scores.

Tie rule (pessimistic, deterministic, independent of candidate order): a query's rank is the number of NON-matching
candidates that score AT LEAST as high as its best-scoring matching candidate. Ties therefore count against the
model, so a collapsed model whose scores are all equal reaches 0 % recall, not 100 %. Without ties this is exactly
ALBEF's rank (the position of the first ground truth in the sorted candidates, counted from 0).
"""

from __future__ import annotations

import numpy as np

RECALL_AT = (1, 5, 10)
METRIC_KEYS = tuple(f'{d}_r{k}' for d in ('i2t', 't2i') for k in RECALL_AT) + ('r_mean',)

# Rows of the score matrix handled at once: bounds the temporary boolean matrix to rows x candidates.
_ROWS_PER_STEP = 1024


def image_to_text_ranks(scores: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
  """Ranks of image queries among all texts.

  Args:
    scores: (num_images, num_texts) score of each (image, text) pair; higher is better; -inf allowed.
    text_to_image: (num_texts,) int, the image each text describes.

  Returns:
    (num_images,) int64, 0 = a matching text ranks first (tie rule in the module docstring).
  """
  scores = np.asarray(scores)
  text_to_image = np.asarray(text_to_image)
  num_images, num_texts = scores.shape
  _check_text_to_image(text_to_image, num_images, num_texts)
  captions = np.bincount(text_to_image, minlength=num_images)
  if np.any(captions == 0):
    raise ValueError(f'{int(np.sum(captions == 0))} images have no caption, so image->text ranks are undefined; '
                     f'first: {np.flatnonzero(captions == 0)[:5].tolist()}')
  positive = scores[text_to_image, np.arange(num_texts)]  # (T,) score of each text with its own image
  best = np.full(num_images, -np.inf, scores.dtype)
  np.maximum.at(best, text_to_image, positive)
  # Positives tying the best are counted by the row sweep below but are not competitors: subtract them.
  at_best = (positive >= best[text_to_image]).astype(np.float64)
  positives_at_best = np.bincount(text_to_image, weights=at_best, minlength=num_images)
  at_least_best = np.empty(num_images, np.int64)
  for start in range(0, num_images, _ROWS_PER_STEP):
    rows = slice(start, start + _ROWS_PER_STEP)
    at_least_best[rows] = np.sum(scores[rows] >= best[rows, None], axis=1)
  return at_least_best - positives_at_best.astype(np.int64)


def text_to_image_ranks(scores: np.ndarray, text_to_image: np.ndarray) -> np.ndarray:
  """Ranks of text queries among all images.

  Args:
    scores: (num_images, num_texts), indexed [image, text] like `image_to_text_ranks`' (not transposed).
    text_to_image: (num_texts,) int, the image each text describes.

  Returns:
    (num_texts,) int64, 0 = its image ranks first.
  """
  scores = np.asarray(scores)
  text_to_image = np.asarray(text_to_image)
  num_images, num_texts = scores.shape
  _check_text_to_image(text_to_image, num_images, num_texts)
  ranks = np.empty(num_texts, np.int64)
  for start in range(0, num_texts, _ROWS_PER_STEP):
    cols = slice(start, start + _ROWS_PER_STEP)
    block = scores[:, cols]  # (I, c)
    positive = block[text_to_image[cols], np.arange(block.shape[1])]
    ranks[cols] = np.sum(block >= positive[None, :], axis=0) - 1  # minus the true image itself
  return ranks


def recalls(ranks: np.ndarray, at: tuple[int, ...] = RECALL_AT) -> dict[int, float]:
  """ranks (Q,) -> {K: percent of queries whose rank < K}."""
  ranks = np.asarray(ranks)
  return {k: 100.0 * float(np.mean(ranks < k)) for k in at}


def retrieval_metrics(sim: np.ndarray, text_to_image: np.ndarray, sim_t2i: np.ndarray | None = None
                      ) -> dict[str, float]:
  """Image->text and text->image R@1/5/10 and their mean, in percent.

  Image->text: an image's rank is that of its best-ranked caption. Text->image: a caption's rank is that of its image.
  Ties count against the model (module docstring).

  Args:
    sim: (num_images, num_texts) scores, higher = more similar. Used for both directions unless `sim_t2i` is given.
    text_to_image: (num_texts,) int, the image each text describes; every image needs at least one text.
    sim_t2i: optional (num_images, num_texts) scores for the text->image direction; re-ranking scores each direction
      with its own top-k, so the two directions see different matrices.

  Returns:
    {'i2t_r1', 'i2t_r5', 'i2t_r10', 't2i_r1', 't2i_r5', 't2i_r10', 'r_mean'} as Python floats.
  """
  i2t = recalls(image_to_text_ranks(sim, text_to_image))
  t2i = recalls(text_to_image_ranks(sim if sim_t2i is None else sim_t2i, text_to_image))
  metrics = {f'i2t_r{k}': v for k, v in i2t.items()} | {f't2i_r{k}': v for k, v in t2i.items()}
  metrics['r_mean'] = float(np.mean(list(metrics.values())))
  return metrics


def pairwise_accuracy(true_scores: np.ndarray, negative_scores: np.ndarray) -> float:
  """Percent of rows whose true score is strictly above its negative's (a tie is a failure): (B,), (B,) -> float."""
  true_scores, negative_scores = np.asarray(true_scores), np.asarray(negative_scores)
  if true_scores.shape != negative_scores.shape or true_scores.ndim != 1:
    raise ValueError(f'expected two (B,) arrays, got {true_scores.shape} and {negative_scores.shape}')
  return 100.0 * float(np.mean(true_scores > negative_scores))


def _check_text_to_image(text_to_image: np.ndarray, num_images: int, num_texts: int) -> None:
  if text_to_image.shape != (num_texts,):
    raise ValueError(f'text_to_image has shape {text_to_image.shape}, expected ({num_texts},)')
  if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f'text_to_image indexes images outside [0, {num_images})')
