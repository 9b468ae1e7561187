"""Evaluation as the training loop and `xmodal eval` run it: embed a split, ITC recalls, ITM re-ranking, binding,
and the oracle ceiling where the dataset knows its scenes.

Two uses: `evaluate` reads the test split (data.eval_split) once at the end of a run; `validate` reads a slice of
the validation split (eval.validation_*) every train.eval_every steps, to choose recipes on.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from xmodal import evaluation as ev, sharding
from xmodal.data import faults
from xmodal.models import XModal


def evaluate(config: ml_collections.ConfigDict, model: XModal, params, mesh=None, split: str | None = None, *,
             k: int | None = None, cache: dict | None = None, progress: bool = False) -> dict[str, Any]:
  """Retrieval results on `split` (default: data.eval_split), binding accuracy and the oracle when there are any.

  The binding split is the one configured beside `split`: eval.binding_split for data.eval_split,
  eval.validation_binding_split for eval.validation_split (so that validating never reads a test split), sliced
  like `split`.
  `k`: ITC candidates re-ranked by ITM (default eval.k; 0 = ITC only).
  `cache`: a dict owned by the caller that keeps the split's host batches between calls (the input pipeline's
  start-up costs seconds; a run validating every N steps reads the same images each time).
  `progress`: tqdm bars on stderr while embedding each split and while ITM re-ranks.
  """
  split = split or config.data.eval_split
  binding_split = _binding_split(config, split)
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.eval_split = split
  k = config.eval.k if k is None else k
  if jax.process_count() > 1:
    # embed_dataset reads its results on one host: with several processes, each evaluates the whole split on its
    # own devices (a mesh of its local devices) from a full copy of the parameters: the same numbers on every
    # process, no cross-host collectives.
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
    local_mesh = sharding.make_mesh((-1, 1, 1), jax.local_devices())
    with jax.set_mesh(local_mesh):
      return _evaluate(config, model, params, local_mesh, data, binding_split, k,
                       dict(process_index=0, process_count=1), cache, progress)
  return _evaluate(config, model, params, mesh, data, binding_split, k, {}, cache, progress)


def validate(config: ml_collections.ConfigDict, model: XModal, params, mesh=None,
             cache: dict | None = None) -> dict[str, Any]:
  """`evaluate` on the first eval.validation_images images of eval.validation_split, re-ranking eval.validation_k."""
  return evaluate(config, model, params, mesh, _validation_split(config), k=config.eval.validation_k, cache=cache)


def splits_read(config: ml_collections.ConfigDict) -> tuple[list[str], list[str]]:
  """(retrieval splits, binding splits) a training run evaluates on: the final evaluation's and, when it validates,
  the validation slice's. For checking their data before the first step."""
  splits = [config.data.eval_split]
  if config.train.eval_every and config.eval.validation_split:
    splits.append(_validation_split(config))
  return splits, [b for b in (_binding_split(config, split) for split in splits) if b]


def _validation_split(config: ml_collections.ConfigDict) -> str:
  split = config.eval.validation_split
  return f'{split}[:{config.eval.validation_images}]' if config.eval.validation_images else split


def _binding_split(config: ml_collections.ConfigDict, split: str) -> str:
  """The binding split configured beside `split` (see `evaluate`), sliced like it; '' when there is none."""
  binding_split = {config.data.eval_split: config.eval.binding_split,
                   _base_split(config.eval.validation_split): config.eval.validation_binding_split}.get(
                       _base_split(split), '')
  if binding_split and split != _base_split(split):
    binding_split += split[len(_base_split(split)):]  # the same slice: 'validation[:500]' -> 'validation_hard[:500]'
  return binding_split


def _base_split(split: str) -> str:
  """'validation[:500]' -> 'validation'."""
  return split.split('[')[0]


