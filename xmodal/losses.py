"""Losses on embeddings and match logits: ITC (softmax and sigmoid), hard-negative sampling, ITM.

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


_ABSENT = -1e9  # the logit of a column that does not exist


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  return -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def _accuracy(logits: jax.Array, positive: jax.Array) -> jax.Array:
  """Fraction of rows whose top-scoring column is a positive."""
  best = jnp.argmax(logits, axis=-1)
  return jnp.mean(jnp.take_along_axis(positive, best[:, None], axis=-1).astype(jnp.float32))


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
      extra = jnp.where(negative_valid[None, :], extra, _ABSENT)
    i2t_logits = jnp.concatenate([logits, extra], axis=1)
    i2t_targets = jnp.concatenate([targets, jnp.zeros_like(extra)], axis=1)
    i2t_positive = jnp.concatenate([positive, jnp.zeros(extra.shape, bool)], axis=1)
  loss = 0.5 * (_soft_cross_entropy(i2t_logits, i2t_targets) + _soft_cross_entropy(logits.T, targets.T))
  return loss, {'itc_loss': loss, 'itc_i2t_acc': _accuracy(i2t_logits, i2t_positive),
                'itc_t2i_acc': _accuracy(logits.T, positive.T)}


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


class HardNegatives(NamedTuple):
  """Indices of one hard negative per text and per image, and whether one existed."""
  image_for_text: jax.Array  # (B,) int: for text j, the index of a non-matching image
  text_for_image: jax.Array  # (B,) int: for image i, the index of a non-matching text
  image_for_text_valid: jax.Array  # (B,) bool: False when every image in the batch matches text j
  text_for_image_valid: jax.Array  # (B,) bool


def sample_hard_negatives(rng: jax.Array, sim: jax.Array, ids: jax.Array | None = None,
                          hardness: jax.Array | float = 1.0) -> HardNegatives:
  """Draws ALBEF's hard negatives: probability ∝ softmax(similarity) over the non-positives, never a positive.

  With `hardness` h < 1 the probability is h · softmax + (1 - h) · uniform over the non-positives: a fraction 1 - h
  of the negatives are easy ones, whatever the scale of the similarities.

  Args:
    rng: a PRNG key.
    sim: (B, B) image-text similarity logits (image rows, text columns), e.g. cosine / temperature.
      Gradients do not flow through the sampling.
    ids: (B,) image ids or None (then only the diagonal is positive).
    hardness: scalar in [0, 1]; 1 = ALBEF.

  Returns:
    HardNegatives. A row whose every candidate is a positive has no negative; its index is then arbitrary and its
    `valid` flag False, so that the matching loss can leave it out.
  """
  sim = jax.lax.stop_gradient(sim.astype(jnp.float32))
  positive = positives(ids, sim.shape[0])
  masked = jnp.where(positive, -jnp.inf, sim)
  negative = (~positive).astype(jnp.float32)

  def logits(axis: int) -> jax.Array:
    # log(h · softmax + (1 - h) · uniform) along `axis`; log 0 = -inf, so a positive is never drawn.
    hard = jax.nn.softmax(masked, axis=axis)
    easy = negative / jnp.maximum(jnp.sum(negative, axis=axis, keepdims=True), 1.0)
    return jnp.log(hardness * hard + (1.0 - hardness) * easy)

  rng_images, rng_texts = jax.random.split(rng)
  image_for_text = jax.random.categorical(rng_images, logits(0).T, axis=-1)  # per text (column), over images
  text_for_image = jax.random.categorical(rng_texts, logits(1), axis=-1)  # per image (row), over texts
  has_negative = ~jnp.all(positive, axis=-1)
  return HardNegatives(image_for_text, text_for_image, has_negative, has_negative)


def matching_loss(positive_logits: jax.Array, negative_logits: jax.Array,
                  negative_valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ITM cross-entropy over B positive and 2B negative pairs.

  Args:
    positive_logits: (B, 2) match logits of the true pairs (class 1 = match).
    negative_logits: (2B, 2) match logits of the hard-negative pairs (class 0).
    negative_valid: (2B,) bool, False for negatives that do not exist (left out of the mean); None = all valid.

  Returns:
    (loss, metrics) with 'itm_loss' and 'itm_acc' (accuracy over the counted pairs).
  """
  if negative_valid is None:
    negative_valid = jnp.ones(negative_logits.shape[:1], bool)
  logits = jnp.concatenate([positive_logits, negative_logits]).astype(jnp.float32)
  labels = jnp.concatenate([jnp.ones(positive_logits.shape[:1], jnp.int32),
                            jnp.zeros(negative_logits.shape[:1], jnp.int32)])
  weights = jnp.concatenate([jnp.ones(positive_logits.shape[:1], jnp.float32), negative_valid.astype(jnp.float32)])
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
  count = jnp.sum(weights)
  loss = jnp.sum(nll * weights) / count
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  return loss, {'itm_loss': loss, 'itm_acc': jnp.sum(correct * weights) / count}
