"""Retrieval evaluation: ITC recalls, ITC top-k + ITM re-ranking (the ALBEF protocol), binding accuracy, zero-shot.

This __init__ is the public API. A run evaluates a split in three calls:

  embedded = embed_dataset(model, variables, batches, mesh)            # towers once per image and caption
  results = evaluate_retrieval(embedded, match_fn_for(model, variables), k=..., chunk_size=..., score=...,
                               binding=BindingSet(...) or None)
  print(format_table(results))

Modules: `metrics` (R@1/5/10, ties against the model), `rerank` (ITM re-ranking of the ITC top-k on fixed-shape
chunks), `embed` (a split through both towers), `zero_shot`, `retrieval` (the calls above, binding accuracy, the
table) and `oracle` (the recalls of a model that knows every shapes scene). Pure jax/numpy: no TensorFlow.
"""

from xmodal.evaluation.embed import Embedded, Texts, embed_dataset
from xmodal.evaluation.metrics import METRIC_KEYS, pairwise_accuracy, retrieval_metrics
from xmodal.evaluation.rerank import ITM_SCORES, MatchFn, Progress, match_fn_for, score_pairs
from xmodal.evaluation.retrieval import (BindingSet, binding_accuracy, binding_set_from_pairs, evaluate_retrieval,
                                         format_table, of_oracle)
from xmodal.evaluation.zero_shot import class_embeddings, embed_prompts, zero_shot_accuracy

# `rerank` is the module (`rerank.rerank` the function): a package attribute must not hide its submodule.
__all__ = [
    'BindingSet', 'Embedded', 'ITM_SCORES', 'METRIC_KEYS', 'MatchFn', 'Progress', 'Texts', 'binding_accuracy',
    'binding_set_from_pairs', 'class_embeddings', 'embed_dataset', 'embed_prompts', 'evaluate_retrieval',
    'format_table', 'match_fn_for', 'of_oracle', 'pairwise_accuracy', 'retrieval_metrics', 'score_pairs',
    'zero_shot_accuracy',
]
