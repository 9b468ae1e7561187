"""Evaluation as the training loop and `xmodal eval` run it: embed the eval split, ITC recalls, ITM re-ranking."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections

from xmodal import evaluate as ev, parallel
from xmodal.models import XModal


def evaluate(config: ml_collections.ConfigDict, model: XModal, params, mesh=None,
             split: str | None = None) -> dict[str, Any]:
  """Retrieval results on `split` (default: config.data.eval_split), plus binding accuracy when configured."""
  data = config.data
  if split is not None:
    data = ml_collections.ConfigDict(data.to_dict())
    data.eval_split = split
  if jax.process_count() > 1:
    # embed_dataset reads its results on one host: with several processes, each evaluates the whole split on its
    # own devices (a mesh of its local devices) from a full copy of the parameters: the same numbers on every
    # process, no cross-host collectives.
    from jax.experimental import multihost_utils
    params = multihost_utils.process_allgather(params, tiled=True)
    local_mesh = parallel.make_mesh((-1, 1, 1), jax.local_devices())
    with jax.set_mesh(local_mesh):
      return _evaluate(config, model, params, local_mesh, data, dict(process_index=0, process_count=1))
  return _evaluate(config, model, params, mesh, data, {})


def _evaluate(config, model, params, mesh, data, local) -> dict[str, Any]:
  from xmodal.data import pipeline  # TensorFlow only when evaluation reads data
  variables = {'params': params}
  embedded = ev.embed_dataset(model, variables, pipeline.eval_iterator(data, **local), mesh)
  binding = None
  if config.eval.binding_split:
    pairs = pipeline.binding_iterator(config.data, config.eval.binding_split, **local)
    binding = ev.binding_set_from_pairs(ev.embed_dataset(model, variables, pairs, mesh))
  results = ev.evaluate_retrieval(embedded, ev.match_fn_for(model, variables), k=config.eval.k,
                                  chunk_size=config.eval.chunk_size, score=config.eval.score, binding=binding)
  results['split'] = data.eval_split
  results['num_images'] = int(embedded.image_emb.shape[0])
  results['num_texts'] = int(embedded.text_emb.shape[0])
  return results


def flatten(results: dict[str, Any]) -> dict[str, float]:
  """{'itc': {'t2i_r1': x}} -> {'itc/t2i_r1': x}: scalar metrics for the metric writer."""
  flat = {}
  for group, values in results.items():
    if isinstance(values, dict):
      flat.update({f'{group}/{k}': float(v) for k, v in values.items() if isinstance(v, (int, float))})
  return flat


format_table = ev.format_table