def _evaluate(config, model, params, mesh, data, binding_split, k, local, cache, progress) -> dict[str, Any]:
  from xmodal.data import pipeline  # TensorFlow only when evaluation reads data

  def batches(key, read):
    """(a split's batches, a function giving its input counts once they have been read)."""
    if cache is None:
      iterator = read()
      return iterator, iterator.stats
    if key not in cache:
      iterator = read()
      cache[key] = (list(iterator), iterator.stats())
    split_batches, stats = cache[key]
    return split_batches, lambda: stats

  def with_bar(split, split_batches):
    return _counted(split_batches, f'embed {split}', _split_size(data, split)) if progress else split_batches

  variables = {'params': params}
  retrieval, input_stats = batches(('retrieval', data.eval_split), lambda: pipeline.eval_iterator(data, **local))
  embedded = ev.embed_dataset(model, variables, with_bar(data.eval_split, retrieval), mesh)
  binding = None
  if binding_split:
    pairs, _ = batches(('binding', binding_split), lambda: pipeline.binding_iterator(data, binding_split, **local))
    embedded_pairs = ev.embed_dataset(model, variables, with_bar(binding_split, pairs), mesh)
    binding = ev.binding_set_from_pairs(embedded_pairs)
    kinds = binding_kinds(data.tfds_name, data.tfds_data_dir, binding_split) if data.source == 'tfds' else None
    if kinds is not None:
      binding = dataclasses.replace(binding, kinds=np.array([kinds[int(i)] for i in embedded_pairs.image_ids]))
  rerank_bar = _Bar('ITM re-rank', 'pair') if progress and k > 0 else None
  try:
    results = ev.evaluate_retrieval(embedded, ev.match_fn_for(model, variables), k=k,
                                    chunk_size=config.eval.chunk_size, score=config.eval.score, binding=binding,
                                    progress=rerank_bar,
                                    temperature=float(model.apply(variables, method=XModal.temperature)))
  finally:
    if rerank_bar is not None:
      rerank_bar.close()
  oracle = oracle_metrics(data.tfds_name, data.tfds_data_dir, data.eval_split) if data.source == 'tfds' else None
  if oracle is not None:
    results['oracle'] = oracle
  results['split'] = data.eval_split
  results['num_images'] = int(embedded.image_emb.shape[0])
  results['num_texts'] = int(embedded.text_emb.shape[0])
  # What reading the split skipped (records, and a captions file's lines): why num_images may be below its rows.
  results['input'] = input_stats()
  return results


def _counted(batches, desc: str, total: int | None):
  """`batches`, moving a tqdm bar by each batch's valid images once the consumer comes back for the next."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  with tqdm(total=total, desc=desc, unit='image', dynamic_ncols=True) as bar:
    for batch in batches:
      yield batch
      bar.update(int(np.sum(batch['valid'])))


class _Bar:
  """A `rerank.Progress` as a tqdm bar, made at the first call (when the total is known)."""

  def __init__(self, desc: str, unit: str):
    self._desc, self._unit, self._bar = desc, unit, None

  def __call__(self, done: int, total: int) -> None:
    if self._bar is None:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total, desc=self._desc, unit=self._unit, unit_scale=True, dynamic_ncols=True)
    self._bar.update(done - self._bar.n)
    if done >= total:
      self._bar.close()  # binding accuracy runs next, still inside evaluate_retrieval

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


def _split_size(data: ml_collections.ConfigDict, split: str) -> int | None:
  """Examples in a tfds split (a slice like 'validation[:500]' included): a bar's total; None for other sources."""
  if data.source != 'tfds':
    return None
  from xmodal.data import sources  # pylint: disable=g-import-not-at-top
  try:
    return int(sources.tfds_builder(data.tfds_name, data.tfds_data_dir).info.splits[split].num_examples)
  except (KeyError, ValueError):
    return None


@functools.lru_cache(maxsize=8)
def oracle_metrics(tfds_name: str, data_dir: str, split: str) -> dict[str, float] | None:
  """The oracle's expected recalls (xmodal.evaluation.oracle) on a split of xmodal_shapes, whose records carry their
  scenes; None for any other dataset. Cached: a run validates the same slice many times."""
  from xmodal.data.shapes import builder as shapes
  from xmodal.evaluation import oracle
  builder = shapes_builder(tfds_name, data_dir)
  if builder is None:
    return None
  scenes, captions = shapes.read_split(builder, split)
  text_to_image = np.repeat(np.arange(len(captions)), [len(c) for c in captions])
  return oracle.oracle_metrics(scenes, [c for cs in captions for c in cs], text_to_image)


@functools.lru_cache(maxsize=8)
def binding_kinds(tfds_name: str, data_dir: str, split: str) -> dict[int, str] | None:
  """image_id -> what its negative breaks ('colours' or 'relation') on a hard split of xmodal_shapes; None for any
  other dataset. Cached like `oracle_metrics`."""
  from xmodal.data.shapes import builder as shapes
  builder = shapes_builder(tfds_name, data_dir)
  return None if builder is None else shapes.read_binding_kinds(builder, split)


def shapes_builder(tfds_name: str, data_dir: str):
  """The tfds builder of `tfds_name` when it is xmodal_shapes, whose records carry their scenes; else None."""
  from xmodal.data import sources
  builder = sources.tfds_builder(tfds_name, data_dir)
  return builder if builder.name == 'xmodal_shapes' else None


def flatten(results: dict[str, Any]) -> dict[str, float]:
  """{'itc': {'t2i_r1': x}} -> {'itc/t2i_r1': x}: scalar metrics for the metric writer."""
  flat = {}
  for group, values in results.items():
    if isinstance(values, dict):
      flat.update({f'{group}/{k}': float(v) for k, v in values.items() if isinstance(v, (int, float))})
  return flat


def format_table(results: dict[str, Any]) -> str:
  """The retrieval table (xmodal.evaluation.format_table), headed by what reading the split skipped, if anything."""
  table = ev.format_table(results)
  skipped = faults.describe_skips(results.get('input', {}))
  return f'{results.get("split", "evaluation")}: {skipped}\n{table}' if skipped else table
