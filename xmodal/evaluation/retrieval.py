"""Retrieval evaluation of an embedded split: ITC recalls, ITC top-k + ITM re-ranking (ALBEF), binding accuracy, the
table. The run-level step of `xmodal.evaluation`, whose __init__ names the public API; a run calls, in order:

  embedded = embed_dataset(model, variables, batches, mesh)            # towers once per image and caption
  results = evaluate_retrieval(embedded, match_fn_for(model, variables), k=..., chunk_size=..., score=...,
                               binding=BindingSet(...) or None)
  print(format_table(results))

Recalls and accuracies are percentages. Ties count against the model (`evaluation.metrics`); re-ranking scores are
the ITM logit of class 1, optionally plus the ITC similarity (`evaluation.rerank`). Pure jax/numpy: no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from xmodal.evaluation.embed import Embedded, Texts
from xmodal.evaluation.metrics import pairwise_accuracy, retrieval_metrics
from xmodal.evaluation.rerank import MatchFn, Progress, rerank, score_pairs


@dataclasses.dataclass(frozen=True)
class BindingSet:
  """Images each with a true caption and a hard negative (e.g. colours swapped between shapes).

  image_emb (B, E), image_tokens (B, N, Dv); `true` and `negative` hold B texts each, row b belonging to image b.
  kinds: optional (B,) labels of what each negative breaks (e.g. 'colours', 'relation'): accuracy is also reported
  per label.
  """
  image_emb: np.ndarray
  image_tokens: np.ndarray
  true: Texts
  negative: Texts
  kinds: np.ndarray | None = None


def binding_set_from_pairs(embedded: Embedded) -> BindingSet:
  """A binding set from a split embedded with exactly two captions per image: (true, hard negative), in that order.

  This is how xmodal_shapes test_hard reads as evaluation batches: C = 2, caption 0 the true one, 1 the negative.
  """
  t2i = np.asarray(embedded.text_to_image)
  num_images = embedded.image_emb.shape[0]
  if not np.array_equal(t2i, np.repeat(np.arange(num_images), 2)):
    raise ValueError('binding needs exactly two captions per image, (true, negative), image by image; got '
                     f'{t2i.size} captions for {num_images} images')
  pick = lambda rows: Texts(embedded.text_tokens[rows], embedded.text_mask[rows], embedded.text_emb[rows])
  return BindingSet(embedded.image_emb, embedded.image_tokens, pick(slice(0, None, 2)), pick(slice(1, None, 2)))


def binding_accuracy(match_fn: MatchFn, binding: BindingSet, chunk_size: int = 256) -> dict[str, float]:
  """Percent of images whose true caption outscores its hard negative, by ITC and by ITM separately.

  ITC compares cosine similarities, ITM the match logit of class 1; a tie is a failure.

  Returns:
    {'itc': percent, 'itm': percent, 'count': number of images, 'itm_spread': the standard deviation of ITM's scores
    over all 2B pairs}. A spread near zero says ITM gives every pair the same score (a fusion encoder at its prior):
    its accuracy then counts rounding noise and ties, and can read below 50. With `binding.kinds`, also
    'kinds': {label: {'itc', 'itm', 'count'}} over each label's images, labels sorted.
  """
  image_emb = np.asarray(binding.image_emb, np.float32)
  count = image_emb.shape[0]
  images = np.arange(count)

  def scores(texts: Texts) -> tuple[np.ndarray, np.ndarray]:
    if texts.emb.shape[0] != count:
      raise ValueError(f'{texts.emb.shape[0]} captions for {count} images')
    itc = np.sum(image_emb * np.asarray(texts.emb, np.float32), axis=1)
    itm = score_pairs(match_fn, texts.tokens, texts.mask, binding.image_tokens, images, images, chunk_size)
    return itc, itm

  (true_itc, true_itm), (neg_itc, neg_itm) = scores(binding.true), scores(binding.negative)
  result = {'itc': pairwise_accuracy(true_itc, neg_itc), 'itm': pairwise_accuracy(true_itm, neg_itm),
            'count': count, 'itm_spread': float(np.std(np.concatenate([true_itm, neg_itm])))}
  if binding.kinds is not None:
    kinds = np.asarray(binding.kinds)
    if kinds.shape != (count,):
      raise ValueError(f'{kinds.size} binding kinds for {count} images')
    result['kinds'] = {}
    for kind in sorted(set(kinds.tolist())):
      rows = kinds == kind
      result['kinds'][str(kind)] = {'itc': pairwise_accuracy(true_itc[rows], neg_itc[rows]),
                                    'itm': pairwise_accuracy(true_itm[rows], neg_itm[rows]), 'count': int(rows.sum())}
  return result


def evaluate_retrieval(embedded: Embedded, match_fn: MatchFn, *, k: int = 256, chunk_size: int = 256,
                       score: str = 'itm', binding: BindingSet | None = None,
                       progress: Progress | None = None, temperature: float | None = None) -> dict[str, Any]:
  """ITC-only and ITC top-k + ITM re-ranked retrieval metrics of an embedded split, and binding accuracy.

  Args:
    embedded: the split from `embed_dataset`.
    match_fn: see `rerank.MatchFn`, e.g. `match_fn_for(model, variables)`.
    k: candidates re-ranked per query (ALBEF: 128 Flickr30K, 256 COCO); 0 = no re-ranking (ITC only).
    chunk_size: (text, image) pairs per fusion call.
    score: the re-ranking score, one of `ITM_SCORES`.
    binding: optional hard-negative set (e.g. xmodal_shapes test_hard).
    progress: optional, told the pairs re-ranked so far and in all (`rerank.Progress`).
    temperature: ITC's temperature, for score 'itm+itc_logit'.

  Returns:
    {'itc': metrics[, 'itc+itm': metrics][, 'binding': {'itc', 'itm', 'count'}]}, metrics keyed by `METRIC_KEYS`.
  """
  sim = np.asarray(embedded.image_emb, np.float32) @ np.asarray(embedded.text_emb, np.float32).T  # (I, T)
  results: dict[str, Any] = {'itc': retrieval_metrics(sim, embedded.text_to_image)}
  if k > 0:
    i2t, t2i = rerank(match_fn, embedded.image_tokens, embedded.text_tokens, embedded.text_mask, sim, k,
                      chunk_size=chunk_size, score=score, progress=progress, temperature=temperature)
    results['itc+itm'] = retrieval_metrics(i2t, embedded.text_to_image, sim_t2i=t2i)
  if binding is not None:
    results['binding'] = binding_accuracy(match_fn, binding, chunk_size)
  return results


_ROW_NAMES = {'itc': 'ITC', 'itc+itm': 'ITC+ITM', 'oracle': 'oracle'}


def format_table(results: dict[str, Any]) -> str:
  """The results of `evaluate_retrieval` (optionally with 'oracle': metrics and 'zero_shot': percent) as a
  fixed-width text table; with an oracle, each model row's R@1 is also given as a percentage of the oracle's."""
  header = f'{"":<8} {"i2t R@1":>8} {"R@5":>6} {"R@10":>6}   {"t2i R@1":>8} {"R@5":>6} {"R@10":>6}   {"R mean":>6}'
  lines = [header]
  oracle = results.get('oracle')
  for key, name in _ROW_NAMES.items():
    if key in results:
      m = results[key]
      line = (f'{name:<8} {m["i2t_r1"]:>8.2f} {m["i2t_r5"]:>6.2f} {m["i2t_r10"]:>6.2f}   '
              f'{m["t2i_r1"]:>8.2f} {m["t2i_r5"]:>6.2f} {m["t2i_r10"]:>6.2f}   {m["r_mean"]:>6.2f}')
      if oracle and key != 'oracle':
        line += (f'   R@1 of oracle: i2t {of_oracle(m, oracle, "i2t_r1"):.0f} %, '
                 f't2i {of_oracle(m, oracle, "t2i_r1"):.0f} %')
      lines.append(line)
  if 'binding' in results:
    b = results['binding']
    lines.append(f'binding accuracy ({b["count"]} images): ITC {b["itc"]:.2f}  ITM {b["itm"]:.2f}'
                 f'  (ITM scores spread {b["itm_spread"]:.3g})')
    for kind, k in b.get('kinds', {}).items():
      lines.append(f'  {kind} ({k["count"]} images): ITC {k["itc"]:.2f}  ITM {k["itm"]:.2f}')
  if 'zero_shot' in results:
    lines.append(f'zero-shot top-1: {results["zero_shot"]:.2f}')
  return '\n'.join(lines)


def of_oracle(metrics: dict[str, float], oracle: dict[str, float], key: str) -> float:
  """metrics[key] as a percentage of the oracle's (nan when the oracle's is 0)."""
  return 100.0 * metrics[key] / oracle[key] if oracle[key] else float('nan')
