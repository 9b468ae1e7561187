"""Contrastive (ITC) losses on embeddings: the softmax form (CLIP/ALBEF InfoNCE), ALBEF's momentum form (keys from the
momentum model, a queue of past keys, distilled targets) and the sigmoid form (SigLIP).

Pure functions of global arrays. Under `jax.jit` with a batch sharded over many devices, XLA partitions them and every
example still meets the whole global batch as negatives: the result equals the single-device value.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def positives(ids: jax.Array | None, size: int) -> jax.Array:
  """(B, B) bool: True where two examples share an id (several captions of one image); the diagonal without ids."""
  if ids is None:
    return jnp.eye(size, dtype=bool)
  return ids[:, None] == ids[None, :]


ABSENT = -1e9  # the logit of a column that does not exist


def soft_cross_entropy(logits: jax.Array, targets: jax.Array, reduce: bool = True) -> jax.Array:
  """Cross-entropy of each row's softmax against its target distribution; the mean over rows, or per row."""
  per_row = -jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  return jnp.mean(per_row) if reduce else per_row


def accuracy(logits: jax.Array, positive: jax.Array, reduce: bool = True) -> jax.Array:
  """Whether each row's top-scoring column is a positive; the fraction of rows, or per row (float32)."""
  best = jnp.argmax(logits, axis=-1)
  hit = jnp.take_along_axis(positive, best[:, None], axis=-1)[:, 0].astype(jnp.float32)
  return jnp.mean(hit) if reduce else hit


def contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array,
                     ids: jax.Array | None = None, negative_text_emb: jax.Array | None = None,
                     negative_valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE (CLIP/ALBEF ITC) over the whole batch.

  Args:
    image_emb: (B, E) unit-norm image embeddings.
    text_emb: (B, E) unit-norm text embeddings; row i describes image i.
    temperature: scalar; logits are cosine similarities divided by it.
    ids: (B,) image ids or None. Examples with equal ids are all positives of each other, and the target
      distribution is spread evenly over them (ALBEF's `sim_targets` for duplicated images).
    negative_text_emb: optional (N, E) texts that describe no image of the batch (e.g. written hard negatives,
      NegCLIP): extra columns of every image's softmax over texts, never a target. The text-to-image direction is
      unchanged.
    negative_valid: (N,) bool, False for rows of `negative_text_emb` that do not exist; None = all exist.

  Returns:
    (loss, metrics) with metrics 'itc_loss', 'itc_i2t_acc', 'itc_t2i_acc'.
  """
  logits = jnp.einsum('ie,te->it', image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)) / temperature
  positive = positives(ids, logits.shape[0])
  targets = positive / jnp.sum(positive, axis=-1, keepdims=True)
  i2t_logits, i2t_targets, i2t_positive = logits, targets, positive
  if negative_text_emb is not None:
    extra = jnp.einsum('ie,ne->in', image_emb.astype(jnp.float32), negative_text_emb.astype(jnp.float32)) / temperature
    if negative_valid is not None:
      # Finite, not -inf: a zero target times log(0) would be NaN.
      extra = jnp.where(negative_valid[None, :], extra, ABSENT)
    i2t_logits = jnp.concatenate([logits, extra], axis=1)
    i2t_targets = jnp.concatenate([targets, jnp.zeros_like(extra)], axis=1)
    i2t_positive = jnp.concatenate([positive, jnp.zeros(extra.shape, bool)], axis=1)
  loss = 0.5 * (soft_cross_entropy(i2t_logits, i2t_targets) + soft_cross_entropy(logits.T, targets.T))
  return loss, {'itc_loss': loss, 'itc_i2t_acc': accuracy(i2t_logits, i2t_positive),
                'itc_t2i_acc': accuracy(logits.T, positive.T)}


class QueuedKeys(NamedTuple):
  """Past keys of the momentum model: image and text embeddings (Q, E), their image ids (Q,) int (-1 = none) and
  valid (Q,) bool (False for the queue's entries not written yet)."""
  image: jax.Array
  text: jax.Array
  ids: jax.Array
  valid: jax.Array


def momentum_contrastive_loss(image_emb: jax.Array, text_emb: jax.Array, temperature: jax.Array,
                              image_emb_m: jax.Array, text_emb_m: jax.Array, ids: jax.Array | None = None,
                              queue: QueuedKeys | None = None, alpha: jax.Array | None = None
                              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ALBEF's ITC: each embedding is scored against the other modality's momentum embeddings, of the batch and of
  the queue, with targets optionally distilled from the momentum model's own similarities.

    i2t = image_emb @ [text_emb_m; queue.text]^T / T     t2i = text_emb @ [image_emb_m; queue.image]^T / T
    ground truth: uniform over the columns whose image id equals the row's (without ids: the row's own pair)
    targets = alpha * softmax(momentum i2t (t2i) similarities) + (1 - alpha) * ground truth   (alpha None: 0)

  Gradients reach the online embeddings and the temperature, never the momentum keys or the targets.

  Args:
    image_emb, text_emb: (B, E) unit-norm online embeddings; row i describes image i.
    temperature: scalar.
    image_emb_m, text_emb_m: (B, E) the momentum model's embeddings of the same batch.
    ids: (B,) image ids or None; a queued key with the row's id is a positive too.
    queue: the momentum keys of past batches, or None; entries that are not `valid` are left out of the softmax.
    alpha: scalar distillation weight in [0, 1], or None (no distillation, and no momentum similarities computed).

  Returns:
    (loss, metrics) with metrics 'itc_loss', 'itc_i2t_acc', 'itc_t2i_acc' (top column a positive, over the batch
    and the queue).
  """
  f32 = lambda x: jax.lax.stop_gradient(x.astype(jnp.float32))
  image_keys, text_keys = f32(image_emb_m), f32(text_emb_m)
  positive = positives(ids, image_emb.shape[0])
  valid = jnp.ones(image_keys.shape[:1], bool)
  if queue is not None:
    image_keys = jnp.concatenate([image_keys, f32(queue.image)])
    text_keys = jnp.concatenate([text_keys, f32(queue.text)])
    queued = ((ids[:, None] == queue.ids[None, :]) if ids is not None
              else jnp.zeros((positive.shape[0], queue.ids.shape[0]), bool))
    positive = jnp.concatenate([positive, queued & queue.valid[None, :]], axis=1)
    valid = jnp.concatenate([valid, queue.valid])
  targets = positive / jnp.sum(positive, axis=-1, keepdims=True)
  # Finite, not -inf: a zero target times log(0) would be NaN.
  scores = lambda queries, keys: jnp.where(valid[None, :], jnp.einsum(
      'ie,ke->ik', queries.astype(jnp.float32), keys) / temperature, ABSENT)
  i2t, t2i = scores(image_emb, text_keys), scores(text_emb, image_keys)
  i2t_targets = t2i_targets = targets
  if alpha is not None:
    soft = lambda queries, keys: jax.nn.softmax(jax.lax.stop_gradient(scores(f32(queries), keys)), axis=-1)
    i2t_targets = alpha * soft(image_emb_m, text_keys) + (1 - alpha) * targets
    t2i_targets = alpha * soft(text_emb_m, image_keys) + (1 - alpha) * targets
  loss = 0.5 * (soft_cross_entropy(i2t, i2t_targets) + soft_cross_entropy(t2i, t2i_targets))
  return loss, {'itc_loss': loss, 'itc_i2t_acc': accuracy(i2t, positive), 'itc_t2i_acc': accuracy(t2i, positive)}


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, scale: jax.Array, bias: jax.Array,
                 ids: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SigLIP: every (image, text) pair is an independent binary problem.

  loss = -1/B * sum_ij log sigmoid(z_ij * (scale * <x_i, y_j> + bias)), z_ij = +1 for positives, -1 otherwise.

  Returns:
    (loss, metrics) with 'sigmoid_loss'.
  """
  logits = scale * jnp.einsum('ie,te->it', image_emb.astype(jnp.float32), text_emb.astype(jnp.float32)) + bias
  signs = jnp.where(positives(ids, logits.shape[0]), 1.0, -1.0)
  loss = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / logits.shape[0]
  return loss, {'sigmoid_loss': loss}
