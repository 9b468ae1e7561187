"""MLM (BERT, as ALBEF trains its fusion encoder): which caption tokens to corrupt, and the loss on them.

Corruption follows BERT: each real word token is chosen with probability p (never [CLS], [SEP] or padding); of the
chosen, 80 % become [MASK], 10 % a uniformly random token and 10 % stay as they are. The loss is the cross-entropy of
the original token at the chosen positions only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class MaskedTokens(NamedTuple):
  """ids (B, L): the corrupted caption; chosen (B, L) bool: the positions whose original token is predicted."""
  ids: jax.Array
  chosen: jax.Array


def word_positions(mask: jax.Array) -> jax.Array:
  """(B, L) mask of real tokens -> (B, L) bool of the word tokens: neither [CLS] (first) nor [SEP] (last real).

  Read off the mask's layout (`Tokenizer.encode`: `[CLS] words [SEP] [PAD]...`) rather than token ids, so that it
  holds for every vocabulary.
  """
  real = mask.astype(bool)
  next_real = jnp.concatenate([real[:, 1:], jnp.zeros_like(real[:, :1])], axis=1)
  not_first = jnp.arange(real.shape[1])[None, :] > 0
  return real & next_real & not_first


def mask_tokens(rng: jax.Array, ids: jax.Array, mask: jax.Array, *, mask_id: int, vocab_size: int,
                probability: float = 0.15) -> MaskedTokens:
  """BERT's corruption of a batch of captions (module docstring).

  Args:
    rng: PRNG key.
    ids: (B, L) int token ids.
    mask: (B, L) 1 on real tokens ([CLS], words, [SEP]), 0 on padding.
    mask_id: the vocabulary's [MASK] id.
    vocab_size: random replacements are drawn from [0, vocab_size).
    probability: the share of word tokens chosen.
  """
  choose_rng, kind_rng, token_rng = jax.random.split(rng, 3)
  chosen = word_positions(mask) & (jax.random.uniform(choose_rng, ids.shape) < probability)
  kind = jax.random.uniform(kind_rng, ids.shape)
  random_ids = jax.random.randint(token_rng, ids.shape, 0, vocab_size, dtype=ids.dtype)
  corrupted = jnp.where(kind < 0.8, jnp.asarray(mask_id, ids.dtype), jnp.where(kind < 0.9, random_ids, ids))
  return MaskedTokens(jnp.where(chosen, corrupted, ids), chosen)


def masked_lm_loss(logits: jax.Array, targets: jax.Array, chosen: jax.Array, teacher_logits: jax.Array | None = None,
                   alpha: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean cross-entropy of `targets` (B, L) under `logits` (B, L, V) over the `chosen` (B, L) positions.

  With `teacher_logits` (B, L, V) (the momentum model's, ALBEF's distillation) the loss is
  (1 - alpha) * that cross-entropy + alpha * the cross-entropy against softmax(teacher_logits), at the same positions.

  Returns (loss, {'mlm_loss', 'mlm_acc'}); both are 0 when nothing was chosen.
  """
  logits = logits.astype(jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if teacher_logits is not None:
    soft = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)), axis=-1)
    nll = (1 - alpha) * nll - alpha * jnp.sum(soft * log_probs, axis=-1)
  weights = chosen.astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  loss = jnp.sum(nll * weights) / count
  accuracy = jnp.sum((jnp.argmax(logits, axis=-1) == targets) * weights) / count
  return loss, {'mlm_loss': loss, 'mlm_acc': accuracy}
