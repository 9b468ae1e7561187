"""optax: AdamW with warmup + cosine, global-norm clipping, and per-parameter rules by path pattern.

Per-parameter behaviour is an ordered list of (regex, value) over parameter paths like
'vision/layers/attn/qkv/kernel': the first pattern that matches a path decides. A pattern that matches no parameter
is an error (a typo must not silently train everything).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

# Parameters that never get weight decay: biases, LayerNorm scales, embeddings, [CLS], position embeddings and the
# loss scalars (ALBEF/BERT practice).
_NO_DECAY = re.compile(r'(bias|scale|embedding|/cls|pos_embedding|temperature|sigmoid_log_scale|sigmoid_bias)$')


def param_paths(params) -> list[str]:
  """'a/b/c' path of every leaf, in `jax.tree.leaves` order."""
  return ['/'.join(str(getattr(k, 'key', k)) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _tree_from_paths(params, values: list):
  return jax.tree.unflatten(jax.tree.structure(params), values)


def match_rules(params, rules: Sequence[tuple[str, float]], default: float, what: str):
  """A tree of floats: for each parameter, the value of the first rule whose regex matches its path."""
  paths = param_paths(params)
  compiled = [(re.compile(pattern), float(value)) for pattern, value in rules]
  for pattern, _ in compiled:
    if not any(pattern.search(p) for p in paths):
      raise ValueError(f'{what}: pattern {pattern.pattern!r} matches no parameter (e.g. {paths[:3]})')
  values = []
  for path in paths:
    values.append(next((value for pattern, value in compiled if pattern.search(path)), default))
  return _tree_from_paths(params, values)


def decay_mask(params):
  """True for the parameters that get weight decay (matrices), False for biases, norms and embeddings."""
  return _tree_from_paths(params, [not _NO_DECAY.search(p) for p in param_paths(params)])


def schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to `lr * final_lr_ratio` at `total_steps`."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(total_steps, warmup + 1),
                                            end_value=optim.lr * optim.final_lr_ratio)


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * jnp.asarray(m, u.dtype), updates, multipliers), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def freeze_labels(params, freeze: Sequence[str]):
  """A tree of 'frozen' / 'trainable': 'frozen' where one of the `freeze` regexes matches the parameter's path."""
  frozen = match_rules(params, [(p, 1.0) for p in freeze], 0.0, 'optim.freeze')
  return jax.tree.map(lambda f: 'frozen' if f else 'trainable', frozen)


class LateStart(NamedTuple):
  """Parameters that start training at step `step`, as if freshly initialised there: the path regexes `patterns`
  name them."""
  step: int
  patterns: tuple[str, ...]


def late_labels(params, late: LateStart):
  """A tree of 'late' / 'trainable': 'late' where one of `late.patterns` matches the parameter's path."""
  paths = param_paths(params)
  labels = ['late' if any(re.search(p, path) for p in late.patterns) else 'trainable' for path in paths]
  if 'late' not in labels:
    raise ValueError(f'a late start at step {late.step}: no parameter matches {late.patterns} (e.g. {paths[:3]})')
  return _tree_from_paths(params, labels)


def build_optimizer(optim: ml_collections.ConfigDict, params, total_steps: int, late: LateStart | None = None
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimizer for `params` (an unboxed tree or its abstract shapes) and its learning-rate schedule.

  Frozen parameters (optim.freeze) go to `optax.set_to_zero` through `optax.partition`: they never move, carry no
  AdamW moments (`optax.MaskedNode` in their place) and do not count in the clipped gradient norm. Learning-rate
  multipliers (optim.lr_multipliers) scale the final update.

  `late` parameters (not frozen ones) get their own AdamW behind `optax.conditionally_mask`: no update before step
  `late.step`, and from it a fresh optimizer's, its moments, bias correction and warmup + cosine schedule (over the
  remaining steps) counted from that step. Why not one AdamW whose gradients are zero until then: its bias correction
  counts from step 0, so the late parameters' first updates come 2-4x a fresh AdamW's, with no warmup, and on the
  shapes data that kept a late-starting fusion encoder at ITM's prior (docs/shapes_recipe.md).
  """
  lr_schedule = schedule(optim, total_steps)
  multipliers = match_rules(params, optim.lr_multipliers, 1.0, 'optim.lr_multipliers')
  clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity()
  adamw = lambda lr: optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                                 mask=decay_mask(params))
  trainable = (clip, adamw(lr_schedule))
  if late is not None and late.step > 0:
    labels = late_labels(params, late)
    late_adamw = optax.conditionally_mask(adamw(schedule(optim, total_steps - late.step)),
                                          lambda count: count >= late.step)
    groups = {'trainable': trainable[1], 'late': late_adamw}
    zero_frozen = optax.identity()
    if optim.freeze:
      # Frozen gradients are zeroed before the clip, so that its one norm counts the others' only.
      labels = jax.tree.map(lambda frozen, label: frozen if frozen == 'frozen' else label,
                            freeze_labels(params, optim.freeze), labels)
      groups['frozen'] = optax.set_to_zero()
      zero_frozen = optax.partition({'trainable': optax.identity(), 'late': optax.identity(),
                                     'frozen': optax.set_to_zero()}, labels)
    steps = (zero_frozen, clip, optax.partition(groups, labels))
  elif optim.freeze:
    steps = (optax.partition({'trainable': optax.chain(*trainable), 'frozen': optax.set_to_zero()},
                             freeze_labels(params, optim.freeze)),)
  else:
    # The identity holds the slot where frozen gradients used to be zeroed: the state keeps its layout
    # (opt_state/2/0/mu/...), so the checkpoints of runs without freezing still restore.
    steps = (optax.identity(), *trainable)
  return optax.chain(*steps, _scale_by_tree(multipliers)), lr_schedule
